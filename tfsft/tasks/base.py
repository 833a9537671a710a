"""What every task defines: its data, head, loss, metrics and decoding, in one class per task.

A task module (`tfsft/tasks/<name>.py`) subclasses `Task` and is registered in
`tfsft.tasks.TASKS`; the stages (config, data, modeling, training, evaluation, export,
inference, serving) ask the task instead of switching on its name. This module and the task
modules import no TensorFlow and nothing of tfsft above `errors` at import time (config reads
the registry), so the heavy halves (the head, the loss) and the data-level helpers are imported
inside the methods that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from tfsft.config import DataConfig
    from tfsft.data import LabelMap

IGNORED_LABEL = -100
"""Label id of a token the loss and the metrics skip (special tokens, continuation pieces, padding)."""


class Task:
    """One task: how its examples are read and labelled, what head and loss train it, how its
    predictions are scored, checked for export parity and decoded for users.

    Class attributes are the facts config validates against; methods are the behaviour.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    """One line for --help."""
    best_metrics: ClassVar[tuple[str, ...]] = ()
    """Validation metrics the best epoch may be chosen by; the first is the default."""
    keras_metrics: ClassVar[frozenset[str]] = frozenset({"loss"})
    """Best-epoch metrics Keras' own validation pass yields; the others are scored after each epoch."""
    default_max_seq_length: ClassVar[int] = 128
    label_counts: ClassVar[tuple[int, Optional[int]]] = (2, None)
    """(fewest, most) labels a bundle of this task may name."""
    sequence_head: ClassVar[bool] = True
    """One output vector per text (or pair), read from a pooled embedding: --pooling applies."""
    takes_pairs: ClassVar[bool] = True
    needs_train_file: ClassVar[bool] = False
    """No embedded default data set and no Hub loader: --train_file is required."""
    stratified: ClassVar[bool] = False
    """The default validation hold-out is stratified by label."""
    class_weighted: ClassVar[bool] = False
    few_shot: ClassVar[bool] = False
    """--few_shot can pair its texts by label."""
    distilled: ClassVar[bool] = False
    """--teacher_model can distill it (one output vector per text)."""
    streams: ClassVar[bool] = False
    """--streaming can read its training file."""
    multitask: ClassVar[bool] = False
    """A head of a multi-task run (`tasks:`): one output per text, pair or token from the shared encoder."""
    windowed: ClassVar[bool] = False
    """An example becomes several model inputs (windows): metrics.json counts them."""
    generates: ClassVar[bool] = False
    """A decoder language model: it generates text (exported with a key/value cache, served by /generate)."""
    lora_trains_head: ClassVar[bool] = True
    """--lora_rank trains the head fully (a classifier's head is new); a language model's output layer is
    pretrained and stays frozen, as PEFT's CAUSAL_LM and SEQ_2_SEQ_LM tasks leave it, so the adapter stays small."""
    encoder_decoder: ClassVar[bool] = False
    """Of the generating tasks, one whose model reads a source with an encoder (seq2seq) instead of continuing a prompt."""
    input_fields: ClassVar[Optional[tuple[str, str]]] = None
    """The (text, pair) fields every input record of predict.py has, whatever the run's columns were."""

    def check_data(self, data: "DataConfig") -> None:
        """Refuse data settings this task cannot use (ConfigError); called once the run config is complete."""

    def read(self, path: str, data: "DataConfig") -> Any:
        """The labelled examples of one file."""
        from tfsft.data import read_examples

        return read_examples(path, data)

    def hub_splits(self, data: "DataConfig") -> dict[str, Any]:
        """The examples of each split of --dataset_name (needs `datasets` and internet)."""
        from tfsft.data import hub_splits

        return hub_splits(data)

    def check_splits(self, splits: Any, data: "DataConfig") -> None:
        """Refuse examples the run cannot train on (DataError), once all splits are read."""

    def check_metric(self, metric: str, label_map: "LabelMap", source: str) -> None:
        """Refuse a --metric_for_best_model the training labels cannot give (ConfigError)."""

    def label_map(self, train: Any, delimiter: str) -> "LabelMap":
        """The outputs of the head, from the training examples."""
        raise NotImplementedError

    def encode_labels(self, label_map: "LabelMap", examples: Any, delimiter: str) -> np.ndarray:
        """The arrays the loss trains on, validated row by row."""
        raise NotImplementedError

    def encode(self, encoder: Any, examples: Any, labels: np.ndarray, data: "DataConfig") -> tuple[Any, np.ndarray, Any]:
        """(model inputs, labels as the loss sees them, what `metrics` scores logits against)."""
        encoded, labels = examples.encode(encoder, labels)
        return encoded, labels, labels

    def reference_subset(self, reference: Any, rows: np.ndarray) -> Any:
        """The reference of the encoded rows `rows` (export's parity sets score subsets)."""
        return reference[rows]

    def describe(self, label_map: "LabelMap") -> str:
        """How the log names what one example is."""
        return f"examples, labels {list(label_map.names)}"

    def head_class(self, pooling: str, model_type: str):
        """The model class of the head: transformers' sequence classifier, or tfsft's mean-pooled one."""
        from tfsft.modeling import mean_pooled_class, sequence_classifier_class

        return mean_pooled_class(model_type) if pooling == "mean" else sequence_classifier_class()

    def objective(self) -> tuple[Any, list]:
        """(loss on the logits, Keras metrics logged per epoch)."""
        raise NotImplementedError

    def metrics(
        self, reference: Any, logits: np.ndarray, label_map: "LabelMap", prefix: str, decision: dict[str, Any]
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics keyed `{prefix}_<name>`, report). `decision`: settings fixed by the user or chosen
        on validation (a threshold); a report's "decision" is what the test set and bundle must use."""
        raise NotImplementedError

    def before_training(self, model: Any, data: Any, reference: Any) -> dict[str, float]:
        """Metrics of the model as loaded, before any training (metrics.json keeps them)."""
        return {}

    def score(
        self, model: Any, data: Any, reference: Any, label_map: "LabelMap", prefix: str, decision: dict[str, Any],
        settings: "DataConfig",
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics, report) of a Keras model on encoded data: by default its logits through `metrics`."""
        from tfsft.evaluation import predict_logits

        return self.metrics(reference, predict_logits(model, data), label_map, prefix, decision)

    def agreement(
        self, candidate: np.ndarray, reference: np.ndarray, tolerance: float, threshold: Optional[float],
        token_labels: Optional[np.ndarray], lengths: Optional[np.ndarray],
    ) -> tuple[Optional[float], int]:
        """(share of the reference's decided predictions the candidate makes too, how many are decided).

        Decided: the top two logits more than 2 x tolerance apart, so no change within the
        tolerance can flip it. None when nothing is decided.
        """
        return top_two_agreement(candidate, reference, tolerance)

    def decode(self, logits: np.ndarray, bundle: Any) -> list[Any]:
        """One prediction per row of logits (the Predictor's answer)."""
        raise NotImplementedError

    def predict(self, predictor: Any, inputs: Sequence[Any]) -> list[Any]:
        """The Predictor's predictions for `inputs`, in input order."""
        return self.decode(predictor.logits(inputs), predictor.bundle)

    def bundle_settings(self, data: "DataConfig") -> dict[str, Any]:
        """What bundle.json records beyond the common fields, for the Predictor to decode as evaluation did."""
        return {}

    def csv_columns(self, labels: Sequence[str]) -> list[str]:
        """The header of predict.py's CSV output."""
        return ["label", *(f"p_{label}" for label in labels)]

    def request_error(self, key: str) -> Optional[str]:
        """Why a /predict body keyed `key` ("texts", "pairs", "questions") does not suit this task, or None."""
        if key == "questions":
            return f'a {self.name} model takes "texts" or "pairs", not "questions"'
        if key == "pairs" and not self.takes_pairs:
            return f'a {self.name} model tags single texts: send "texts", not "pairs"'
        return None

    def trained_columns(self, saved: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
        """The text and pair columns a run trained on, from its config.json's `data`, which predict.py reads too."""
        columns = [saved.get(name) for name in ("text_column", "text_pair_column")]
        text, pair = (column if isinstance(column, str) else None for column in columns)
        return text, pair

    # Distillation (`distilled` tasks): the loss on hard labels and on the teacher's outputs.
    distill_metric_name: ClassVar[str] = ""

    def distill_hard_width(self, outputs: int) -> int:
        """Columns the hard labels take in packed targets."""
        return 1

    def distill_losses(self, hard: Any, teacher: Optional[Any], y_pred: Any, temperature: float) -> tuple[Any, Any]:
        """(loss on the hard labels, loss against the teacher's outputs or None), per example."""
        raise NotImplementedError

    def distill_metric(self, hard: Any, y_pred: Any) -> Any:
        """The per-epoch Keras metric on the hard labels."""
        raise NotImplementedError

    def teacher_labels(self, teacher: np.ndarray, threshold: float) -> np.ndarray:
        """Hard labels the teacher's outputs give unlabelled texts."""
        raise NotImplementedError

    def teacher_agreement(self, teacher: np.ndarray, labels: np.ndarray) -> Optional[float]:
        """Share of training examples whose teacher prediction is their label (None where predictions are scores)."""
        predicted = self.teacher_labels(teacher, 0.5).reshape(len(labels), -1)
        return float((predicted == np.asarray(labels).reshape(len(labels), -1)).all(axis=1).mean())

    def teacher_columns(self, teacher: str, teacher_labels: Sequence[str], label_map: "LabelMap") -> np.ndarray:
        """For each output, the index of the teacher's output with the same label name."""
        from tfsft.errors import ConfigError

        missing = [name for name in label_map.names if name not in teacher_labels]
        if missing or len(teacher_labels) != len(label_map.names):
            raise ConfigError(
                f"--teacher_model {teacher} predicts labels {list(teacher_labels)}, this run's are {list(label_map.names)}: "
                f"a teacher must have the same labels. Received: teacher_model={teacher!r}"
            )
        return np.array([list(teacher_labels).index(name) for name in label_map.names], dtype=np.int64)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def invalid_setting(name: str, value: Any, expected: str) -> Exception:
    """The ConfigError of a flag's value, in config's words."""
    from tfsft.errors import ConfigError

    return ConfigError(f"Invalid value for --{name}: expected {expected}. Received: {name}={value!r}")


def top_two_agreement(candidate: np.ndarray, reference: np.ndarray, tolerance: float) -> tuple[Optional[float], int]:
    """Argmax agreement over the rows whose top two reference logits are more than 2 x tolerance apart."""
    top_two = np.sort(reference, axis=-1)[..., -2:]
    decided = top_two[..., 1] - top_two[..., 0] > 2 * tolerance
    agrees = candidate.argmax(-1) == reference.argmax(-1)
    count = int(decided.sum())
    return (float(agrees[decided].mean()) if count else None), count


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def json_safe(report: dict[str, Any]) -> dict[str, Any]:
    return {key: {k: float(v) if k != "support" else int(v) for k, v in row.items()} for key, row in report.items()}
