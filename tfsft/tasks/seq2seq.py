"""Sequence-to-sequence fine-tuning (translation, summarisation): source -> target with an
encoder-decoder (T5, Marian, BART from the Hub, `TFAutoModelForSeq2SeqLM`).

The encoder reads the source (after `--source_prefix`, T5's "translate English to German: "),
the decoder is trained with teacher forcing on the target: transformers shifts the labels right
behind the decoder start token and computes the token cross-entropy itself, skipping
IGNORED_LABEL padding, as its own `run_translation` does. Evaluation: the loss over the target
tokens, and greedy generations of the first --max_generate_samples sources scored against the
targets with sacreBLEU's corpus BLEU and chrF (fractions 0..1, as every tfsft metric).

Without TensorFlow: examples are `CausalLMExamples` (sources as prompts, targets as completions),
so reading, sampling and the validation record are shared with causal_lm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import numpy as np

from tfsft.errors import DataError
from tfsft.tasks.causal_lm import CausalLanguageModeling, CausalLMExamples

if TYPE_CHECKING:
    from tfsft.config import DataConfig
    from tfsft.data import LabelMap


def read_seq2seq_examples(path: str, data: "DataConfig") -> CausalLMExamples:
    """Source/target examples of a JSONL, CSV or TSV file (`--source_column`, `--target_column`)."""
    from tfsft.data import read_records

    _, records = read_records(path, data.no_header)
    return examples_from_records(records, path, data)


def examples_from_records(records: Sequence[tuple[int, dict[str, Any]]], source: str, data: "DataConfig") -> CausalLMExamples:
    sources, targets, rows = [], [], []
    for number, record in records:
        where = f"{source}: row {number}"
        values = []
        for name in (data.source_column, data.target_column):
            value = record.get(name)
            if value is None:
                raise DataError(f"{where}: no {name!r} field; a seq2seq record has {data.source_column!r} and {data.target_column!r}")
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: {name!r} must be a non-empty string")
            values.append(value)
        sources.append(values[0])
        targets.append(values[1])
        rows.append(number)
    if not sources:
        raise DataError(f"{source}: no examples")
    return CausalLMExamples(sources, targets, rows, source)


@dataclass(frozen=True)
class TargetReference:
    """What evaluation scores a seq2seq model against: the examples and the encoded sources."""

    examples: CausalLMExamples
    source_ids: list[list[int]]
    eos_token_ids: tuple[int, ...]
    pad_id: int
    tokenizer: Any = None


def encode_pairs(encoder: Any, examples: CausalLMExamples, data: "DataConfig"):
    """(sources as EncodedTexts, target ids + eos as per-token labels, TargetReference)."""
    tokenizer = encoder.tokenizer
    sources = [data.source_prefix + text for text in examples.prompts]
    encoded = encoder.encode(sources)
    tokenizer.enable_truncation(data.max_target_length, strategy="longest_first")
    try:
        targets = tokenizer.encode_batch(list(examples.completions), add_special_tokens=True)
    finally:
        tokenizer.enable_truncation(encoder.max_length, strategy="longest_first")
    labels = np.empty(len(targets), dtype=object)
    labels[:] = [np.asarray(t.ids, dtype=np.int32) for t in targets]
    prompt_format = getattr(encoder, "prompt_format", None)
    eos = prompt_format.eos_token_ids if prompt_format is not None else ()
    reference = TargetReference(examples, [list(map(int, ids)) for ids in encoded.input_ids], tuple(eos), encoder.pad_id, tokenizer)
    return encoded, labels, reference


def corpus_scores(generations: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """sacreBLEU's corpus BLEU (13a tokenisation) and chrF, as fractions of 1."""
    import sacrebleu

    return {
        "bleu": float(sacrebleu.corpus_bleu(list(generations), [list(references)]).score) / 100.0,
        "chrf": float(sacrebleu.corpus_chrf(list(generations), [list(references)]).score) / 100.0,
    }


class SequenceToSequence(CausalLanguageModeling):
    """Shares causal_lm's examples, label-free outputs, loss before training, scoring flow and
    Predictor answers; differs in its model, loss, encoding, generation and scores."""

    name = "seq2seq"
    summary = "sequence-to-sequence (translation, summarisation): source -> target with an encoder-decoder"
    default_max_seq_length = 256
    encoder_decoder: ClassVar[bool] = True
    reads_columns = "--source_column and --target_column"

    def read(self, path: str, data: "DataConfig") -> CausalLMExamples:
        return read_seq2seq_examples(path, data)

    def examples(self, records: Sequence[tuple[int, dict[str, Any]]], source: str, data: "DataConfig") -> CausalLMExamples:
        return examples_from_records(records, source, data)

    def encode(self, encoder: Any, examples: Any, labels: np.ndarray, data: "DataConfig") -> tuple[Any, np.ndarray, Any]:
        return encode_pairs(encoder, examples, data)

    def reference_subset(self, reference: TargetReference, rows: np.ndarray) -> TargetReference:
        return TargetReference(
            reference.examples.subset(rows.tolist()), [reference.source_ids[i] for i in rows], reference.eos_token_ids,
            reference.pad_id, reference.tokenizer,
        )

    def describe(self, label_map: "LabelMap") -> str:
        return "source/target examples"

    def head_class(self, pooling: str, model_type: str):
        from transformers import TFAutoModelForSeq2SeqLM

        return TFAutoModelForSeq2SeqLM

    def objective(self) -> tuple[Any, list]:
        """transformers' own loss: the labels go into the model, which shifts them into decoder inputs."""
        return "auto", []

    def generate_ids(self, model: Any, reference: TargetReference, count: int, max_new_tokens: int, data: Any):
        """Keras' greedy target tokens for the first `count` sources of `reference`."""
        from tfsft.evaluation import keras_seq2seq_generate

        return keras_seq2seq_generate(model, reference.source_ids[:count], max_new_tokens, reference.eos_token_ids,
                                      reference.pad_id, batch_size=data.batch_size)

    def generation_scores(self, texts: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Corpus BLEU and chrF (sacreBLEU)."""
        return corpus_scores(texts, references)

    def sample_input(self, reference: TargetReference, index: int) -> dict[str, str]:
        return {"source": reference.examples.prompts[index]}

    def request_error(self, key: str) -> Optional[str]:
        return 'a seq2seq model generates text: POST /generate {"prompts": ["source text", ...], "max_new_tokens": N}'

    def bundle_settings(self, data: "DataConfig") -> dict[str, Any]:
        return {"max_new_tokens": data.max_new_tokens, "source_prefix": data.source_prefix}

    def trained_columns(self, saved: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
        return saved.get("source_column") or "source", None


TASK = SequenceToSequence()
