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
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tfsft.checkpoint import (  # noqa: F401  (TF-free; re-exported for callers of modeling)
    check_max_seq_length,
    embedded_checkpoint,
    load_tokenizer,
    resolve_checkpoint,
    text_encoder,
    weights_file,
)
from tfsft.artifacts import write_text
from tfsft.data import LabelMap
from tfsft.errors import ArtifactError, ConfigError
from tfsft.runtime import import_tensorflow
from tfsft.tasks import get_task

tf = import_tensorflow()

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

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


POOLING_ATTRIBUTE = "tfsft_pooling"
"""Key in a saved model's config.json recording how its sequence head pools (absent: 'cls')."""


class MeanPoolableArchitecture(NamedTuple):
    """A transformers architecture that gets a mean-pooled head, built on its own TF classes."""

    module: str
    """The transformers module of its TF classes."""
    stem: str
    """Their name stem: `TF{stem}MainLayer`, `TF{stem}PreTrainedModel`, `TF{stem}ForSequenceClassification`."""
    name: str
    """How its model card names it."""


MEAN_POOLED_ARCHITECTURES = {
    "bert": MeanPoolableArchitecture("transformers.models.bert.modeling_tf_bert", "Bert", "BERT"),
    "mpnet": MeanPoolableArchitecture("transformers.models.mpnet.modeling_tf_mpnet", "MPNet", "MPNet"),
}
"""model_type -> architecture, for the checkpoints a mean-pooled head is built for."""

MEAN_POOLING_MODEL_TYPES = frozenset(MEAN_POOLED_ARCHITECTURES)
"""Architectures that get a mean-pooled head (built on transformers' main layer of each)."""

MEAN_POOLED_PREFIX = "tfsft-mean-pooled-"
MEAN_POOLED_MODEL_TYPE = MEAN_POOLED_PREFIX + "bert"
"""`model_type` in the config.json of a saved mean-pooled BERT (`tfsft-mean-pooled-mpnet` for MPNet:
`MEAN_POOLED_PREFIX` and the architecture). Importing this module registers each with transformers'
`AutoConfig` and `TFAutoModelForSequenceClassification`, which then load such a model correctly;
without tfsft imported they do not know it and fail loudly, instead of building their own
[CLS]-pooler head with a random pooler (a warning, and wrong logits). tfsft reads it as a
checkpoint of its architecture for a new run."""

MEAN_POOLED_MODEL_CARD = """# {name} fine-tuned by tfsft, with a mean-pooled head

The classification head reads the masked mean of the last hidden states, not transformers'
pooler over [CLS]. transformers' auto classes have no such head of their own: `config.json`
names the model type `{model_type}`, which they refuse rather than build a head with a random
pooler, until tfsft registers it. Load it with `tfsft.modeling.load_finetuned`, or with the auto
class once `tfsft.modeling` is imported:

```python
from pathlib import Path
from tfsft.modeling import load_finetuned

model = load_finetuned(Path("RUN_DIR/model"))  # this directory

import tfsft.modeling  # registers {model_type} with transformers' auto classes
from transformers import TFAutoModelForSequenceClassification
model = TFAutoModelForSequenceClassification.from_pretrained("RUN_DIR/model")
```

or use the ONNX bundle tfsft exported beside it (`../onnx/`).
"""


def sequence_classifier_class():
    """transformers' auto class of a sequence head over the pooler (a task's default head)."""
    from transformers import TFAutoModelForSequenceClassification

    return TFAutoModelForSequenceClassification


def mean_pooled_class(model_type: str):
    """tfsft's mean-pooled sequence head for a checkpoint of `model_type` (an architecture, or a
    saved mean-pooled model's type)."""
    return _mean_pooled_class(base_model_type(model_type))


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
    recorded = _saved_config_value(directory, POOLING_ATTRIBUTE)
    return recorded if recorded in ("cls", "mean") else None


def _saved_config_value(directory: Path, key: str) -> Any:
    """`key` of the config.json in `directory`, or None (absent, unreadable, not a JSON object)."""
    try:
        return json.loads((directory / "config.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def base_model_type(model_type: str) -> str:
    """The architecture of a model type: `bert` for `bert` and for a saved mean-pooled BERT's type."""
    return model_type.removeprefix(MEAN_POOLED_PREFIX)


def head_class(task: str, pooling: str, model_type: str):
    """The model class of a task's head with the given (resolved) pooling, for a checkpoint of
    `model_type` (an architecture, or the type of a saved mean-pooled model)."""
    return get_task(task).head_class(pooling, model_type)


class StackedSpanModel:
    """`TFAutoModelForQuestionAnswering` whose output stacks the start and end logits into one
    `logits` tensor [batch, length, 2] (channel 0 start, 1 end).

    Every other tfsft head has one `logits` output, so training (one loss on `logits`),
    evaluation, parity and export treat a span head as a token head with two channels. The
    model is transformers' own class underneath (same layers, weights and saved
    `architectures`), so a saved run loads with `TFAutoModelForQuestionAnswering` as well.
    """

    @staticmethod
    def from_config(config):
        return _stacked_span_class(_question_answering_class(config))(config)

    @staticmethod
    def from_pretrained(path: str, config=None, **kwargs: Any):
        from transformers import AutoConfig

        config = config if config is not None else AutoConfig.from_pretrained(path)
        return _stacked_span_class(_question_answering_class(config)).from_pretrained(path, config=config, **kwargs)


def _question_answering_class(config):
    from transformers import TFAutoModelForQuestionAnswering

    try:
        return TFAutoModelForQuestionAnswering._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(
            f"--task qa: transformers has no TensorFlow question-answering head for model type "
            f"{getattr(config, 'model_type', type(config).__name__)!r}"
        ) from None


@functools.lru_cache(maxsize=None)
def _stacked_span_class(base):
    from transformers.modeling_tf_outputs import TFTokenClassifierOutput

    @functools.wraps(base.call)  # keeps call's signature: transformers reads the model's inputs from it
    def call(self, *args, **kwargs):
        outputs = base.call(self, *args, **kwargs)
        logits = tf.stack([outputs.start_logits, outputs.end_logits], axis=-1)
        return TFTokenClassifierOutput(logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    return type(base.__name__, (base,), {"call": call, "__doc__": StackedSpanModel.__doc__, "__module__": __name__})


def resolve_pooling(requested: str, checkpoint: Path, model_type: str, task: str) -> str:
    """The pooling a new sequence head gets: `requested`, or under 'auto' what the checkpoint was trained with."""
    if not get_task(task).sequence_head:
        return "cls"
    if requested == "auto":
        pooling = checkpoint_pooling(checkpoint)
        return pooling if base_model_type(model_type) in MEAN_POOLING_MODEL_TYPES else "cls"
    if requested == "mean" and base_model_type(model_type) not in MEAN_POOLING_MODEL_TYPES:
        raise ConfigError(
            f"--pooling mean is built for {sorted(MEAN_POOLING_MODEL_TYPES)} checkpoints; use --pooling cls. "
            f"Received: pooling=mean, model_type={model_type}"
        )
    return requested


class _NoPooler(tf.keras.layers.Layer):
    """Stands in for the pooler of a main layer that cannot leave it out (MPNet's): the mean-pooled
    head never reads it, and weights that get no gradient would only draw Keras warnings."""

    def call(self, hidden_states):
        return None


def _transformers_class(model_type: str, kind: str):
    """transformers' `TF{stem}{kind}` class of a mean-poolable architecture (kind: MainLayer, ...)."""
    architecture = MEAN_POOLED_ARCHITECTURES[model_type]
    return getattr(importlib.import_module(architecture.module), f"TF{architecture.stem}{kind}")


def _main_layer_without_pooler(model_type: str, config, name: str):
    """The architecture's main layer without its pooler over [CLS], which the mean-pooled head never reads."""
    main_layer = _transformers_class(model_type, "MainLayer")
    if "add_pooling_layer" in inspect.signature(main_layer.__init__).parameters:
        return main_layer(config, add_pooling_layer=False, name=name)
    main = main_layer(config, name=name)
    main.pooler = _NoPooler(name="pooler")
    return main


def _with_signature_of(reference):
    """Give the decorated `call` the parameters of `reference`: transformers reads the inputs a model
    takes (its input signature, `unpack_inputs`' names) from them."""

    def decorate(function):
        function.__signature__ = inspect.signature(reference)
        return function

    return decorate


@functools.lru_cache(maxsize=None)
def _mean_pooled_class(model_type: str):
    """`TF{stem}MeanPooledForSequenceClassification` of an architecture of MEAN_POOLED_ARCHITECTURES
    (TFBertMeanPooledForSequenceClassification, ...), defined on first use so transformers loads
    lazily, and registered with transformers' auto classes under its MEAN_POOLED_MODEL_TYPE."""
    from transformers import AutoConfig, TFAutoModelForSequenceClassification
    from transformers.modeling_tf_outputs import TFSequenceClassifierOutput
    from transformers.modeling_tf_utils import TFSequenceClassificationLoss, get_initializer, unpack_inputs

    if model_type not in MEAN_POOLED_ARCHITECTURES:
        raise ConfigError(
            f"a mean-pooled head is built for {sorted(MEAN_POOLED_ARCHITECTURES)} checkpoints; use --pooling cls. "
            f"Received: model_type={model_type}"
        )
    stem = MEAN_POOLED_ARCHITECTURES[model_type].stem
    pretrained = _transformers_class(model_type, "PreTrainedModel")
    reference = _transformers_class(model_type, "ForSequenceClassification")
    head_config = type(f"TfsftMeanPooled{stem}Config", (pretrained.config_class,), {
        "__doc__": f"{pretrained.config_class.__name__} under the model type {MEAN_POOLED_PREFIX}{model_type} "
                   "(see MEAN_POOLED_MODEL_TYPE).",
        "__module__": __name__,
        "model_type": MEAN_POOLED_PREFIX + model_type,
    })

    class MeanPooledForSequenceClassification(pretrained, TFSequenceClassificationLoss):
        """transformers' `TF{stem}ForSequenceClassification` with its head over the masked mean of the
        last hidden states instead of [CLS]: how sentence-transformers checkpoints were trained.

        Layer names match transformers' class (`bert`, `mpnet`, ...: the base model prefix, and
        `classifier`), so checkpoints load the same way, and the inputs are that class's (MPNet has
        no token types). A config of the architecture given to it becomes its `TfsftMeanPooled...Config`,
        so the model saves under its mean-pooled model type.
        """

        config_class = head_config
        _keys_to_ignore_on_load_unexpected = [
            r"mlm___cls", r"nsp___cls", r"cls.predictions", r"cls.seq_relationship", r"lm_head"
        ]
        _keys_to_ignore_on_load_missing = [r"dropout"]

        def __init__(self, config, *inputs, **kwargs):
            config = _as_config_class(config, head_config)
            super().__init__(config, *inputs, **kwargs)
            self.num_labels = config.num_labels
            prefix = self.base_model_prefix
            setattr(self, prefix, _main_layer_without_pooler(model_type, config, prefix))
            rate = getattr(config, "classifier_dropout", None)
            self.dropout = tf.keras.layers.Dropout(rate=config.hidden_dropout_prob if rate is None else rate)
            self.classifier = tf.keras.layers.Dense(
                units=config.num_labels, kernel_initializer=get_initializer(config.initializer_range), name="classifier"
            )

        @unpack_inputs
        @_with_signature_of(reference.call)
        def call(self, input_ids=None, attention_mask=None, **inputs):
            # Only these two come positionally: unpack_inputs maps positions to this function's own names.
            labels = inputs.pop("labels", None)
            training = inputs.pop("training", False)
            inputs["return_dict"] = True
            main = getattr(self, self.base_model_prefix)
            outputs = main(input_ids=input_ids, attention_mask=attention_mask, training=training, **inputs)
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
            main = getattr(self, self.base_model_prefix)
            with tf.name_scope(main.name):
                main.build(None)
            with tf.name_scope(self.classifier.name):
                self.classifier.build([None, None, self.config.hidden_size])

    name = f"TF{stem}MeanPooledForSequenceClassification"
    MeanPooledForSequenceClassification.__name__ = MeanPooledForSequenceClassification.__qualname__ = name
    AutoConfig.register(head_config.model_type, head_config, exist_ok=True)
    TFAutoModelForSequenceClassification.register(head_config, MeanPooledForSequenceClassification, exist_ok=True)
    return MeanPooledForSequenceClassification


def _as_config_class(config, config_class):
    """`config` as an instance of `config_class` (same values; the class decides the saved model_type)."""
    model_type = vars(config).get("model_type", config_class.model_type)  # from_dict may set it on the instance
    if type(config) is config_class and model_type == config_class.model_type:
        return config
    values = config.to_dict()
    values.pop("model_type", None)
    return config_class.from_dict(values)


def saved_model_type(directory: Path) -> str | None:
    """The `model_type` a checkpoint's config.json names, or None (unreadable, absent)."""
    model_type = _saved_config_value(directory, "model_type")
    return model_type if isinstance(model_type, str) else None


def _checkpoint_config(checkpoint: Path, **kwargs: Any):
    """The checkpoint's transformers config; a tfsft mean-pooled model's is read as its architecture's
    (BERT's, MPNet's), so any head can be built on it (the mean-pooled head turns it back into its own)."""
    from transformers import AutoConfig

    saved = saved_model_type(checkpoint) or ""
    if saved.startswith(MEAN_POOLED_PREFIX):
        config_class = _transformers_class(base_model_type(saved), "PreTrainedModel").config_class
        values, _ = config_class.get_config_dict(str(checkpoint))
        values.pop("model_type")
        return config_class.from_dict(values, **kwargs)
    return AutoConfig.from_pretrained(str(checkpoint), **kwargs)


def _float32_head(model) -> None:
    """Under a mixed (float16) policy, run the classification head in float32.

    Keras casts the targets and sample weights to the logits' dtype and computes the loss in it:
    float16 logits would round regression targets and weights and take the cross-entropy in
    float16. TensorFlow's mixed-precision guide gives a model's last layer a float32 policy for
    this; transformers' heads are built under the global policy, so theirs is set here (the
    head's weights are float32 under either policy, only its computation changes).
    """
    head = getattr(model, "classifier", None)
    if model.compute_dtype == "float32" or not isinstance(head, tf.keras.layers.Layer):
        return
    for layer in (head, *head.submodules):
        if isinstance(layer, tf.keras.layers.Layer):
            layer._set_dtype_policy("float32")


@contextlib.contextmanager
def float32_policy():
    """Build layers in float32 for the block, whatever the global Keras policy (a mixed-precision
    run leaves it at mixed_float16)."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def computes_in_float32(model) -> bool:
    layers = [layer for layer in (model, *model.submodules) if isinstance(layer, tf.keras.layers.Layer)]
    return all(layer.compute_dtype == "float32" for layer in layers)


def float32_model(model):
    """`model` if every layer computes in float32, else a float32 copy of it: same class, config
    and weights (float32 under a mixed policy too). Traced for ONNX, a mixed_float16 model gives a
    float16 graph, and its logits are not the float32 ones a served model should reproduce.
    """
    if computes_in_float32(model):
        return model
    with float32_policy(), quiet_transformers():
        copy = type(model)(model.config)
        copy(copy.dummy_inputs, training=False)
    source = {_unscoped(w.name): w for w in model.weights}
    target = {_unscoped(w.name): w for w in copy.weights}
    if source.keys() != target.keys():
        raise ArtifactError(
            f"cannot make a float32 copy of {type(model).__name__}: its weights differ from a fresh model's "
            f"({sorted(source.keys() ^ target.keys())[:3]})"
        )
    for name, weight in target.items():
        weight.assign(source[name].numpy().astype(weight.dtype.as_numpy_dtype))
    return copy


def _unscoped(name: str) -> str:
    """A weight's name without the model's own name scope (`tf_bert_..._1/bert/...` -> `bert/...`)."""
    return name.split("/", 1)[-1]


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
    try:
        config = _checkpoint_config(
            checkpoint,
            num_labels=len(label_map.names),
            id2label=label_map.id2label,
            label2id=label_map.label2id,
        )
    except Exception as error:
        raise ArtifactError(f"{checkpoint}: unreadable config.json ({str(error).splitlines()[0]})") from None
    pooling = resolve_pooling(pooling, checkpoint, config.model_type, task)
    setattr(config, POOLING_ATTRIBUTE, pooling)
    model_builder = head_class(task, pooling, config.model_type)
    weights = weights_file(checkpoint)
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
    _float32_head(model)
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


def word_embeddings(model) -> np.ndarray:
    """The model's input word-embedding matrix (vocabulary rows), as numpy."""
    matches = [w for w in model.weights if "word_embeddings" in w.name and len(w.shape) == 2]
    if len(matches) != 1:
        raise ValueError(f"expected one word-embedding matrix in {type(model).__name__}, found {[w.name for w in matches]}")
    return matches[0].numpy()


def save_pretrained(model, tokenizer, directory: Path) -> None:
    """Save model and tokenizer in transformers format (reloadable with from_pretrained; a
    mean-pooled model with `load_finetuned`, which its model card, README.md, says)."""
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    model_type = getattr(model.config, "model_type", None) or ""
    if model_type.startswith(MEAN_POOLED_PREFIX):
        name = MEAN_POOLED_ARCHITECTURES[base_model_type(model_type)].name
        write_text(Path(directory) / "README.md", MEAN_POOLED_MODEL_CARD.format(model_type=model_type, name=name))


def load_finetuned(directory: Path, task: str = "classification"):
    """Reload a fine-tuned model of the task written by `save_pretrained`, with the head it was
    trained with (a mean-pooled one too, which transformers' auto classes refuse)."""

    if not (directory / "tf_model.h5").is_file():
        if (directory / "adapter_config.json").is_file():
            raise ArtifactError(f"{directory}: a LoRA adapter, not a whole model; load it with tfsft.lora.load_run_model")
        raise ArtifactError(f"{directory}: no tf_model.h5; not a saved tfsft model")
    try:
        with quiet_transformers():
            model_type = saved_model_type(directory) or ""
            return head_class(task, recorded_pooling(directory) or "cls", model_type).from_pretrained(str(directory))
    except Exception as error:
        raise ArtifactError(f"{directory}: corrupt model ({type(error).__name__}: {str(error).splitlines()[0]})") from None


for _model_type in MEAN_POOLED_ARCHITECTURES:
    _mean_pooled_class(_model_type)  # registers its mean-pooled model type with transformers' auto classes
