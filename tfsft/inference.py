"""Predict with an ONNX bundle using onnxruntime, tokenizers and numpy only: no TensorFlow here.

A server or batch job imports this module without paying for (or depending on) TensorFlow or
transformers. Texts are tokenized by `tfsft.tokenize`, the same code training used, sorted by
length and padded per batch, so short texts never pay for the longest one. A bundle of a task
that generates (a decoder LM) continues prompts instead (`Predictor.generate`, `Predictor.stream`),
over `tfsft.generation`'s key/value-cache loop; a seq2seq bundle (an encoder and a decoder) generates
each source's target the same way. A multi-task bundle (one encoder, a head per task) predicts for
the task each call names, as a single-task bundle of that head would (`Predictor.for_task`).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, TextIO, Union

import numpy as np

from tfsft import artifacts
from tfsft.config import MULTITASK, MULTITASK_TASKS
from tfsft.errors import ArtifactError, ConfigError, DataError
from tfsft.tasks import TASKS, qa
from tfsft.tasks.base import softmax  # noqa: F401  (part of this module's API)
from tfsft.tasks.causal_lm import Prompt, PromptFormat, check_messages
from tfsft.tasks.classification import Prediction
from tfsft.tasks.multilabel import LabelSet
from tfsft.tasks.ner import Entities, tag_chunks  # noqa: F401  (part of this module's API)
from tfsft.tasks.qa import Answer, question_context
from tfsft.tasks.regression import Score
from tfsft.tokenize import EncodedTexts, TextEncoder, pad_batch, split_into_calls

if TYPE_CHECKING:
    from tfsft.generation import DecoderSession, Seq2SeqSession, Step, StopCheck

TextInput = Union[str, Sequence[str]]
"""A single text, or a (text, text pair) sequence of two strings."""

_NUMPY_DTYPES = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}


@dataclass(frozen=True)
class Generation:
    """The continuation of one prompt by a model that generates text."""

    text: str
    """The new tokens decoded (special tokens skipped), cut before the first stop string, outer
    whitespace stripped: what evaluation scores (`tfsft.tasks.causal_lm.decode_generation`)."""
    tokens: tuple[int, ...]
    """The new token ids, without the eos or the stop token sequence that ended them."""
    finish_reason: str
    """`eos`, `stop` (a stop string) or `length` (max_new_tokens reached)."""

    def to_dict(self) -> dict[str, Any]:
        return {"generated": self.text, "finish_reason": self.finish_reason}

    def csv_fields(self, labels: Sequence[str]) -> list[Any]:
        return [self.text]


AnyPrediction = Union[Prediction, Score, LabelSet, Entities, Answer, Generation]
"""What the Predictor returns for one input, by the bundle's task."""


class PromptError(DataError):
    """A prompt the model cannot take; `index`: its position among the call's prompts, so a caller
    can name its own row or field; `detail`: what is wrong, a sentence with the prompt as subject."""

    def __init__(self, index: int, detail: str):
        super().__init__(f"prompt {index} {detail}")
        self.index = index
        self.detail = detail


DEFAULT_MAX_NEW_TOKENS = 64
"""New tokens per prompt when neither the call nor the bundle (`max_new_tokens`) says."""


@dataclass(frozen=True)
class Bundle:
    """What `bundle.json` promises about the files beside it.

    A multi-task bundle (`task` "multitask") has no labels of its own: `heads` holds each of its
    tasks as a single-task bundle of the same files, whose `metadata["output"]` names the ONNX
    output of that head (`head`).
    """

    directory: Path
    labels: tuple[str, ...]
    max_seq_length: int
    inputs: tuple[str, ...]
    files: dict[str, str]
    metadata: dict[str, Any]
    task: str = "classification"
    heads: dict[str, "Bundle"] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Bundle":
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"ONNX bundle directory not found: {directory}")
        path = directory / artifacts.BUNDLE_FILE
        meta = artifacts.read_json(path, "bundle metadata")
        if not isinstance(meta, dict):
            raise ArtifactError(f"{path}: expected a JSON object. Received: {type(meta).__name__}")
        if meta.get("task") == MULTITASK:
            return cls._load_multitask(directory, path, meta)
        try:
            labels = tuple(str(label) for label in meta["labels"])
            task = str(meta.get("task", "classification"))
            bundle = cls(directory, labels, int(meta["max_seq_length"]), tuple(meta["inputs"]), dict(meta["files"]), meta, task)
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"{path}: missing or invalid field {error}") from None
        _check_task(path, task, labels)
        return bundle

    @classmethod
    def _load_multitask(cls, directory: Path, path: Path, meta: dict[str, Any]) -> "Bundle":
        """A multi-task bundle and its heads, each checked as a single-task bundle's labels are."""
        try:
            shared = (int(meta["max_seq_length"]), tuple(meta["inputs"]), dict(meta["files"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"{path}: missing or invalid field {error}") from None
        common = {key: value for key, value in meta.items() if key != "tasks"}
        heads: dict[str, Bundle] = {}
        tasks = meta.get("tasks")
        if not isinstance(tasks, dict) or not tasks:
            raise ArtifactError(
                f'{path}: a multitask bundle needs a "tasks" object (task name -> its head\'s task, labels and '
                f"output). Received: tasks={tasks!r:.80}"
            )
        for name, entry in tasks.items():
            try:
                labels = tuple(str(label) for label in entry["labels"])
                task, output = str(entry["task"]), entry["output"]
                if not isinstance(output, str) or not output:
                    raise ValueError("'output' must be a non-empty string")
            except (KeyError, TypeError, ValueError) as error:
                raise ArtifactError(f"{path}: tasks.{name}: missing or invalid field {error}") from None
            if task not in MULTITASK_TASKS:
                raise ArtifactError(f"{path}: tasks.{name}: a head's task is one of {list(MULTITASK_TASKS)}. "
                                    f"Received: task={task!r:.80}")
            _check_task(path, task, labels, f"tasks.{name}: ")
            heads[str(name)] = cls(directory, labels, *shared, {**common, **entry, "head": str(name)}, task)
        return cls(directory, (), *shared, meta, MULTITASK, heads)

    @property
    def tasks(self) -> tuple[str, ...]:
        """A multi-task bundle's task names, in the order its run trained them; () for a single-task bundle."""
        return tuple(self.heads)

    def head(self, name: str) -> "Bundle":
        """One task of a multi-task bundle, as a single-task bundle of that head."""
        if name not in self.heads:
            raise ConfigError(_task_choice(self, name))
        return self.heads[name]

    @property
    def encoder_decoder(self) -> bool:
        """A seq2seq bundle: an encoder and a decoder file (`encoder`, `decoder` and their `_int8` copies)."""
        return self.task in TASKS and TASKS[self.task].encoder_decoder

    @property
    def has_fp32(self) -> bool:
        if self.encoder_decoder:
            return "decoder" in self.files
        return "fused" in self.files or "model" in self.files

    @property
    def has_int8(self) -> bool:
        return ("decoder_int8" if self.encoder_decoder else "int8") in self.files

    def model_path(self, int8: Optional[bool] = None, fused: bool = True) -> Path:
        """The ONNX file to serve: the int8 model (`int8=True`), an fp32 one (`False`: the fused
        model when shipped, unless `fused=False` asks for the plain one), or (`None`) fp32 when
        the bundle ships one, else int8. A bundle ships what `--export_variants` chose.
        A seq2seq bundle's is its decoder (`encoder_path` is the encoder of the same precision)."""
        if int8 is None:
            int8 = not self.has_fp32
        if self.encoder_decoder:
            return self._seq2seq_path("decoder", int8)
        if int8:
            key = "int8"
        elif fused and "fused" in self.files:
            key = "fused"
        else:
            key = "model"
        if key not in self.files:
            shipped = ", ".join(sorted(self.files.values())) or "no model"
            what, variant = {"int8": ("int8", "int8"), "model": ("fp32", "fused")}[key]
            if key == "model" and not fused:
                what, variant = "plain (unfused) fp32", "fp32"
            raise ArtifactError(
                f"{self.directory / artifacts.BUNDLE_FILE}: the bundle has no {what} model (it ships {shipped}); "
                f"re-export the run with `tfsft export RUN_DIR --export_variants {variant},...`"
            )
        return self.directory / self.files[key]

    def shared_base(self, int8: bool) -> Optional[tuple[Path, Path, str]]:
        """(base graph, adapter file, structure digest) of a LoRA bundle's `--adapter_files` at that
        precision (`tfsft.export_shared_base`), or None when the bundle ships none."""
        entry = self.metadata.get("shared_base")
        if entry is None:
            return None
        variant = "int8" if int8 else "fused"
        path = self.directory / artifacts.BUNDLE_FILE
        try:
            if variant not in entry["files"]:
                return None
            model, adapter, digest = entry["files"][variant], entry["adapter"], entry["digests"][variant]
            if not all(isinstance(value, str) and value for value in (model, adapter, digest)):
                raise TypeError("file names and digests must be non-empty strings")
        except (KeyError, TypeError) as error:
            raise ArtifactError(f"{path}: invalid shared_base entry ({type(error).__name__}: {error})") from None
        files = (self.directory / model, self.directory / adapter)
        for file in files:
            if not file.is_file():
                raise ArtifactError(f"{path}: shared_base names {file}, which is missing; re-export the run with --adapter_files")
        return files[0], files[1], digest

    def encoder_path(self, int8: Optional[bool] = None) -> Path:
        """A seq2seq bundle's encoder, of the precision `model_path(int8)` gives its decoder."""
        if not self.encoder_decoder:
            raise ArtifactError(f"{self.directory / artifacts.BUNDLE_FILE}: a {self.task} bundle has no encoder file")
        return self._seq2seq_path("encoder", not self.has_fp32 if int8 is None else int8)

    def _seq2seq_path(self, part: str, int8: bool) -> Path:
        key = f"{part}_int8" if int8 else part
        if key not in self.files:
            shipped = ", ".join(sorted(self.files.values())) or "no model"
            raise ArtifactError(
                f"{self.directory / artifacts.BUNDLE_FILE}: the bundle has no {'int8' if int8 else 'fp32'} {part} (it "
                f"ships {shipped}); re-export the run with `tfsft export RUN_DIR --export_variants "
                f"{'int8' if int8 else 'fp32'},...`"
            )
        return self.directory / self.files[key]

    def report(self) -> Optional[dict[str, Any]]:
        path = self.directory / artifacts.BUNDLE_REPORT
        return artifacts.read_json(path, "export report") if path.is_file() else None


def _check_task(path: Path, task: str, labels: tuple[str, ...], where: str = "") -> None:
    """ArtifactError unless `task` is one this tfsft serves and `labels` are as many as it takes."""
    if task not in TASKS:
        raise ArtifactError(f"{path}: {where}unknown task {task!r}; this tfsft serves {list(TASKS)}")
    fewest, most = TASKS[task].label_counts
    if len(labels) < fewest or (most is not None and len(labels) > most):
        expected = f"at least {fewest}" if most is None else f"exactly {most}"
        raise ArtifactError(f"{path}: {where}a {task} label map needs {expected} label(s). Received: labels={list(labels)}")


def _task_choice(bundle: Bundle, task: Any) -> str:
    """Why `task` does not name one of a bundle's tasks (the message of a ConfigError)."""
    if not bundle.heads:
        return (f"task selects a head of a multi-task bundle; this bundle has one task ({bundle.task}): pass no task. "
                f"Received: task={task!r:.80}")
    if task is None:
        return f"this multi-task bundle needs a task: one of {list(bundle.tasks)}. Received: task=None"
    return f"unknown task; this multi-task bundle's tasks are {list(bundle.tasks)}. Received: task={task!r:.80}"


PRECISIONS = ("auto", "fp32", "int8")
INT8_MAX_SCORE_DROP = 0.01
"""`auto` precision serves the int8 model when its validation score (accuracy, F1, Spearman...)
is at most this far (1 point) below the Keras model's, as `export_report.json` recorded it."""


@dataclass(frozen=True)
class PrecisionChoice:
    int8: bool
    requested: str
    reason: str

    @property
    def name(self) -> str:
        return "int8" if self.int8 else "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.name, "requested": self.requested, "reason": self.reason}


def choose_precision(bundle: Bundle, requested: str = "auto") -> PrecisionChoice:
    """Which model to serve: `fp32`, `int8`, or `auto` (int8 when the export report shows its
    score within INT8_MAX_SCORE_DROP of the Keras model's on validation, else fp32)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"Invalid value for --precision: expected one of {list(PRECISIONS)}. Received: precision={requested!r}")
    has_int8 = bundle.has_int8
    for name, missing in (("fp32", not bundle.has_fp32), ("int8", not has_int8)):
        if requested == name and missing:
            raise ArtifactError(
                f"{bundle.directory / artifacts.BUNDLE_FILE}: --precision {name}, but the bundle has no {name} model "
                f"(it ships {', '.join(sorted(bundle.files.values()))}). Received: precision={requested!r}"
            )
    if requested != "auto":
        return PrecisionChoice(requested == "int8", requested, f"{requested} requested")
    if not has_int8:
        return PrecisionChoice(False, requested, "the bundle has no int8 model")
    if not bundle.has_fp32:
        return PrecisionChoice(True, requested, "the bundle ships only the int8 model")
    report = bundle.report() or {}
    if bundle.heads:  # every head's score must hold up: one model serves them all
        tasks = report.get("tasks") if isinstance(report.get("tasks"), dict) else {}
        drops = [_int8_drop(tasks.get(name) or {}, f"{name}: ") for name in bundle.tasks]
    else:
        drops = [_int8_drop(report)]
    if any(drop is None for drop in drops):
        return PrecisionChoice(False, requested, "the export report records no int8 score drop")
    figure = "; ".join(figure for figure, _ in drops)  # type: ignore[misc]
    within = all(drop <= INT8_MAX_SCORE_DROP for _, drop in drops)  # type: ignore[misc]
    if bundle.heads:
        verdict = f"every drop within {INT8_MAX_SCORE_DROP:g}" if within else f"a drop of more than {INT8_MAX_SCORE_DROP:g}"
        return PrecisionChoice(within, requested, f"{figure}: {verdict}")
    return PrecisionChoice(within, requested, f"{figure}, {'within' if within else 'more than'} {INT8_MAX_SCORE_DROP:g}")


def _int8_drop(report: dict[str, Any], prefix: str = "") -> Optional[tuple[str, float]]:
    """(how the int8 model scored against Keras, its score drop) from an export report (or a
    multi-task report's section of one head), or None if it records none."""
    int8_report = report.get("int8") or {}
    drops = {key[: -len("_drop")]: value for key, value in int8_report.items() if key.endswith("_drop")}
    if len(drops) != 1 or not isinstance(next(iter(drops.values())), (int, float)):
        return None
    score, drop = next(iter(drops.items()))
    keras = report.get(f"keras_{score}", float("nan"))
    figure = f"{prefix}validation {score}: int8 {int8_report.get(score, float('nan')):.4f}, Keras {keras:.4f} (drop {drop:.4f})"
    return figure, float(drop)


class Predictor:
    """Classify or score texts or text pairs with an exported bundle, or continue prompts with a
    bundle whose task generates (`generate`, `stream`), or for a seq2seq bundle generate each
    source's target with the same calls. Safe to share between threads.

    `onnxruntime.InferenceSession.run` may be called concurrently, and the tokenizer is
    configured once here and only read afterwards, so no lock is needed. `int8`: serve the int8
    model (True), an fp32 one (False), or (None) fp32 when the bundle ships one, else int8
    (`Bundle.model_path`). `batch_size`: most texts per model call (calls also stay under
    `tfsft.tokenize.MAX_CALL_TOKENS` padded tokens), or prompts generated together.

    A multi-task bundle has one session for all its heads; `predict`, `logits` and `predict_one`
    then take the `task` to answer, and `for_task(task)` is that head's Predictor: a view sharing
    the session and tokenizer whose `bundle` is the head's single-task bundle, so each head
    predicts exactly as a single-task bundle of it would.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        int8: Optional[bool] = None,
        fused: bool = True,
        batch_size: int = 32,
        num_threads: Optional[int] = None,
        spinning: bool = False,
        base: Optional["SharedBase"] = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer. Received: batch_size={batch_size!r}")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1):
            raise ConfigError(f"num_threads must be a positive integer or None. Received: num_threads={num_threads!r}")
        self.bundle = Bundle.load(bundle_dir)
        self.labels = self.bundle.labels
        self.batch_size = batch_size
        self.model_path = self.bundle.model_path(int8=int8, fused=fused)
        self.encoder = TextEncoder.from_file(self.bundle.directory / artifacts.BUNDLE_TOKENIZER, self.bundle.max_seq_length)
        self.generates = not self.bundle.heads and TASKS[self.bundle.task].generates
        self.encoder_decoder = self.bundle.encoder_decoder
        self.output: Optional[str] = None
        """The ONNX output this Predictor reads (None: the model's first, a single-task bundle's logits)."""
        self.heads: dict[str, Predictor] = {}
        self.shared_base: Optional[SharedBase] = base
        """The base session this bundle's adapter runs on (`shared_base_predictors`), or None: its own model."""
        self.run_options = None
        if self.encoder_decoder:
            self._open_seq2seq(int8, num_threads, spinning)
            return
        if self.generates:
            self._open_decoder(num_threads, spinning)
            return
        if base is None:
            self.session = open_session(self.model_path, num_threads, spinning)
        else:
            self.model_path, self.adapter_path = base.path, base.check(self.bundle, int8)
            self.session, (self.run_options, self._adapter) = base.session, base.activate(self.adapter_path)
        self.input_dtypes = _input_dtypes(self.session, self.bundle.inputs, self.model_path)
        if not self.bundle.heads:
            self._check_output_size()
            return
        outputs = {output.name for output in self.session.get_outputs()}
        for name, head in self.bundle.heads.items():
            if head.metadata["output"] not in outputs:
                raise ArtifactError(
                    f"{self.model_path}: no output {head.metadata['output']!r} for task {name!r} of "
                    f"{self.bundle.directory / artifacts.BUNDLE_FILE}; the model's outputs are {sorted(outputs)}"
                )
            self.heads[name] = self._head_view(head)
            self.heads[name]._check_output_size()

    def _head_view(self, head: Bundle) -> "Predictor":
        """This Predictor as one head's: the same session, tokenizer and settings, the head's bundle and output."""
        view = copy.copy(self)
        view.bundle, view.labels, view.output, view.heads = head, head.labels, head.metadata["output"], {}
        return view

    def for_task(self, task: Optional[str] = None) -> "Predictor":
        """The Predictor of one task of a multi-task bundle (see the class docstring); for a
        single-task bundle, this one (`task` must then be None). ConfigError naming the bundle's
        tasks for a missing or unknown task."""
        if not self.heads and task is None:
            return self
        if not isinstance(task, str) or task not in self.heads:
            raise ConfigError(_task_choice(self.bundle, task))
        return self.heads[task]

    def _open_decoder(self, num_threads: Optional[int], spinning: bool) -> None:
        """The decoder session, prompt format and generation defaults of a generating bundle."""
        from tfsft.generation import DecoderSession

        meta, path = self.bundle.metadata, self.bundle.directory / artifacts.BUNDLE_FILE
        self.decoder: DecoderSession = DecoderSession(self.model_path, num_threads=num_threads, spinning=spinning)
        self.session = self.decoder.session
        formats = meta.get("prompt_format")
        default = meta.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        pad = meta.get("pad_id", self.encoder.pad_id)
        if not isinstance(formats, dict):
            raise ArtifactError(
                f"{path}: a generating bundle needs a \"prompt_format\" object. Received: {formats!r:.80}")
        _check_counts(path, max_new_tokens=default, pad_id=pad)
        try:
            self.prompt_format = PromptFormat.from_dict(formats)
        except (TypeError, ValueError) as error:
            raise ArtifactError(f"{path}: invalid prompt_format ({error})") from None
        self.max_new_tokens: int = min(default, self.bundle.max_seq_length - 1)
        self.pad_id: int = pad
        self.encoder.tokenizer.no_truncation()

    def _open_seq2seq(self, int8: Optional[bool], num_threads: Optional[int], spinning: bool) -> None:
        """The encoder and decoder sessions and generation settings of a seq2seq bundle. Sources are
        truncated to the bundle's max_seq_length, as training truncated them."""
        from tfsft.generation import Seq2SeqSession

        meta, path = self.bundle.metadata, self.bundle.directory / artifacts.BUNDLE_FILE
        self.seq2seq: Seq2SeqSession = Seq2SeqSession(self.bundle.encoder_path(int8), self.model_path,
                                                      num_threads=num_threads, spinning=spinning)
        self.session = self.seq2seq.session
        default = meta.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        pad = meta.get("pad_id", self.encoder.pad_id)
        start = meta.get("decoder_start_token_id", self.seq2seq.decoder_start_token_id)
        _check_counts(path, max_new_tokens=default, pad_id=pad, decoder_start_token_id=start)
        token_lists = {name: meta.get(name, []) for name in ("eos_token_ids", "suppress_token_ids")}
        for name, ids in token_lists.items():
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ArtifactError(f"{path}: {name} must be a list of token ids. Received: {name}={ids!r:.80}")
        prefix = meta.get("source_prefix", "")
        if not isinstance(prefix, str):
            raise ArtifactError(f"{path}: source_prefix must be a string. Received: source_prefix={prefix!r:.80}")
        self.prompt_format = PromptFormat(eos_token_ids=tuple(token_lists["eos_token_ids"]))
        limit = self.seq2seq.max_positions
        self.max_new_tokens = default if limit is None else min(default, limit)
        self.pad_id, self.decoder_start_token_id, self.source_prefix = pad, start, prefix
        self.suppress_token_ids: tuple[int, ...] = tuple(token_lists["suppress_token_ids"])

    def _check_output_size(self) -> None:
        """Run one tiny batch: catches a label map that does not fit the model, and warms up."""
        logits = self.run(pad_batch(self.encoder.encode(["ok"]), [0], self.encoder.pad_id))
        if logits.shape[-1] != len(self.labels):
            raise ArtifactError(
                f"{self.model_path}: the model outputs {logits.shape[-1]} logits but "
                f"{self.bundle.directory / artifacts.BUNDLE_FILE} names {len(self.labels)} labels"
            )

    def run(self, padded: dict[str, np.ndarray]) -> np.ndarray:
        """The model's logits for one padded batch."""
        feed = {name: padded[name].astype(self.input_dtypes[name], copy=False) for name in self.bundle.inputs}
        try:
            return self.session.run(None if self.output is None else [self.output], feed, self.run_options)[0]
        except Exception as error:
            raise ArtifactError(f"{self.model_path}: inference failed ({str(error).splitlines()[0]})") from None

    def encode(self, inputs: Sequence[TextInput]) -> EncodedTexts:
        texts, pairs = split_inputs(inputs)
        return self.encoder.encode(texts, pairs)

    def logits(self, inputs: Sequence[TextInput], task: Optional[str] = None) -> np.ndarray:
        """Logits of every input, in input order (computed in length-sorted batches); `task`: the
        head of a multi-task bundle."""
        if task is not None or self.heads:
            return self.for_task(task).logits(inputs)
        if self.generates:
            raise ConfigError(f"a {self.bundle.task} model generates text: call Predictor.generate, not logits")
        if len(inputs) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        encoded = self.encode(inputs)
        if TASKS[self.bundle.task].sequence_head:
            out = np.empty((len(encoded), len(self.labels)), dtype=np.float32)
            for indices in self.batches(encoded):
                out[indices] = self.run(pad_batch(encoded, indices, self.encoder.pad_id))
            return out
        # A tagger's logits are per token: [inputs, longest input, labels], zero past each input's tokens.
        out = np.zeros((len(encoded), int(encoded.lengths.max()), len(self.labels)), dtype=np.float32)
        for indices in self.batches(encoded):
            batch = self.run(pad_batch(encoded, indices, self.encoder.pad_id))
            for row, i in enumerate(indices):
                out[i, : encoded.lengths[i]] = batch[row, : encoded.lengths[i]]
        return out

    def batches(self, encoded: EncodedTexts) -> list[np.ndarray]:
        """Indices of each model call: sorted by length, split where padding would cost more than a
        call, at most `batch_size` examples and `MAX_CALL_TOKENS` padded tokens each."""
        order = np.argsort(encoded.lengths, kind="stable")
        return [order[start:end] for start, end in split_into_calls(encoded.lengths[order], self.batch_size)]

    def predict(self, inputs: Sequence[Any], task: Optional[str] = None) -> list[AnyPrediction]:
        """Predictions for texts (`"a text"`) or pairs (`("text", "pair")`), in input order:
        a label with probabilities (classification), a score (regression), a label set
        (multilabel), entity spans (ner), or for question answering, inputs
        `{"question": ..., "context": ...}` (or `(question, context)`), an answer (`predict_answers`);
        for a model that generates, prompts continued with the bundle's defaults (`generate`).
        `task`: which task of a multi-task bundle answers (required there, refused elsewhere)."""
        if task is not None or self.heads:
            return self.for_task(task).predict(inputs)
        return TASKS[self.bundle.task].predict(self, inputs)

    def predict_answers(self, inputs: Sequence[Any]) -> list[Answer]:
        """The answer span of each question in its context, decoded as evaluation decodes it.

        A context longer than one window is split into overlapping windows (the bundle's
        doc_stride); every window of every question goes through the model in length-sorted
        batches, and each question's best span over all its windows is its answer.
        """
        pairs = [question_context(item, position) for position, item in enumerate(inputs)]
        if not pairs:
            return []
        examples = qa.QAExamples(
            ids=[str(i) for i in range(len(pairs))], questions=[q for q, _ in pairs], contexts=[c for _, c in pairs],
            answers=[[] for _ in pairs], source="inputs",
        )
        windows = self.windows(examples)
        logits: list[Optional[np.ndarray]] = [None] * len(windows)
        for indices in self.batches(windows.encoded):
            batch = self.run(pad_batch(windows.encoded, indices, self.encoder.pad_id))
            for row, i in enumerate(indices):
                logits[i] = batch[row, : windows.encoded.lengths[i]]
        return self.decode_answers(logits, windows, examples)

    def windows(self, examples: Any) -> Any:
        """The model inputs of question-answering examples (`tfsft.tasks.qa.QAExamples`): windows of
        question and context, cut with the bundle's doc_stride as training cut them."""
        return qa.make_windows(self.encoder, examples, int(self.bundle.metadata.get("doc_stride", qa.DEFAULT_DOC_STRIDE)))

    def decode_answers(self, logits: Sequence[np.ndarray], windows: Any, examples: Any) -> list[Answer]:
        """Each question's best span from its windows' start/end logits, decoded with the bundle's
        settings (n-best, longest answer, the null threshold of a SQuAD v2 run) as evaluation did."""
        meta = self.bundle.metadata
        threshold = (meta.get("decision") or {}).get("null_threshold")
        spans = qa.best_spans(
            logits, windows, examples,
            n_best=int(meta.get("n_best_size", qa.DEFAULT_N_BEST)),
            max_answer_length=int(meta.get("max_answer_length", qa.DEFAULT_MAX_ANSWER_LENGTH)),
            null_threshold=None if threshold is None else float(threshold),
        )
        return [Answer(s.answer, int(s.start), int(s.end), float(s.score)) for s in spans]

    def predict_one(self, text: TextInput, task: Optional[str] = None) -> AnyPrediction:
        return self.predict([text], task)[0]

    # ---------------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Union[str, Sequence[str]] = (),
        seed: Optional[int] = None,
    ) -> list[Generation]:
        """Continue each prompt, in input order, `batch_size` prompts at a time (left-padded).

        Args:
            prompts: strings, or chat conversations (`[{"role": ..., "content": ...}, ...]`)
                rendered with the bundle's chat template and its generation prompt. For a seq2seq
                bundle, source texts (`source_ids`: the bundle's source_prefix first).
            max_new_tokens: the most tokens to add (None: the bundle's `max_new_tokens`).
            temperature: 0 is greedy; above 0, sampling (`tfsft.generation.generate`).
            top_p: nucleus sampling's probability mass.
            stop: strings that end a continuation, cut from its text. Their token sequences end
                rows as they are generated; the decoded text is checked as well, since a string
                may come out of other tokens than it encodes to on its own.
            seed: seeds the sampler (each chunk of `batch_size` prompts from its own stream).

        Raises:
            PromptError: a prompt that is empty, badly formed, or too long to leave room for
                max_new_tokens within the bundle's max_seq_length (names its index).
            ConfigError: a bad setting, or a bundle that does not generate.
        """
        request = self._generation_request(prompts, max_new_tokens, temperature, top_p, stop, seed)
        results: list[Generation] = []
        for chunk, start in enumerate(range(0, len(request.prompt_ids), self.batch_size)):
            rows = request.prompt_ids[start : start + self.batch_size]
            finished: dict[int, Generation] = {}
            for steps in self._steps(request, rows, _chunk_seed(seed, chunk)):
                for step in steps:
                    if step.finish_reason is not None:
                        finished[step.row] = self._finish(step.tokens, step.finish_reason, request.stop)
            results.extend(finished[row] for row in range(len(rows)))
        return results

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Union[str, Sequence[str]] = (),
        seed: Optional[int] = None,
    ) -> Iterator[Union[str, Generation]]:
        """`generate` for one prompt, as it goes: yields pieces of text as tokens come, then the
        whole `Generation`; the pieces join to its text.

        Each step decodes all tokens so far and yields what its text adds beyond what was
        yielded. Text is held back while it ends in U+FFFD (a character whose bytes have not all
        come), in whitespace (stripped if nothing follows), or in the start of a stop string.
        The arguments are checked here, before the first step (errors do not wait for iteration).
        """
        request = self._generation_request([prompt], max_new_tokens, temperature, top_p, stop, seed)
        return self._stream(request, seed)

    def _stream(self, request: "GenerationRequest", seed: Optional[int]) -> Iterator[Union[str, Generation]]:
        emitted = ""
        final: Optional[Generation] = None
        for steps in self._steps(request, request.prompt_ids, seed):
            step = steps[0]
            if step.finish_reason is not None:
                final = self._finish(step.tokens, step.finish_reason, request.stop)
                break
            visible = streamable_text(self._decode(step.tokens), request.stop)
            if visible is not None and len(visible) > len(emitted) and visible.startswith(emitted):
                yield visible[len(emitted):]
                emitted = visible
        assert final is not None, "generate_steps gives every row a finishing step"
        if len(final.text) > len(emitted) and final.text.startswith(emitted):
            yield final.text[len(emitted):]
        yield final

    def _steps(self, request: "GenerationRequest", prompt_ids: list[list[int]],
               seed: Optional[int]) -> Iterator[list["Step"]]:
        from tfsft.generation import generate_seq2seq_steps, generate_steps

        if self.encoder_decoder:
            return generate_seq2seq_steps(
                self.seq2seq, prompt_ids, request.max_new_tokens, eos_token_id=list(self.prompt_format.eos_token_ids),
                pad_token_id=self.pad_id, temperature=request.temperature, top_p=request.top_p, seed=seed,
                stop_token_sequences=request.stop_ids, stop_check=self._stop_check(request.stop),
                suppress_token_ids=list(self.suppress_token_ids), decoder_start_token_id=self.decoder_start_token_id,
            )
        return generate_steps(
            self.decoder, prompt_ids, request.max_new_tokens, eos_token_id=list(self.prompt_format.eos_token_ids),
            pad_token_id=self.pad_id, temperature=request.temperature, top_p=request.top_p, seed=seed,
            stop_token_sequences=request.stop_ids, stop_check=self._stop_check(request.stop),
        )

    def _stop_check(self, stop: tuple[str, ...]) -> Optional["StopCheck"]:
        """Ends a row once its decoded text holds a stop string (None: no stop strings)."""
        if not stop:
            return None
        return lambda row, tokens: any(s in self._decode(tokens) for s in stop)

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.encoder.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _finish(self, tokens: Sequence[int], reason: str, stop: tuple[str, ...]) -> Generation:
        from tfsft.generation import FINISH_STOP, trim_at_stop

        text, stopped = trim_at_stop(self._decode(tokens), stop)
        return Generation(text.strip(), tuple(int(t) for t in tokens), FINISH_STOP if stopped else reason)

    def _generation_request(self, prompts: Sequence[Prompt], max_new_tokens: Optional[int], temperature: float,
                            top_p: float, stop: Union[str, Sequence[str]], seed: Optional[int]) -> "GenerationRequest":
        """The checked settings and the prompts' token ids of one generate or stream call."""
        from tfsft.generation import check_settings

        if not self.generates:
            raise ConfigError(f"a {self.bundle.task} model does not generate text (its bundle is no decoder LM): "
                              "call Predictor.predict")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ConfigError(f"prompts must be a list of prompts. Received: {type(prompts).__name__}")
        new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        check_settings(new, temperature, top_p, self.pad_id)
        self._check_new_tokens(new)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ConfigError(f"seed must be an integer or None. Received: seed={seed!r}")
        stops = _stop_strings(stop)
        ids = self.source_ids(prompts) if self.encoder_decoder else self.prompt_ids(prompts, new)
        return GenerationRequest(ids, int(new), float(temperature), float(top_p), stops, self._stop_token_sequences(stops))

    def _check_new_tokens(self, new: int) -> None:
        """A decoder LM's prompt and new tokens share its max_seq_length; a seq2seq decoder's new
        tokens have the decoder's positions to themselves (no limit for T5's relative positions)."""
        if self.encoder_decoder:
            limit = self.seq2seq.max_positions
            if limit is not None and new > limit:
                raise ConfigError(f"max_new_tokens must be at most {limit}: the decoder's positions. "
                                  f"Received: max_new_tokens={new}")
            return
        most = self.bundle.max_seq_length - 1
        if new > most:
            raise ConfigError(f"max_new_tokens must be at most {most}: the model's max_seq_length "
                              f"({self.bundle.max_seq_length}) holds the prompt too. Received: max_new_tokens={new}")

    def source_ids(self, sources: Sequence[Any]) -> list[list[int]]:
        """Each source's token ids for a seq2seq model, as training encoded them: the bundle's
        source_prefix prepended, the tokenizer's special tokens added, truncated to max_seq_length.
        Raises PromptError (naming the index) for a source that is not a non-empty string."""
        texts = []
        for index, source in enumerate(sources):
            if not isinstance(source, str):
                raise PromptError(index, f"is a {type(source).__name__}: a seq2seq model takes a source text (a string)")
            if not source.strip():
                raise PromptError(index, "is empty")
            texts.append(self.source_prefix + source)
        encoded = [e.ids for e in self.encoder.tokenizer.encode_batch(texts, add_special_tokens=True)] if texts else []
        for index, ids in enumerate(encoded):
            if not ids:
                raise PromptError(index, "has no tokens: expected some text")
        return [list(ids) for ids in encoded]

    def prompt_ids(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
        """Each prompt's token ids, as training encoded prompts (rendered, the tokenizer's special
        tokens added). Raises PromptError for a prompt too long to leave max_new_tokens positions."""
        texts = [self._prompt_text(index, prompt) for index, prompt in enumerate(prompts)]
        encoded = [e.ids for e in self.encoder.tokenizer.encode_batch(texts, add_special_tokens=True)] if texts else []
        room = self.bundle.max_seq_length - max_new_tokens
        for index, ids in enumerate(encoded):
            if not ids:
                raise PromptError(index, "has no tokens: expected some text")
            if len(ids) > room:
                raise PromptError(
                    index, f"has {len(ids)} tokens; at most {room} fit before max_new_tokens={max_new_tokens} within "
                           f"the model's max_seq_length={self.bundle.max_seq_length}: shorten it or ask for fewer "
                           "tokens")
        return [list(ids) for ids in encoded]

    def _prompt_text(self, index: int, prompt: Any) -> str:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError(index, "is empty")
            return prompt
        if self.prompt_format.chat_template is None:
            raise PromptError(index, "is a chat conversation, but the model has no chat template: send a string")
        try:
            return self.prompt_format.prompt_text(check_messages(prompt, "messages"))
        except DataError as error:
            raise PromptError(index, f"is not a chat conversation the model takes ({error})") from None
        except Exception as error:  # the template itself (jinja2's TemplateError, raise_exception)
            raise PromptError(index, f"could not be rendered by the chat template ({error})") from None

    def _stop_token_sequences(self, stops: tuple[str, ...]) -> list[list[int]]:
        """The token sequence of each stop string that encodes to tokens decoding back to it
        exactly: only those can end a row at token level without ending it on something else
        (an unknown word's <unk>, say); the decoded text catches the others."""
        sequences = []
        for text in stops:
            ids = self.encoder.tokenizer.encode(text, add_special_tokens=False).ids
            if ids and self.encoder.tokenizer.decode(ids, skip_special_tokens=False) == text:
                sequences.append(list(ids))
        return sequences


def _check_counts(path: Path, **values: Any) -> None:
    """ArtifactError naming the first bundle.json setting that is not an integer >= 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ArtifactError(f"{path}: {name} must be an integer >= 0. Received: {name}={value!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One generate or stream call, checked: the prompts' token ids and the settings."""

    prompt_ids: list[list[int]]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    stop_ids: list[list[int]]


def _stop_strings(stop: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    if stop is None:
        return ()
    values = [stop] if isinstance(stop, str) else stop
    if not isinstance(values, Sequence):
        raise ConfigError(f"stop must be a string or a list of strings. Received: {type(stop).__name__}")
    for index, value in enumerate(values):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"stop[{index}] must be a non-empty string. Received: {value!r:.60}")
    return tuple(values)


def _chunk_seed(seed: Optional[int], chunk: int) -> Optional[int]:
    """The sampler seed of one chunk of prompts: `seed` itself for the first (so one call of a
    few prompts samples as `tfsft.generation.generate` with that seed), a derived one after."""
    if seed is None or chunk == 0:
        return seed
    return int(np.random.SeedSequence([int(seed), chunk]).generate_state(1)[0])


def streamable_text(text: str, stop: Sequence[str]) -> Optional[str]:
    """What of a continuation's text so far can be sent and never taken back, or None to send
    nothing new yet (it ends in U+FFFD: a character whose bytes have not all been generated).

    The text is cut at a stop string, else before any end of it that begins one; leading
    whitespace goes (the final text is stripped) and trailing whitespace waits for what follows.
    """
    from tfsft.generation import trim_at_stop

    text, stopped = trim_at_stop(text, stop)
    if not stopped:
        text = text[: len(text) - _partial_stop(text, stop)]
    if text.endswith("\ufffd"):
        return None
    return text.strip()


def _partial_stop(text: str, stop: Sequence[str]) -> int:
    """The length of the longest end of `text` that a stop string begins with (0: none)."""
    longest = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:size]):
                longest = size
                break
    return longest


def open_session(path: Path, num_threads: Optional[int], spinning: bool = False, quiet: bool = False):
    """An onnxruntime CPU session (`quiet`: errors only in onnxruntime's log, for a shared base
    graph, whose every adapter input would get a warning that it can be overridden, on purpose).

    Spinning is off by default: onnxruntime's idle intra-op threads otherwise busy-wait after
    every run, taking the cores that tokenization, the HTTP server or other sessions need
    (measured on 2 cores: a server sharing them, and interleaved sessions, slowed down). The
    graph rewrites of `artifacts.ORT_DISABLED_OPTIMIZERS` stay off.
    """
    import onnxruntime as ort

    if not path.is_file():
        raise ArtifactError(f"ONNX model file not found: {path}")
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quiet:
        options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(artifacts.ORT_DISABLED_OPTIMIZERS))
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ArtifactError(f"Corrupt or unreadable ONNX model {path}: {message}") from None


class SharedBase:
    """One onnxruntime session of a LoRA base graph (`--adapter_files`) that the Predictors of
    several adapter runs of that base share, each running with its own adapter file active."""

    def __init__(self, path: Path, digest: str, int8: bool, num_threads: Optional[int] = None, spinning: bool = False):
        self.path, self.digest, self.int8 = path, digest, int8
        self.session = open_session(path, num_threads, spinning, quiet=True)

    def check(self, bundle: "Bundle", int8: Optional[bool]) -> Path:
        """The adapter file of `bundle` for this base; ArtifactError when its base graph differs."""
        found = bundle.shared_base(self.int8)
        if int8 is not None and bool(int8) != self.int8:
            raise ConfigError(f"{bundle.directory}: asked for int8={int8}, but the shared base is {'int8' if self.int8 else 'fp32'}")
        if found is None or found[2] != self.digest:
            raise ArtifactError(
                f"{bundle.directory}: " + ("ships no shared-base files (export it with --adapter_files)" if found is None
                                           else f"its base graph differs from {self.path} (another base, rank, pooling or head)")
            )
        return found[1]

    @staticmethod
    def activate(adapter_file: Path):
        """(RunOptions with the adapter file active, the loaded adapter, which must outlive them)."""
        import onnxruntime as ort

        adapter = ort.LoraAdapter()
        try:
            adapter.Load(str(adapter_file))
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ArtifactError(f"Corrupt or unreadable adapter file {adapter_file}: {message}") from None
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        return options, adapter


def shared_base_problem(bundles: dict[str, "Bundle"], int8: dict[str, bool]) -> Optional[str]:
    """Why the bundles cannot be served from one shared base session at the precisions `int8`
    chose for each, or None when they can: every one ships `--adapter_files` of the same base
    graph (equal structure digests) at one precision. Tokenizers may differ: each Predictor
    encodes with its own bundle's, and the graph computes from token ids alone."""
    if len(set(int8.values())) > 1:
        return "their chosen precisions differ (" + ", ".join(f"{n}: {'int8' if v else 'fp32'}" for n, v in int8.items()) + ")"
    found = {name: bundle.shared_base(int8[name]) for name, bundle in bundles.items()}
    lacking = [name for name, entry in found.items() if entry is None]
    if lacking:
        return f"no shared-base files at that precision in {', '.join(lacking)} (export with --adapter_files)"
    if len({entry[2] for entry in found.values() if entry is not None}) > 1:
        return "their base graphs differ (another base, rank, targets, pooling or label count)"
    return None


def shared_base_predictors(
    bundle_dirs: dict[str, str | os.PathLike], int8: bool = False, batch_size: int = 32,
    num_threads: Optional[int] = None, spinning: bool = False,
) -> dict[str, "Predictor"]:
    """A Predictor per named LoRA bundle, all running on one session of the first bundle's base
    graph, each with its own adapter file active: one base in memory instead of one merged model
    per adapter, the same logits (`--adapter_files` checked them against Keras at export).
    ArtifactError naming the reason when the bundles cannot share a base (`shared_base_problem`)."""
    bundles = {name: Bundle.load(path) for name, path in bundle_dirs.items()}
    problem = shared_base_problem(bundles, {name: int8 for name in bundles})
    if problem is not None:
        raise ArtifactError(f"the bundles {sorted(bundles)} cannot share one base: {problem}")
    first = next(iter(bundles.values())).shared_base(int8)
    assert first is not None
    base = SharedBase(first[0], first[2], int8, num_threads, spinning)
    return {name: Predictor(bundle.directory, int8=int8, batch_size=batch_size, base=base) for name, bundle in bundles.items()}


def _input_dtypes(session, expected: Sequence[str], path: Path) -> dict[str, Any]:
    found = {i.name: i.type for i in session.get_inputs()}
    if set(found) != set(expected):
        raise ArtifactError(f"{path}: model inputs {sorted(found)} differ from the bundle's {sorted(expected)}")
    unknown = {name: t for name, t in found.items() if t not in _NUMPY_DTYPES}
    if unknown:
        raise ArtifactError(f"{path}: unsupported input types {unknown}; expected int32 or int64")
    return {name: _NUMPY_DTYPES[t] for name, t in found.items()}


def split_inputs(inputs: Sequence[TextInput]) -> tuple[list[str], Optional[list[str]]]:
    """Texts and pairs (or None) from a list of texts or of (text, pair) sequences, not mixed."""
    texts: list[str] = []
    pairs: list[str] = []
    for position, item in enumerate(inputs):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item):
            texts.append(item[0])
            pairs.append(item[1])
        else:
            raise ValueError(f"input {position}: expected a string or a pair of strings. Received: {item!r:.80}")
    if pairs and len(pairs) != len(texts):
        raise ValueError("inputs mix single texts and text pairs; send one kind per call")
    return texts, (pairs or None)


# ------------------------------------------------------------------------------ streamed input

TEXT_FIELDS = ("text", "sentence", "sentence1", "question1")
PAIR_FIELDS = ("text_pair", "sentence2", "question2")


@dataclass(frozen=True)
class InputFields:
    """Which fields of an input record are the text and its pair: the first present of `text`,
    and of `pair` (never the text's own field); with `pair_required`, a record without a pair is
    an error, since the model was trained on pairs."""

    text: tuple[str, ...] = TEXT_FIELDS
    pair: tuple[str, ...] = PAIR_FIELDS
    pair_required: bool = False

    @classmethod
    def for_run(
        cls,
        trained_text: Optional[str],
        trained_pair: Optional[str],
        text_column: Optional[str] = None,
        text_pair_column: Optional[str] = None,
    ) -> "InputFields":
        """The fields for a model trained on columns `trained_text` (and `trained_pair`).

        The run's own column comes first, then the generic names (`text`, `text_pair`, ...); a
        run that read single texts reads no pair, even where the input has a `sentence2`. With
        nothing recorded (older runs), the generic names decide, as they always did.
        `text_column`/`text_pair_column` (explicit choices) are the only fields tried.
        """
        if text_column:
            text: tuple[str, ...] = (text_column,)
        else:
            text = tuple(dict.fromkeys([trained_text, *TEXT_FIELDS])) if trained_text else TEXT_FIELDS
        if text_pair_column:
            return cls(text, (text_pair_column,), True)
        if trained_pair:
            return cls(text, tuple(dict.fromkeys([trained_pair, *PAIR_FIELDS])), True)
        return cls(text, () if trained_text else PAIR_FIELDS, False)

    @classmethod
    def for_bundle(
        cls, bundle: "Bundle", text_column: Optional[str] = None, text_pair_column: Optional[str] = None
    ) -> "InputFields":
        """The fields for the columns the bundle's run trained on (its config.json), if recorded.

        Token tasks trained on word lists, not on the raw text they predict on: their columns say
        nothing about an input file. One head of a multi-task bundle (`Bundle.head`) reads the
        columns its own task trained on (the run's `tasks.<name>` over its shared data flags).
        """
        path = bundle.directory / artifacts.CONFIG_FILE
        if bundle.heads:
            raise ConfigError(_task_choice(bundle, None))
        fixed = TASKS[bundle.task].input_fields
        if fixed is not None:
            return cls((text_column or fixed[0],), (text_pair_column or fixed[1],), True)
        saved = artifacts.read_json(path, "run config") if path.is_file() else {}
        data = saved.get("data") if isinstance(saved, dict) else None
        head = bundle.metadata.get("head")
        if head is not None and isinstance(saved, dict):
            data = {**(data if isinstance(data, dict) else {}), **_task_settings(saved.get("tasks"), head)}
        trained_text, trained_pair = TASKS[bundle.task].trained_columns(data if isinstance(data, dict) else {})
        return cls.for_run(trained_text, trained_pair, text_column, text_pair_column)


def _task_settings(tasks: Any, name: str) -> dict[str, Any]:
    """One task's own settings in a multi-task run's config.json `tasks`: a list of entries with
    their `name`, or a mapping of names to entries; {} if it names no such task."""
    if isinstance(tasks, dict):
        entry = tasks.get(name)
    elif isinstance(tasks, list):
        entry = next((item for item in tasks if isinstance(item, dict) and item.get("name") == name), None)
    else:
        entry = None
    return entry if isinstance(entry, dict) else {}


ANY_FIELDS = InputFields()
"""The generic field names, for input that no run's columns describe."""


def read_inputs(
    stream: TextIO, fmt: str, source: str, fields: InputFields = ANY_FIELDS
) -> Iterator[tuple[int, TextInput]]:
    """Yield (line number, text or (text, pair)) from a CSV, TSV or JSONL stream, lazily.

    Labels are not needed (a label column is ignored). `fields` says which fields hold the text
    and the pair (default: the first present of TEXT_FIELDS and of PAIR_FIELDS); a CSV/TSV file
    needs a header.

    Raises:
        DataError: a malformed line, naming `source` and the line number.
    """
    if fmt == "jsonl":
        yield from _read_jsonl(stream, source, fields)
    elif fmt in {"csv", "tsv"}:
        yield from _read_delimited(stream, fmt, source, fields)
    else:
        raise DataError(f"{source}: unknown input format {fmt!r}; expected csv, tsv or jsonl")


def _record_input(record: dict[str, Any], source: str, number: int, fields: InputFields = ANY_FIELDS) -> TextInput:
    text_field = next((f for f in fields.text if f in record), None)
    if text_field is None:
        raise DataError(f"{source}: line {number}: no text field; expected one of {list(fields.text)}")
    text = record[text_field]
    pair_field = next((f for f in fields.pair if f in record and f != text_field), None)
    if pair_field is None and fields.pair_required:
        raise DataError(
            f"{source}: line {number}: no text pair field; the model reads text pairs: expected one of "
            f"{list(fields.pair)} (or pass --text_pair_column)"
        )
    values = [text] if pair_field is None else [text, record[pair_field]]
    for name, value in zip((text_field, pair_field), values):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{source}: line {number}: field {name!r} must be a non-empty string. Received: {value!r:.60}")
    return text if pair_field is None else (text, values[1])


def _read_jsonl(stream: TextIO, source: str, fields: InputFields = ANY_FIELDS) -> Iterator[tuple[int, TextInput]]:
    for number, record in _jsonl_records(stream, source, fields):
        yield number, _record_input(record, source, number, fields)


def _jsonl_records(stream: TextIO, source: str, fields: InputFields) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; a bare string is the text field's value."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DataError(f"{source}: line {number}: malformed JSON ({str(error).split(':')[0]})") from None
        if isinstance(record, str):
            record = {fields.text[0]: record}
        if not isinstance(record, dict):
            raise DataError(f"{source}: line {number}: expected a JSON object or string, got {type(record).__name__}")
        yield number, record


MESSAGES_FIELD = "messages"
"""The JSONL field of a chat prompt (a list of {"role", "content"} messages), for a generating model."""


def read_prompts(
    stream: TextIO, fmt: str, source: str, fields: InputFields = ANY_FIELDS
) -> Iterator[tuple[int, Prompt]]:
    """Yield (line number, prompt) from a CSV, TSV or JSONL stream, lazily, for a model that
    generates: the text field (`fields.text`, first `prompt` for a causal LM bundle), or in JSONL a
    chat conversation in `messages`.

    Raises:
        DataError: a malformed line or prompt, naming `source` and the line number.
    """
    if fmt != "jsonl":
        yield from read_inputs(stream, fmt, source, fields)
        return
    for number, record in _jsonl_records(stream, source, fields):
        messages = record.get(MESSAGES_FIELD)
        if messages is not None:
            yield number, check_messages(messages, f"{source}: line {number}: {MESSAGES_FIELD!r}")
        elif any(name in record for name in fields.text):
            yield number, _record_input(record, source, number, InputFields(fields.text, ()))
        else:
            raise DataError(f"{source}: line {number}: no prompt; expected a {fields.text[0]!r} string or "
                            f"{MESSAGES_FIELD!r} (a list of {{\"role\", \"content\"}} messages)")


def _read_delimited(
    stream: TextIO, fmt: str, source: str, fields: InputFields = ANY_FIELDS
) -> Iterator[tuple[int, TextInput]]:
    if fmt == "tsv":
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
    else:
        reader = csv.reader(stream, strict=True)
    header: Optional[list[str]] = None
    try:
        for values in reader:
            number = reader.line_num
            if not values or (len(values) == 1 and not values[0].strip()):
                continue
            if header is None:
                header = [v.strip() for v in values]
                continue
            if len(values) != len(header):
                raise DataError(f"{source}: line {number}: expected {len(header)} fields like the header, found {len(values)}")
            yield number, _record_input(dict(zip(header, values)), source, number, fields)
    except csv.Error as error:
        raise DataError(f"{source}: line {reader.line_num}: malformed {fmt.upper()} ({error})") from None


def input_format(path: str, default: str = "jsonl") -> str:
    """csv, tsv or jsonl from a file name's suffix (stdin, `-`, uses `default`)."""
    if path == "-":
        return default
    suffix = Path(path).suffix.lower()
    formats = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv", ".tab": "tsv", ".csv": "csv"}
    if suffix not in formats:
        raise DataError(f"{path}: unknown file type {suffix!r}; expected .csv, .tsv or .jsonl (or pass --input_format)")
    return formats[suffix]


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter): streaming in bounded memory."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def format_csv_row(prediction: AnyPrediction, labels: Sequence[str]) -> str:
    """One CSV line: the label, then the probability of each label (columns `p_<label>`); or the score."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(prediction.csv_fields(labels))
    return buffer.getvalue()


def csv_header(labels: Sequence[str], task: str = "classification") -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(TASKS[task].csv_columns(labels))
    return buffer.getvalue()
