"""Inference benchmark: Keras (tf.function) vs ONNX fp32 unfused / fused / int8, in one run.

Prints Markdown tables: median latency (variants measured round-robin, spinning off) at batch 1
(lengths 8, 32, 128), throughput at batch 32 (lengths 32, 128), each with ratios against the
baselines measured here; the Predictor on a real evaluation file (length-sorted, per-batch
padding) against padding every text to max_seq_length; and, for a classifier, fp32 and int8
accuracy on that file. Pass a run directory to include the Keras model (a bare bundle skips it).
The bundle must ship all three models (`tfsft export RUN_DIR --export_variants fp32,fused,int8`).

`--against OTHER` instead prices two bundles against each other (a distilled student and its
teacher, say): each one's fp32 model (fused where it ships one) on the same shapes, interleaved,
and the Predictor on the same evaluation texts, with OTHER's cost over the first's and both
accuracies (classification); any variants shipped will do.

    python bench/inference.py RUN_DIR_OR_BUNDLE [--eval_file F] [--repeats N]
    python bench/inference.py STUDENT_RUN --against TEACHER_RUN
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfsft import artifacts  # noqa: E402
from tfsft.inference import Predictor, open_session  # noqa: E402

LATENCY_LENGTHS = (8, 32, 128)
THROUGHPUT_LENGTHS = (32, 128)
THROUGHPUT_BATCH = 32


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int, budget_s: float = 20.0) -> dict[str, float]:
    """Median wall time of each step, measured round-robin after one warm-up each.

    Interleaving gives every variant the same share of a busy machine's noise, so their ratios
    stay meaningful even when absolute times drift; stops early once `budget_s` is spent.
    """
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < repeats and (rounds < 3 or time.perf_counter() < deadline):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


def synthetic_batch(batch: int, length: int, names) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(batch, length), dtype=np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {name: features[name] for name in names}


def onnx_runner(path: Path, threads: int | None, spinning: bool = False):
    """A session as the Predictor opens one (`tfsft.inference.open_session`): spinning off, else
    the idle pool of one session busy-waits while the next runs."""
    session = open_session(Path(path), threads, spinning)
    return lambda features: session.run(None, features)


def keras_runner(run_dir: Path):
    from tfsft.lora import load_run_model
    from tfsft.modeling import tf

    model = load_run_model(artifacts.run_model_dir(run_dir))

    @tf.function(reduce_retracing=True)
    def forward(features):
        return model(features, training=False).logits

    return lambda features: forward({k: tf.constant(v) for k, v in features.items()}).numpy()


def shape_table(runners: dict, names, repeats: int) -> list[str]:
    baseline = "onnx fp32"
    rows = ["| shape | " + " | ".join(runners) + " | fused/fp32 speedup | int8/fp32 speedup |",
            "|---" * (len(runners) + 3) + "|"]
    shapes = [(1, n) for n in LATENCY_LENGTHS] + [(THROUGHPUT_BATCH, n) for n in THROUGHPUT_LENGTHS]
    for batch, length in shapes:
        features = synthetic_batch(batch, length, names)
        rounds = repeats if batch == 1 else max(3, repeats // 10)
        seconds = interleaved_medians({name: (lambda r=run: r(features)) for name, run in runners.items()}, rounds)
        cells = [f"{s * 1000:.1f} ms" if batch == 1 else f"{batch / s:.0f} ex/s" for s in seconds.values()]
        fused = seconds[baseline] / seconds["onnx fp32 fused"]
        int8 = seconds[baseline] / seconds["onnx int8"] if "onnx int8" in seconds else float("nan")
        rows.append(f"| batch {batch} x {length} | " + " | ".join(cells) + f" | {fused:.2f}x | {int8:.2f}x |")
    return rows


def predictor_table(bundle: Path, eval_file: str, limit: int) -> list[str]:
    from tfsft.inference import input_format, read_inputs

    with open(eval_file, encoding="utf-8") as f:
        texts = [t for _, t in read_inputs(f, input_format(eval_file), eval_file)][:limit]
    predictor = Predictor(bundle, batch_size=THROUGHPUT_BATCH)
    start = time.perf_counter()
    predictor.predict(texts)
    sorted_s = time.perf_counter() - start
    encoded = predictor.encode(texts)
    width = predictor.bundle.max_seq_length
    start = time.perf_counter()
    for begin in range(0, len(texts), THROUGHPUT_BATCH):
        rows = range(begin, min(begin + THROUGHPUT_BATCH, len(texts)))
        padded = {name: np.zeros((len(rows), width), np.int32) for name in predictor.bundle.inputs}
        for r, i in enumerate(rows):
            n = encoded.lengths[i]
            padded["input_ids"][r, :n] = encoded.input_ids[i]
            padded["attention_mask"][r, :n] = 1
        predictor.run(padded)
    padded_s = time.perf_counter() - start
    return [
        f"| Predictor on {Path(eval_file).name} ({len(texts)} texts, fused fp32) | examples/s | ratio |",
        "|---|---|---|",
        f"| pad every text to max_seq_length={width} | {len(texts) / padded_s:.0f} | 1.00x |",
        f"| length-sorted, per-batch padding | {len(texts) / sorted_s:.0f} | {padded_s / sorted_s:.2f}x |",
    ]


def int8_accuracy_table(bundle: Path, labels, eval_file: str) -> list[str]:
    """Accuracy of the fused fp32 and the int8 model on a labelled evaluation file (classification)."""
    inputs, gold = labelled_inputs(eval_file)
    if not set(gold) <= set(labels):
        return [f"({Path(eval_file).name}'s labels are not the model's: no int8 accuracy)"]
    rows = [f"| {Path(eval_file).name} ({len(inputs)} labelled examples) | accuracy |", "|---|---|"]
    accuracies = {}
    for name, int8 in (("fp32 fused", False), ("int8", True)):
        predictions = Predictor(bundle, int8=int8).predict(inputs)
        accuracies[name] = float(np.mean([p.label == y for p, y in zip(predictions, gold)]))
        rows.append(f"| {name} | {accuracies[name]:.4f} |")
    rows.append(f"| int8 drop | {(accuracies['fp32 fused'] - accuracies['int8']) * 100:.2f} points |")
    return rows


def best_fp32(predictor: Predictor) -> tuple[str, str]:
    """The fp32 model a bundle's Predictor runs: the fused one where it ships one."""
    files = predictor.bundle.files
    variant = "fused" if "fused" in files else "model"
    return variant, files[variant]


def labelled_inputs(eval_file: str):
    """An evaluation file's inputs (texts, or (text, pair) tuples) and labels."""
    from tfsft.config import DataConfig
    from tfsft.data import read_examples

    examples = read_examples(eval_file, DataConfig())
    inputs = list(zip(examples.texts, examples.pairs)) if examples.pairs else list(examples.texts)
    return inputs, examples.labels


def against_tables(bundles: dict[str, Path], eval_file: str, limit: int, repeats: int, threads, spinning) -> list[str]:
    """Two bundles' fp32 models on the same shapes (interleaved) and their Predictors on the same
    texts; the ratio is the second's cost over the first's."""
    first, second = bundles
    predictors = {name: Predictor(bundle, batch_size=THROUGHPUT_BATCH) for name, bundle in bundles.items()}
    models = {name: best_fp32(predictor) for name, predictor in predictors.items()}
    runners = {name: onnx_runner(bundles[name] / file, threads, spinning) for name, (_, file) in models.items()}
    inputs = {name: predictor.bundle.inputs for name, predictor in predictors.items()}
    rows = [f"| shape | {first} ({models[first][0]}) | {second} ({models[second][0]}) | {second}/{first} cost |",
            "|---|---|---|---|"]
    shapes = [(1, n) for n in LATENCY_LENGTHS] + [(THROUGHPUT_BATCH, n) for n in THROUGHPUT_LENGTHS]
    for batch, length in shapes:
        features = {name: synthetic_batch(batch, length, inputs[name]) for name in bundles}
        rounds = repeats if batch == 1 else max(3, repeats // 10)
        seconds = interleaved_medians(
            {name: (lambda r=runners[name], f=features[name]: r(f)) for name in bundles}, rounds)
        cells = [f"{s * 1000:.1f} ms" if batch == 1 else f"{batch / s:.0f} ex/s" for s in seconds.values()]
        rows.append(f"| batch {batch} x {length} | " + " | ".join(cells) + f" | {seconds[second] / seconds[first]:.2f}x |")
    if not os.path.isfile(eval_file):
        return rows
    texts, labels = labelled_inputs(eval_file)
    texts, labels = texts[:limit], labels[:limit]
    rows += ["", f"| Predictor on {Path(eval_file).name} ({len(texts)} texts) | {first} | {second} | "
                 f"{second}/{first} cost |", "|---|---|---|---|"]
    timings, accuracies = {}, {}
    for name, predictor in predictors.items():
        predictor.predict(texts[:THROUGHPUT_BATCH])
        start = time.perf_counter()
        predictions = predictor.predict(texts)
        timings[name] = time.perf_counter() - start
        if predictor.bundle.task == "classification":
            accuracies[name] = float(np.mean([p.label == y for p, y in zip(predictions, labels)]))
    rows.append(f"| texts/s (fp32) | {len(texts) / timings[first]:.1f} | {len(texts) / timings[second]:.1f} | "
                f"{timings[second] / timings[first]:.2f}x |")
    if len(accuracies) == 2:
        rows.append(f"| accuracy | {accuracies[first]:.4f} | {accuracies[second]:.4f} | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="A run directory (with onnx/) or a bundle directory.")
    parser.add_argument("--eval_file", default=str(Path(__file__).resolve().parents[2] / "shared/data/glue/SST-2/dev.tsv"))
    parser.add_argument("--eval_limit", type=int, default=872)
    parser.add_argument("--repeats", type=int, default=100, help="Rounds at batch 1 (a tenth at batch 32).")
    parser.add_argument("--spinning", action="store_true", help="Let onnxruntime threads busy-wait between runs.")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
    parser.add_argument("--against", default=None, help="Another run or bundle to price this one against.")
    args = parser.parse_args()
    path = Path(args.path)
    bundle = path / artifacts.ONNX_DIR if (path / artifacts.ONNX_DIR).is_dir() else path
    if args.against:
        other = Path(args.against)
        other_bundle = other / artifacts.ONNX_DIR if (other / artifacts.ONNX_DIR).is_dir() else other
        names = [b.parent.name if b.name == artifacts.ONNX_DIR else b.name for b in (bundle, other_bundle)]
        names = names if names[0] != names[1] else ["this", "against"]
        bundles = dict(zip(names, (bundle, other_bundle)))
        print(f"# {bundle} against {other_bundle} ({os.cpu_count()} CPUs)\n")
        print("\n".join(against_tables(bundles, args.eval_file, args.eval_limit, args.repeats, args.threads,
                                        args.spinning)))
        return
    meta = Predictor(bundle).bundle
    if "model" not in meta.files or "fused" not in meta.files:
        sys.exit(f"{bundle} ships {sorted(meta.files.values())}; this benchmark compares the unfused and fused fp32 "
                 "models: re-export with `tfsft export RUN_DIR --export_variants fp32,fused,int8`")
    runners = {}
    if bundle != path:
        runners["keras tf.function"] = keras_runner(path)
    runners["onnx fp32"] = onnx_runner(bundle / meta.files["model"], args.threads, args.spinning)
    runners["onnx fp32 fused"] = onnx_runner(bundle / meta.files["fused"], args.threads, args.spinning)
    if "int8" in meta.files:
        runners["onnx int8"] = onnx_runner(bundle / meta.files["int8"], args.threads, args.spinning)
    print(f"# {bundle} ({os.cpu_count()} CPUs)\n")
    print("\n".join(shape_table(runners, meta.inputs, args.repeats)))
    report = meta.report()
    drops = {k: v for k, v in (report or {}).get("int8", {}).items() if k.endswith("_drop")}
    for key, drop in drops.items():  # the run's metric for best model: accuracy_drop, f1_drop, ...
        print(f"\nint8 {key.replace('_', ' ')}: {drop * 100:.2f} points "
              f"(label agreement {report['int8'].get('label_agreement', float('nan')):.4f})\n")
    if meta.task == "qa":
        print("A question-answering bundle's Predictor is measured by bench/qa.py (--parts 2 --bundle).")
    elif os.path.isfile(args.eval_file):
        print("\n".join(predictor_table(bundle, args.eval_file, args.eval_limit)))
        if "int8" in meta.files and meta.task == "classification":
            print()
            print("\n".join(int8_accuracy_table(bundle, meta.labels, args.eval_file)))


if __name__ == "__main__":
    main()
