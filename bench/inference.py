"""Inference benchmark: Keras (tf.function) vs ONNX fp32 unfused / fused / int8, in one run.

Prints Markdown tables: median latency at batch 1 (lengths 8, 32, 128), throughput at batch 32
(lengths 32, 128), each with ratios against the baselines measured here; and the Predictor on a
real evaluation file (length-sorted, per-batch padding) against padding every text to
max_seq_length. Pass a run directory to include the Keras model (a bare bundle skips it).

    python bench/inference.py RUN_DIR_OR_BUNDLE [--eval_file F] [--repeats N]
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
from tfsft.inference import Predictor  # noqa: E402

LATENCY_LENGTHS = (8, 32, 128)
THROUGHPUT_LENGTHS = (32, 128)
THROUGHPUT_BATCH = 32


def median_seconds(step: Callable[[], object], repeats: int, budget_s: float = 10.0) -> float:
    """Median wall time of `step` after one warm-up, stopping early when `budget_s` is spent."""
    step()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_batch(batch: int, length: int, names) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(batch, length), dtype=np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {name: features[name] for name in names}


def onnx_runner(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda features: session.run(None, features)


def keras_runner(run_dir: Path):
    from tfsft.modeling import load_finetuned, tf

    model = load_finetuned(artifacts.run_model_dir(run_dir))

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
        seconds = {name: median_seconds(lambda r=run: r(features), repeats) for name, run in runners.items()}
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
        predictor._run(padded)
    padded_s = time.perf_counter() - start
    return [
        f"| Predictor on {Path(eval_file).name} ({len(texts)} texts, fused fp32) | examples/s | ratio |",
        "|---|---|---|",
        f"| pad every text to max_seq_length={width} | {len(texts) / padded_s:.0f} | 1.00x |",
        f"| length-sorted, per-batch padding | {len(texts) / sorted_s:.0f} | {padded_s / sorted_s:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="A run directory (with onnx/) or a bundle directory.")
    parser.add_argument("--eval_file", default=str(Path(__file__).resolve().parents[2] / "shared/data/glue/SST-2/dev.tsv"))
    parser.add_argument("--eval_limit", type=int, default=872)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
    args = parser.parse_args()
    path = Path(args.path)
    bundle = path / artifacts.ONNX_DIR if (path / artifacts.ONNX_DIR).is_dir() else path
    meta = Predictor(bundle).bundle
    runners = {}
    if bundle != path:
        runners["keras tf.function"] = keras_runner(path)
    runners["onnx fp32"] = onnx_runner(bundle / meta.files["model"], args.threads)
    runners["onnx fp32 fused"] = onnx_runner(bundle / meta.files["fused"], args.threads)
    if "int8" in meta.files:
        runners["onnx int8"] = onnx_runner(bundle / meta.files["int8"], args.threads)
    print(f"# {bundle} ({os.cpu_count()} CPUs)\n")
    print("\n".join(shape_table(runners, meta.inputs, args.repeats)))
    report = meta.report()
    if report and "int8" in report:
        print(f"\nint8 accuracy drop: {report['int8']['accuracy_drop'] * 100:.2f} points "
              f"(label agreement {report['int8']['label_agreement']:.4f})\n")
    if os.path.isfile(args.eval_file):
        print("\n".join(predictor_table(bundle, args.eval_file, args.eval_limit)))


if __name__ == "__main__":
    main()
