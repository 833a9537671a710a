"""LoRA: low-rank adapters on chosen dense layers of a transformers TF model (Hu et al. 2021).

`apply_lora` wraps each target `Dense` (by layer name: query and value of the attention, as PEFT
does) in a `LoraDense` computing `W x + b + (alpha / r) * B A dropout(x)` with `B` zero at the
start, so the model begins as the checkpoint; every encoder weight is frozen and the head trains
fully. A run saves only what trained (adapters and head, `adapter_model.safetensors`) beside an
`adapter_config.json` naming the base checkpoint and its SHA-256; `load_adapter` rebuilds the
model from that base and refuses a missing or different one. `merge_lora` folds each adapter
into its dense kernel (`W + (alpha / r) * A B`) and puts the plain `Dense` back, so the exported
graph is the one a fully fine-tuned model has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from tfsft import artifacts
from tfsft.checkpoint import resolve_checkpoint, saved_label_map, weights_file
from tfsft.config import ModelConfig
from tfsft.data import LabelMap
from tfsft.errors import ArtifactError, ConfigError
from tfsft.modeling import _unscoped, build_classifier, load_finetuned, quiet_transformers, recorded_pooling, tf

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

DEFAULT_TARGETS = {
    "bert": ("query", "value"),
    "tfsft-mean-pooled-bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "camembert": ("query", "value"),
    "electra": ("query", "value"),
    "albert": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "mpnet": ("q", "v"),
    "tfsft-mean-pooled-mpnet": ("q", "v"),
}
"""--lora_targets by model type when not given: the attention's query and value projections (PEFT's table)."""

ADAPTER_MODEL_CARD = """# LoRA adapter fine-tuned by tfsft

This directory holds only what training changed: rank-{rank} LoRA adapters on the `{targets}` layers
and the task head (`{weights}`, {size} bytes), not the {base_weights} of the base model. The base is
`{base}` ({base_weights}, SHA-256 `{sha256}`); `adapter_config.json` records it, and loading
checks the hash. Load it with tfsft (the adapters merged into the base weights):

```python
from pathlib import Path
from tfsft.lora import load_run_model

model = load_run_model(Path("RUN_DIR/model"))  # this directory; the base checkpoint must be present
```

or use the ONNX bundle tfsft exported beside it (`../onnx/`), which has the adapters merged in and
needs no base.
"""


@dataclass(frozen=True)
class LoraSettings:
    """Rank, scaling, dropout and target layer names of a run's adapters."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, model: ModelConfig, model_type: str) -> "LoraSettings":
        """The run's settings; --lora_targets unset means the model type's query and value layers."""
        if model.lora_targets is not None:
            targets = tuple(name.strip() for name in model.lora_targets.split(",") if name.strip())
        elif model_type in DEFAULT_TARGETS:
            targets = DEFAULT_TARGETS[model_type]
        else:
            raise ConfigError(
                f"--lora_rank: no default target layers for model type {model_type!r} (known: "
                f"{sorted(DEFAULT_TARGETS)}); name the dense layers to adapt with --lora_targets. "
                f"Received: lora_targets=None"
            )
        return cls(rank=model.lora_rank, alpha=model.lora_alpha, dropout=model.lora_dropout, targets=targets)

    @classmethod
    def from_adapter_config(cls, config: dict[str, Any]) -> "LoraSettings":
        """The settings an `adapter_config.json` records."""
        return cls(int(config["r"]), float(config["lora_alpha"]), float(config["lora_dropout"]), tuple(config["target_modules"]))


class LoraDense(tf.keras.layers.Layer):
    """A frozen `Dense` plus a trainable low-rank update: `base(x) + scale * (dropout(x) @ A) @ B`.

    `A` starts as PyTorch's (and PEFT's) default for a linear layer, uniform in +-1/sqrt(fan_in);
    `B` starts at zero, so the wrapped layer first computes exactly what `base` does.
    """

    def __init__(self, base, rank: int, scale: float, dropout: float, **kwargs: Any):
        super().__init__(name=base.name, dtype=base.dtype_policy, **kwargs)
        self.base = base
        self.base.trainable = False
        self.rank = rank
        self.scale = scale
        self.lora_dropout = tf.keras.layers.Dropout(dropout, name="lora_dropout")
        fan_in, fan_out = (int(size) for size in base.kernel.shape)
        scope = (base.kernel.name.rpartition("/")[0] or base.name) + "/"  # the base layer's own: `.../query/lora_a:0`
        with tf.name_scope(scope):
            bound = 1.0 / np.sqrt(fan_in)
            self.lora_a = self.add_weight(
                "lora_a", shape=(fan_in, rank), initializer=tf.keras.initializers.RandomUniform(-bound, bound),
                trainable=True,
            )
            self.lora_b = self.add_weight("lora_b", shape=(rank, fan_out), initializer="zeros", trainable=True)
        self.built = True

    def call(self, inputs, training=None):
        update = tf.matmul(tf.matmul(self.lora_dropout(inputs, training=training), self.lora_a), self.lora_b)
        return self.base(inputs) + tf.cast(self.scale, update.dtype) * update

    def merged_kernel(self) -> np.ndarray:
        """The base kernel with this adapter folded in."""
        delta = self.lora_a.numpy().astype(np.float64) @ self.lora_b.numpy().astype(np.float64)
        return (self.base.kernel.numpy().astype(np.float64) + self.scale * delta).astype(np.float32)


def _dense_slots(model) -> Iterator[tuple[Any, str, Any]]:
    """(owner layer, attribute, layer) for every Keras layer held as an attribute of a layer of `model`."""
    for owner in (model, *model.submodules):
        if not isinstance(owner, tf.keras.layers.Layer):
            continue
        for attribute, value in list(vars(owner).items()):
            if isinstance(value, tf.keras.layers.Layer) and not attribute.startswith("_"):
                yield owner, attribute, value


def encoder_layer(model):
    """The model's transformer main layer (`model.bert`, `model.distilbert`, ...): what LoRA freezes."""
    main = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(main, tf.keras.layers.Layer):
        raise ConfigError(f"--lora_rank: cannot find the encoder of {type(model).__name__} (no base_model_prefix layer)")
    return main


def apply_lora(model, settings: LoraSettings) -> int:
    """Wrap the target dense layers of the model's encoder in `LoraDense` and freeze every other
    encoder weight; the head stays trainable. Call under the strategy scope. Returns the number of
    layers adapted."""
    main = encoder_layer(model)
    encoder_ids = {id(layer) for layer in main.submodules} | {id(main)}
    wrapped: dict[int, LoraDense] = {}
    names_seen: set[str] = set()
    with quiet_transformers():
        for owner, attribute, layer in list(_dense_slots(model)):
            if id(owner) not in encoder_ids or not isinstance(layer, tf.keras.layers.Dense):
                continue
            names_seen.add(layer.name)
            if layer.name not in settings.targets or isinstance(owner, LoraDense):
                continue
            if id(layer) not in wrapped:  # a layer shared by several blocks (ALBERT) gets one adapter
                wrapped[id(layer)] = LoraDense(layer, settings.rank, settings.scale, settings.dropout)
            setattr(owner, attribute, wrapped[id(layer)])
    missing = [name for name in settings.targets if name not in names_seen]
    if missing or not wrapped:
        raise ConfigError(
            f"--lora_targets: no dense layer named {missing or list(settings.targets)} in the encoder of "
            f"{type(model).__name__}; its dense layers are named {sorted(names_seen)}. "
            f"Received: lora_targets={','.join(settings.targets)!r}"
        )
    _freeze_encoder(main)
    return len(wrapped)


def freeze_head(model) -> None:
    """Freeze every layer beside the encoder (a language model's output layer), after `apply_lora`:
    only the adapters then train, and only they are saved."""
    main = encoder_layer(model)
    for layer in model._flatten_layers(include_self=False, recursive=False):
        if layer is not main:
            layer.trainable = False


FROZEN_WEIGHTS_ATTRIBUTE = "_tfsft_lora_frozen"
"""Where a layer that holds adapters below it keeps its own weights LoRA froze (`merge_lora` restores them)."""


def _freeze_encoder(main) -> None:
    """Make every encoder weight but the adapters' untrainable. Keras hides all weights of a layer
    whose `trainable` is False, so only layers holding no adapter are switched off; the few weights
    a layer above an adapter holds itself (MPNet's relative attention bias, in its encoder) are
    moved to that layer's non-trainable weights."""

    def freeze(layer) -> bool:
        """Freeze what `layer` holds outside adapters; whether an adapter is at or below it."""
        if isinstance(layer, LoraDense):
            return True  # its base froze when it was wrapped
        holds = [freeze(child) for child in layer._flatten_layers(include_self=False, recursive=False)]
        if not any(holds):
            layer.trainable = False
            return False
        own = list(layer._trainable_weights)
        if own:  # object.__setattr__: Keras' own would track the list and re-add its variables as trainable
            object.__setattr__(layer, FROZEN_WEIGHTS_ATTRIBUTE, tuple(own))
            object.__setattr__(layer, "_trainable_weights", [])
            object.__setattr__(layer, "_non_trainable_weights", own + list(layer._non_trainable_weights))
        return True

    freeze(main)
    leaked = [
        weight.name for weight in main.trainable_weights if not weight.name.split("/")[-1].startswith("lora_")
    ]
    if leaked:
        raise ConfigError(f"--lora_rank: cannot freeze these encoder weights of {type(main).__name__}: {leaked[:3]}")


def merge_lora(model) -> int:
    """Fold every adapter into its dense kernel and put the plain `Dense` back, in place; the
    model then computes the same logits with the graph (and weight names) of a plain model.
    Returns the number of layers merged."""
    merged: dict[int, Any] = {}
    for owner, attribute, layer in list(_dense_slots(model)):
        if not isinstance(layer, LoraDense):
            continue
        if id(layer) not in merged:
            layer.base.kernel.assign(layer.merged_kernel())
            layer.base.trainable = True
            merged[id(layer)] = layer.base
        setattr(owner, attribute, merged[id(layer)])
    if not merged:
        return 0
    main = encoder_layer(model)
    for layer in (main, *main.submodules):
        if isinstance(layer, tf.keras.layers.Layer):
            layer.trainable = True
            frozen = vars(layer).pop(FROZEN_WEIGHTS_ATTRIBUTE, None)
            if frozen:
                kept = [w for w in layer._non_trainable_weights if all(w is not f for f in frozen)]
                object.__setattr__(layer, "_non_trainable_weights", kept)
                object.__setattr__(layer, "_trainable_weights", list(frozen) + list(layer._trainable_weights))
    return len(merged)


def parameter_counts(model) -> dict[str, int]:
    """`trainable_parameters` and `total_parameters` of the model, as PEFT prints them."""
    count = lambda weights: int(sum(int(np.prod(w.shape)) for w in weights))  # noqa: E731
    return {"trainable_parameters": count(model.trainable_weights), "total_parameters": count(model.weights)}


def _weight_key(weight) -> str:
    """A weight's name without the model's own scope and ':0' (`bert/encoder/.../query/lora_a`)."""
    return _unscoped(weight.name).rsplit(":", 1)[0]


def save_adapter(model, tokenizer, directory: Path, settings: LoraSettings, base: Path, base_name: str, task: str) -> None:
    """Write the trained weights (adapters and head), the model and tokenizer configs and
    `adapter_config.json` (settings, base checkpoint and its hash) into `directory`."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trained = {_weight_key(weight): weight.numpy().astype(np.float32) for weight in model.trainable_weights}
    with artifacts.atomic_path(directory / ADAPTER_WEIGHTS_FILE) as tmp:
        save_file(trained, str(tmp), metadata={"format": "np"})
    model.config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    base_weights = weights_file(base)
    base_sha256 = artifacts.file_digest(base_weights)
    head = sorted({key.split("/", 1)[0] for key in trained if not key.split("/")[-1].startswith("lora_")})
    artifacts.write_json(directory / ADAPTER_CONFIG_FILE, {
        "peft_type": "LORA",
        "task": task,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": list(settings.targets),
        "modules_to_save": head,
        "base_model_name_or_path": base_name,
        "base_checkpoint": str(Path(base).resolve()),
        "base_weights_file": base_weights.name,
        "base_weights_sha256": base_sha256,
        "base_weights_bytes": base_weights.stat().st_size,
    })
    artifacts.write_text(directory / "README.md", ADAPTER_MODEL_CARD.format(
        rank=settings.rank, targets=", ".join(settings.targets), weights=ADAPTER_WEIGHTS_FILE,
        size=(directory / ADAPTER_WEIGHTS_FILE).stat().st_size, base=base_name, base_weights=base_weights.name,
        sha256=base_sha256,
    ))


def is_adapter(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG_FILE).is_file()


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        LoraSettings.from_adapter_config(config)
        str(config["base_weights_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{path}: unreadable adapter config ({type(error).__name__}: {error})") from None
    return config


def adapter_base(directory: Path, config: Optional[dict[str, Any]] = None) -> Path:
    """The base checkpoint an adapter was trained on, found and checked against its recorded hash."""
    config = config or read_adapter_config(directory)
    recorded, name = Path(config.get("base_checkpoint", "")), str(config.get("base_model_name_or_path", ""))
    expected = config["base_weights_sha256"]
    candidates: list[Path] = [recorded] if (recorded / "config.json").is_file() else []
    if not candidates:
        try:
            candidates.append(resolve_checkpoint(name))
        except ArtifactError:
            pass
    for base in candidates:
        try:
            weights = weights_file(base)
        except ArtifactError:
            continue
        if weights.name == config.get("base_weights_file") and artifacts.file_digest(weights) == expected:
            return base
    found = f"{candidates[0]} holds different weights (SHA-256 differs)" if candidates else "it is not found"
    raise ArtifactError(
        f"{directory}: a LoRA adapter, which needs its base checkpoint {name!r} ({recorded}, "
        f"{config.get('base_weights_file')} with SHA-256 {expected[:12]}...), but {found}; install or restore that "
        "checkpoint, or serve the run's ONNX bundle, which has the adapters merged in"
    )


def load_adapter(directory: Path, task: str = "classification", merge: bool = True):
    """Rebuild a LoRA run's model from its base checkpoint and saved adapters (merged by default)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    base = adapter_base(directory, config)
    label_map: LabelMap = saved_label_map(directory)
    pooling = recorded_pooling(directory) or "cls"
    model, _ = build_classifier(base, label_map, str(config.get("base_model_name_or_path", base)), task, pooling)
    apply_lora(model, LoraSettings.from_adapter_config(config))
    try:
        saved = load_file(str(directory / ADAPTER_WEIGHTS_FILE))
    except Exception as error:
        raise ArtifactError(f"{directory / ADAPTER_WEIGHTS_FILE}: unreadable adapter weights ({type(error).__name__}: {error})") from None
    weights = {_weight_key(weight): weight for weight in model.trainable_weights}
    if saved.keys() != weights.keys():
        raise ArtifactError(
            f"{directory / ADAPTER_WEIGHTS_FILE}: holds weights {sorted(saved.keys() ^ weights.keys())[:3]} that do not "
            "match the model its adapter config describes; the adapter is corrupt or from another model"
        )
    for key, weight in weights.items():
        if tuple(saved[key].shape) != tuple(weight.shape):
            raise ArtifactError(
                f"{directory / ADAPTER_WEIGHTS_FILE}: {key} has shape {tuple(saved[key].shape)}, the model's is {tuple(weight.shape)}"
            )
        weight.assign(saved[key])
    if merge:
        merge_lora(model)
    return model


def load_run_model(directory: Path, task: str = "classification"):
    """The model a run saved in `directory`: a whole model, or a LoRA adapter rebuilt on its base and merged."""
    return load_adapter(directory, task) if is_adapter(directory) else load_finetuned(Path(directory), task)
