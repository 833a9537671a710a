"""Question answering (SQuAD v1.1) benchmark: training throughput of QA windows, two input
pipelines, and Predictor throughput against a one-window-per-call loop, in one run.

Part 1 trains the same model (the embedded MiniLM unless --model_name_or_path), from the same
weights, with the same seed, on the same windows (`tfsft.tasks.qa.make_windows`: question + context cut
into --max_seq_length windows overlapping by --doc_stride tokens) in this one process, through
(a) every window padded to --max_seq_length in random batches (the transformers run_qa recipe), and
(b) tfsft's LengthBatchedData (length-sorted windows, per-batch padding; a multiple of 8 with --xla).
It reports windows/s and train questions/s (windows/s times questions per window) of the last
epoch, timed from the end of its first step (which traces the train step) to its end, per wall
second and per CPU second of this process (steadier on a shared machine), the whole last epoch's
wall time, the padding fraction of each pipeline, the ratio (b)/(a), and each model's dev exact
match and F1 after training (`tfsft.tasks.qa.span_metrics`, the decoding training reports), so
a speed-up is not bought with accuracy. At the default size (about ten steps) the span head has
barely started to learn and both F1s are near zero: they only show nothing broke; compare
accuracy with a longer run (say --train_samples 4000 --epochs 2).

Part 2 (with --bundle, an exported QA bundle: a run's onnx/ directory) answers --eval_samples dev
questions with `Predictor(bundle, int8=False).predict_answers` (windows of all questions in
length-sorted batches) and with a naive loop over the same session: windows from make_windows on
the Predictor's encoder, each window its own onnxruntime call (batch 1, no padding), then
`best_spans` with the bundle's decoding settings. Both run end to end from (question, context)
strings, interleaved for --repeats rounds (median); it checks that they give identical answers
and reports the ratio Predictor/naive, and dev F1. If the bundle ships an int8 model, its
throughput and F1 against fp32 on the same questions too.

No timing is asserted anywhere: the numbers are for reading, and the ratios (measured in the same
run, under the same load) are what carry over between machines.

    python bench/qa.py                                        # part 1: 320 train questions, 1 epoch, batch 32
    python bench/qa.py --bundle RUN/onnx                      # and part 2 on 200 dev questions
    python bench/qa.py --parts 2 --bundle RUN/onnx --eval_samples 1000 --output qa.md
    python bench/qa.py --train_samples 2000 --epochs 2 --output qa.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfsft.tasks import qa  # noqa: E402
from tfsft.data import LengthBatchedData, sample  # noqa: E402
from tfsft.tokenize import MAX_CALL_TOKENS  # noqa: E402

SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad-v1.1"


class RandomBatches(LengthBatchedData):
    """Seeded random batches with no length grouping (baseline a, padded to max_seq_length)."""

    def batches(self) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.encoded))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]


def read_questions(path: str, limit: int, seed: int) -> qa.QAExamples:
    """A seeded sample of `limit` questions of a SQuAD file (all of them with 0)."""
    return sample(qa.read_qa_examples(path), limit or None, seed)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ part 1: training


def train_pipeline(name: str, checkpoint: Path, windows: qa.QAWindows, questions: int, dev: qa.QAExamples,
                   dev_windows: qa.QAWindows, pad_id: int, args) -> dict[str, Any]:
    """Train one fresh model on `windows` through pipeline `name`; its speeds and dev scores."""
    from tfsft.config import DataConfig, TrainConfig
    from tfsft.data import LabelMap
    from tfsft.evaluation import predict_logits
    from tfsft.modeling import build_classifier, feature_names, tf
    from tfsft.pipeline import XLA_PAD_MULTIPLE
    from tfsft.tasks.qa import SPAN_OUTPUTS, SpanReference, span_metrics
    from tfsft.training import compile_model, set_seed

    class StepClock(tf.keras.callbacks.Callback):
        """Wall and CPU time at the end of every step (eager calls on CPU return when done)."""

        def __init__(self):
            super().__init__()
            self.marks: list[tuple[float, float]] = []

        def on_train_batch_end(self, batch, logs=None):
            self.marks.append((time.perf_counter(), time.process_time()))

    label_map = LabelMap(SPAN_OUTPUTS)
    tf.keras.backend.clear_session()  # each pipeline from a fresh session
    set_seed(args.seed, deterministic=True)
    model, _ = build_classifier(checkpoint, label_map, args.model_name_or_path or "", "qa")
    names = feature_names(model)
    common = dict(shuffle=True, seed=args.seed, pad_id=pad_id, feature_names=names)
    if name == "a":
        data = RandomBatches(windows.encoded, windows.positions, args.batch_size, pad_multiple=args.max_seq_length,
                             **common)
    else:
        data = LengthBatchedData(windows.encoded, windows.positions, args.batch_size,
                                 pad_multiple=XLA_PAD_MULTIPLE if args.xla else 1, **common)
    config = TrainConfig(per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
                         num_train_epochs=args.epochs, seed=args.seed, xla=args.xla)
    compile_model(model, config, len(data) * args.epochs, "qa", steps_per_epoch=len(data))
    dataset = data.to_tf_dataset()
    for epoch in range(args.epochs):
        data.epoch = epoch
        clock = StepClock()
        start, cpu_start = time.perf_counter(), time.process_time()
        model.fit(dataset, epochs=1, verbose=2 if args.verbose else 0, callbacks=[clock])
        epoch_s, epoch_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    batches = data.batches()
    if len(clock.marks) >= 2:
        timed_windows = sum(len(b) for b in batches[1:])
        wall = clock.marks[-1][0] - clock.marks[0][0]
        cpu = clock.marks[-1][1] - clock.marks[0][1]
    else:  # one step: nothing to time after the trace
        timed_windows, wall, cpu = len(windows), epoch_s, epoch_cpu_s
    result = {
        "pipeline": name,
        "windows_per_s": timed_windows / wall,
        "questions_per_s": timed_windows / wall * questions / len(windows),
        "windows_per_cpu_s": timed_windows / cpu,
        "epoch_s": epoch_s,
        "steps": len(batches),
        "padding": data.padding_fraction(),
    }
    if dev is not None:
        dev_data = LengthBatchedData(dev_windows.encoded, dev_windows.positions, args.eval_batch_size, shuffle=False,
                                     pad_id=pad_id, feature_names=names)
        settings = DataConfig(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride)
        metrics, _ = span_metrics(SpanReference(dev, dev_windows, settings), predict_logits(model, dev_data), label_map)
        result.update(dev_exact_match=metrics["eval_exact_match"], dev_f1=metrics["eval_f1"])
    return result


def training_part(args) -> list[str]:
    from tfsft.checkpoint import embedded_checkpoint, load_tokenizer, text_encoder

    checkpoint = Path(args.model_name_or_path) if args.model_name_or_path else embedded_checkpoint()
    encoder = text_encoder(load_tokenizer(checkpoint), args.max_seq_length)
    train = read_questions(args.train_file, args.train_samples, args.seed)
    windows = qa.make_windows(encoder, train, args.doc_stride)
    dev = dev_windows = None
    if not args.no_eval:
        dev = read_questions(args.dev_file, args.eval_samples, args.seed)
        dev_windows = qa.make_windows(encoder, dev, args.doc_stride)
    results = []
    for name in args.pipelines:
        result = train_pipeline(name, checkpoint, windows, len(train), dev, dev_windows, encoder.pad_id, args)
        results.append(result)
        print(f"# done ({name}): {result}", file=sys.stderr, flush=True)

    titles = {
        "a": f"(a) pad every window to {args.max_seq_length}, random batches",
        "b": "(b) tfsft LengthBatchedData" + (" (multiple of 8, XLA)" if args.xla else ""),
    }
    by_name = {r["pipeline"]: r for r in results}
    base = by_name.get("a")
    model = args.model_name_or_path or f"embedded {checkpoint.parent.name}"
    evaluated = f"; dev: {len(dev)} questions, {len(dev_windows)} windows" if dev is not None else ""
    lines = [
        f"## Part 1: QA training throughput ({model})",
        "",
        f"SQuAD v1.1 train sample: {len(train)} questions, {len(windows)} windows of at most {args.max_seq_length} "
        f"tokens (doc_stride {args.doc_stride}, {np.mean(windows.encoded.lengths):.0f} tokens on average); "
        f"batch {args.batch_size}, {args.epochs} epoch(s), learning rate {args.learning_rate:g}, seed {args.seed}"
        f"{evaluated}; {os.cpu_count()} CPU cores. Speeds are of the last epoch after its first step (which "
        "traces); questions/s = windows/s x questions per window.",
        "",
        "| pipeline | train questions/s | windows/s | windows/CPU-s | epoch wall s | steps | padding "
        "| dev EM | dev F1 | (b) vs this, wall | (b) vs this, CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    b = by_name.get("b")
    for r in results:
        wall = b["windows_per_s"] / r["windows_per_s"] if b else float("nan")
        cpu = b["windows_per_cpu_s"] / r["windows_per_cpu_s"] if b else float("nan")
        em = f"{r['dev_exact_match']:.4f}" if "dev_f1" in r else "-"
        f1 = f"{r['dev_f1']:.4f}" if "dev_f1" in r else "-"
        lines.append(
            f"| {titles[r['pipeline']]} | {r['questions_per_s']:.2f} | {r['windows_per_s']:.2f} | "
            f"{r['windows_per_cpu_s']:.2f} | {r['epoch_s']:.1f} | {r['steps']} | {r['padding']:.1%} | {em} | {f1} | "
            f"{wall:.2f}x | {cpu:.2f}x |"
        )
    if base and b:
        wall, cpu = b["windows_per_s"] / base["windows_per_s"], b["windows_per_cpu_s"] / base["windows_per_cpu_s"]
        lines += ["", f"(b)/(a) training throughput: {wall:.2f}x per wall second, {cpu:.2f}x per CPU second."]
    return lines


# ----------------------------------------------------------------------------- part 2: Predictor


def naive_answers(predictor, examples: qa.QAExamples) -> list:
    """Answers from one onnxruntime call per window (batch 1, unpadded) on the Predictor's session,
    decoded with the bundle's settings, as `Predictor.predict_answers` decodes."""
    from tfsft.tokenize import pad_batch

    windows = predictor.windows(examples)
    logits = []
    for i in range(len(windows)):
        padded = pad_batch(windows.encoded, [i], predictor.encoder.pad_id, 1)
        feed = {name: padded[name].astype(predictor.input_dtypes[name], copy=False) for name in predictor.bundle.inputs}
        logits.append(predictor.session.run(None, feed)[0][0, : windows.encoded.lengths[i]])
    return predictor.decode_answers(logits, windows, examples)


def interleaved(steps: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median wall time of each step over `repeats` round-robin rounds, and each step's last result."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    results: dict[str, Any] = {}
    for _ in range(max(1, repeats)):
        for name, step in steps.items():
            start = time.perf_counter()
            results[name] = step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, results


def predictor_part(args) -> list[str]:
    from tfsft.inference import Predictor

    bundle = Path(args.bundle)
    predictor = Predictor(bundle, int8=False, batch_size=args.predictor_batch_size, num_threads=args.ort_threads)
    if predictor.bundle.task != "qa":
        sys.exit(f"{bundle} is a {predictor.bundle.task} bundle, not a question-answering one (--task qa)")
    dev = read_questions(args.dev_file, args.eval_samples, args.seed)
    inputs = list(zip(dev.questions, dev.contexts))
    plain = qa.QAExamples(ids=[str(i) for i in range(len(dev))], questions=dev.questions, contexts=dev.contexts,
                          answers=[[] for _ in range(len(dev))], source="inputs")
    steps: dict[str, Callable[[], Any]] = {
        "naive": lambda: naive_answers(predictor, plain),
        "predictor": lambda: predictor.predict_answers(inputs),
    }
    int8 = None
    if "int8" in predictor.bundle.files:
        int8 = Predictor(bundle, int8=True, batch_size=args.predictor_batch_size, num_threads=args.ort_threads)
        steps["int8"] = lambda: int8.predict_answers(inputs)
    warm = min(len(dev), 8)  # first calls of each at a few shapes, outside the timing
    naive_answers(predictor, plain.subset(range(warm)))
    predictor.predict_answers(inputs[:warm])
    if int8 is not None:
        int8.predict_answers(inputs[:warm])
    seconds, answers = interleaved(steps, args.repeats)

    naive, batched = answers["naive"], answers["predictor"]
    same = sum((a.answer, a.start, a.end) == (b.answer, b.start, b.end) for a, b in zip(naive, batched))
    score_gap = max((abs(a.score - b.score) for a, b in zip(naive, batched)), default=0.0)
    for i, (a, b) in enumerate(zip(naive, batched)):
        if (a.answer, a.start, a.end) != (b.answer, b.start, b.end):
            print(f"# answers differ on dev question {dev.ids[i]}: naive {a}, Predictor {b}", file=sys.stderr)
    golds = dev.answer_texts()
    scores = {name: qa.squad_scores([a.answer for a in result], golds) for name, result in answers.items()}
    stride = int(predictor.bundle.metadata.get("doc_stride", qa.DEFAULT_DOC_STRIDE))
    windows = qa.make_windows(predictor.encoder, plain, stride)
    titles = {
        "naive": "naive: one window per onnxruntime call (batch 1, unpadded)",
        "predictor": f"Predictor.predict_answers (length-sorted calls of up to {args.predictor_batch_size} windows, {MAX_CALL_TOKENS} tokens)",
        "int8": "Predictor.predict_answers, int8 model",
    }
    files = {"naive": predictor.model_path.name, "predictor": predictor.model_path.name}
    if int8 is not None:
        files["int8"] = int8.model_path.name
    lines = [
        f"## Part 2: Predictor throughput ({bundle})",
        "",
        f"SQuAD v1.1 dev sample: {len(dev)} questions, {len(windows)} windows of at most "
        f"{predictor.bundle.max_seq_length} tokens; median of {max(1, args.repeats)} interleaved round(s), each end to "
        f"end from (question, context) strings (windows, model calls, decoding); {os.cpu_count()} CPU cores.",
        "",
        "| answering | model file | questions/s | seconds | EM | F1 | vs naive |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in steps:
        lines.append(
            f"| {titles[name]} | {files[name]} | {len(dev) / seconds[name]:.1f} | {seconds[name]:.2f} | "
            f"{scores[name]['exact_match']:.4f} | {scores[name]['f1']:.4f} | {seconds['naive'] / seconds[name]:.2f}x |"
        )
    lines += [
        "",
        f"Predictor/naive throughput: {seconds['naive'] / seconds['predictor']:.2f}x. Identical answers (text, start, "
        f"end): {same}/{len(dev)}{'' if same == len(dev) else ' (MISMATCH: see stderr)'}; largest span score "
        f"difference {score_gap:.2g}.",
    ]
    if int8 is not None:
        agree = sum(a.answer == b.answer for a, b in zip(answers["int8"], batched))
        lines.append(
            f"int8 vs fp32: F1 {scores['int8']['f1']:.4f} vs {scores['predictor']['f1']:.4f} "
            f"(drop {(scores['predictor']['f1'] - scores['int8']['f1']) * 100:.2f} points), EM "
            f"{scores['int8']['exact_match']:.4f} vs {scores['predictor']['exact_match']:.4f}; same answer on "
            f"{agree}/{len(dev)} questions; int8/fp32 throughput {seconds['predictor'] / seconds['int8']:.2f}x."
        )
    else:
        lines.append(f"{bundle} ships no int8 model: no int8 comparison.")
    return lines


# ------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", default=str(SQUAD / "train-v1.1.json"))
    parser.add_argument("--dev_file", default=str(SQUAD / "dev-v1.1.json"))
    parser.add_argument("--model_name_or_path", default=None,
                        help="Checkpoint directory (default: the embedded MiniLM).")
    parser.add_argument("--parts", default="12", help="Which parts to run: '12', '1' or '2'.")
    parser.add_argument("--pipelines", default="ab", help="Part 1's pipelines, e.g. 'ab' or 'b'.")
    parser.add_argument("--train_samples", type=int, default=320, help="Train questions (0: all 87,599).")
    parser.add_argument("--eval_samples", type=int, default=200,
                        help="Dev questions (0: all 10,570) for part 1's F1 and part 2.")
    parser.add_argument("--no_eval", action="store_true", help="Part 1: skip the dev F1 after training.")
    parser.add_argument("--epochs", type=int, default=1, help="Epochs per pipeline; speeds are of the last one.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--max_seq_length", type=int, default=384)
    parser.add_argument("--doc_stride", type=int, default=qa.DEFAULT_DOC_STRIDE)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--xla", action="store_true", help="jit_compile the train step ((b) pads to a multiple of 8).")
    parser.add_argument("--threads", default=None, metavar="INTER,INTRA",
                        help="TensorFlow inter-op and intra-op thread pool sizes (default: TensorFlow's choice).")
    parser.add_argument("--bundle", default=None, help="Part 2: an exported QA bundle (a run's onnx/ directory).")
    parser.add_argument("--predictor_batch_size", type=int, default=32)
    parser.add_argument("--ort_threads", type=int, default=None, help="onnxruntime intra-op threads.")
    parser.add_argument("--repeats", type=int, default=3, help="Part 2: interleaved rounds (median).")
    parser.add_argument("--output", default=None, help="Also write the Markdown report to this file.")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not set(args.parts) <= {"1", "2"} or not args.parts:
        parser.error(f"--parts takes 1 and/or 2. Received: {args.parts!r}")
    if not set(args.pipelines) <= {"a", "b"} or not args.pipelines:
        parser.error(f"--pipelines takes a and/or b. Received: {args.pipelines!r}")
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/qa.py", *(sys.argv[1:] if argv is None else argv)])
    lines = ["# QA benchmark", "", f"`{command}`", ""]
    if "1" in args.parts:
        if args.threads:
            from tfsft.runtime import import_tensorflow

            tf = import_tensorflow()
            inter, intra = (int(n) for n in args.threads.split(","))
            tf.config.threading.set_inter_op_parallelism_threads(inter)
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        lines += training_part(args) + [""]
    if "2" in args.parts:
        if args.bundle:
            lines += predictor_part(args)
        else:
            lines += ["## Part 2: Predictor throughput", "",
                      "Skipped: no --bundle given (pass an exported QA bundle, a run's onnx/ directory)."]
    text = "\n".join(lines).rstrip() + "\n"
    print("\n" + text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
