"""Predict with a Keras model and score it with its task's metrics (`tfsft.tasks`): metrics, report, plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tfsft.artifacts import CONFUSION_PLOT, write_json
from tfsft.data import LabelMap, LengthBatchedData
from tfsft.modeling import tf
from tfsft.tasks import IGNORED_LABEL, get_task


def predict_logits(model, data: LengthBatchedData) -> np.ndarray:
    """Logits for every example of `data`, in the examples' original order."""

    @tf.function(reduce_retracing=True)
    def forward(features):
        return tf.cast(model(features, training=False).logits, tf.float32)

    chunks = [forward(features).numpy() for features in _features_only(data)]
    logits = concat_padded(chunks)
    out = np.empty_like(logits)
    out[data.order()] = logits
    return out


def token_nll(model, data: LengthBatchedData) -> tuple[float, int]:
    """(summed cross-entropy, count) over the labelled tokens of `data` (a language model's
    completions), batch by batch: the [batch, width, vocabulary] logits never pile up."""

    @tf.function(reduce_retracing=True)
    def step(features, labels):
        logits = tf.cast(model(features, training=False).logits, tf.float32)
        mask = tf.not_equal(labels, IGNORED_LABEL)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.where(mask, labels, 0), logits=logits)
        weights = tf.cast(mask, tf.float32)
        return tf.reduce_sum(losses * weights), tf.reduce_sum(weights)

    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    total, count = 0.0, 0.0
    for features, labels in data:
        if encoder_decoder:  # the decoder reads the labels shifted right (teacher forcing)
            features = dict(features, labels=labels)
        nll, tokens = step(features, tf.constant(labels, tf.int32))
        total, count = total + float(nll), count + float(tokens)
    return total, int(count)


def banned_tokens(generation_config) -> tuple[int, ...]:
    """The single tokens a checkpoint's generation config never lets it generate: one-token
    `bad_words_ids` (Marian's pad) and `suppress_tokens`; ONNX generation suppresses the same."""
    banned = [words[0] for words in (getattr(generation_config, "bad_words_ids", None) or []) if len(words) == 1]
    banned += list(getattr(generation_config, "suppress_tokens", None) or [])
    return tuple(sorted({int(t) for t in banned}))


def greedy_generation_config(max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int,
                             decoder_start_token_id: Optional[int], banned: Sequence[int]):
    """A generation config holding nothing but greedy search (one beam; eos, pad, the start token and
    the banned tokens): what ONNX generation computes. A checkpoint's own config may add beams, length
    penalties, forced tokens or n-gram bans, which serving never applies. No eos means none (TF
    generation would read None as the model's own, so the config always replaces the model's)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=list(eos_token_ids) or None,
        pad_token_id=pad_token_id, decoder_start_token_id=decoder_start_token_id,
        bad_words_ids=[[int(t)] for t in banned] or None,
    )


def greedy_config(model, max_new_tokens: int, eos_token_ids: Sequence[int] | int | None, pad_token_id: int):
    """`greedy_generation_config` with the model's own start token and banned tokens."""
    eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or ())
    own = model.generation_config
    start = getattr(own, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)
    return greedy_generation_config(max_new_tokens, eos, pad_token_id, start, banned_tokens(own))


def generate_with_config(model, ids: np.ndarray, mask: np.ndarray, settings) -> np.ndarray:
    """Keras' `generate` with `settings` standing in for the model's own generation config."""
    from tfsft.modeling import quiet_transformers

    saved, model.generation_config = model.generation_config, settings
    try:
        with quiet_transformers():
            out = model.generate(tf.constant(ids, tf.int32), attention_mask=tf.constant(mask, tf.int32),
                                 generation_config=settings)
    finally:
        model.generation_config = saved
    return np.asarray(out)


def cut_at_eos(tokens: Sequence[int], eos: Sequence[int]) -> list[int]:
    """Generated tokens up to, without, the first eos."""
    tokens = [int(t) for t in tokens]
    return tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


def keras_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_ids: Sequence[int] | int | None,
    pad_token_id: int, batch_size: int = 8,
) -> list[list[int]]:
    """Keras' own greedy `generate` on `prompts` (token ids), left-padded in batches: each row's new
    tokens, up to and without an eos (`greedy_config`)."""
    from tfsft.generation import left_padded

    settings = greedy_config(model, max_new_tokens, eos_token_ids, pad_token_id)
    rows: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask, _ = left_padded(prompts[start:start + batch_size], pad_token_id)
        rows.extend(generate_with_config(model, ids, mask, settings)[:, ids.shape[1]:])
    return [cut_at_eos(row, settings.eos_token_id or ()) for row in rows]


def keras_seq2seq_generate(
    model, sources: Sequence[Sequence[int]], max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int,
    batch_size: int = 8,
) -> list[list[int]]:
    """Keras' own greedy `generate` of an encoder-decoder on `sources` (token ids, right-padded: absolute
    encoder positions, as BART has, start at each source's first token): each row's new tokens,
    without the decoder start token and up to and without an eos (`greedy_config`)."""
    from tfsft.generation import right_padded

    settings = greedy_config(model, max_new_tokens, eos_token_ids, pad_token_id)
    rows: list[list[int]] = []
    for start in range(0, len(sources), batch_size):
        ids, mask = right_padded(sources[start:start + batch_size], pad_token_id)
        rows.extend(row[1:] for row in generate_with_config(model, ids, mask, settings))
    return [cut_at_eos(row, settings.eos_token_id or ()) for row in rows]


def score_model(
    task: str, model, data: LengthBatchedData, reference: Any, label_map: LabelMap, prefix: str,
    decision: Optional[dict[str, Any]], settings: Any,
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, report) of a Keras model on encoded data, as its task scores one (`Task.score`)."""
    decided = {k: v for k, v in (decision or {}).items() if v is not None}
    return get_task(task).score(model, data, reference, label_map, prefix, decided, settings)


def concat_padded(chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate batches; per-token logits [batch, width, labels] are zero-padded to the widest."""
    if chunks[0].ndim < 3:
        return np.concatenate(chunks)
    width = max(chunk.shape[1] for chunk in chunks)
    return np.concatenate([np.pad(c, ((0, 0), (0, width - c.shape[1]), (0, 0))) for c in chunks])


def _features_only(data: LengthBatchedData):
    for item in data:
        yield item[0] if isinstance(item, tuple) else item


def keras_scores(task: str, metric: str) -> bool:
    """Whether Keras' own validation pass yields `val_<metric>` for this task; any other metric is
    scored by `task_metrics` after each epoch (F1, MCC, correlations, thresholds and spans do not stream)."""
    return metric in get_task(task).keras_metrics


def task_metrics(
    task: str,
    reference: Any,
    logits: np.ndarray,
    label_map: LabelMap,
    prefix: str = "eval",
    decision: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, report) of the task's logits against `reference` (the labels, or for question
    answering the questions and windows). `decision`: settings fixed by the user or chosen on
    validation (the multilabel threshold, the SQuAD v2 null threshold)."""
    return get_task(task).metrics(reference, logits, label_map, prefix, {k: v for k, v in (decision or {}).items() if v is not None})


def plot_confusion_matrix(matrix: list[list[int]], names: list[str], path: Path, title: str = "") -> Path:
    """Save the confusion matrix (rows: true label, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    size = max(4.0, 0.6 * len(names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    threshold = counts.max() / 2 if counts.size else 0
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_evaluation(directory: Path, metrics: dict[str, float], report: dict[str, Any], name: str) -> None:
    """Write `<name>_report.json`, and its confusion-matrix PNG when it has one, into `directory`; a
    language model's sample generations go to `generations.jsonl` (`<name>_generations.jsonl`)."""
    generations = report.pop("generations", None)
    write_json(directory / f"{name}_report.json", report)
    if generations is not None:
        from tfsft.artifacts import write_text

        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in generations)
        write_text(directory / ("generations.jsonl" if name == "eval" else f"{name}_generations.jsonl"), lines)
    if "confusion_matrix" not in report:
        return
    plot_name = CONFUSION_PLOT if name == "eval" else f"{name}_{CONFUSION_PLOT}"
    plot_confusion_matrix(report["confusion_matrix"], report["labels"], directory / plot_name, f"{name} confusion matrix")
