"""Training throughput of the embedded MiniLM on a fixed SST-2 slice, three input pipelines.

(a) every example padded to max_seq_length, random batches;
(b) random batches padded to their longest member (what the transformers TF examples do);
(c) tfsft: length-sorted windows, exact per-batch padding (a multiple of 8 with --xla).

All three train the same model from the same weights with the same seed in this one process,
then score SST-2 dev, so the ratios compare like with like on whatever load the machine has.

    python bench/train_throughput.py                       # 1,600 examples, 2 epochs each
    python bench/train_throughput.py --pipelines c --train_samples 0 --epochs 1   # full SST-2 epoch, (c) only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from tfsft.config import DataConfig, TrainConfig
from tfsft.data import LabelMap, LengthBatchedData, read_examples, sample
from tfsft.evaluation import predict_logits
from tfsft.tasks.classification import classification_metrics
from tfsft.modeling import build_classifier, embedded_checkpoint, load_tokenizer, text_encoder
from tfsft.pipeline import XLA_PAD_MULTIPLE
from tfsft.training import compile_classifier, set_seed

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue" / "SST-2"


class RandomBatches(LengthBatchedData):
    """Seeded random batches with no length grouping (baselines a and b)."""

    def batches(self) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.encoded))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]


def run_pipeline(name, checkpoint, label_map, encoded, labels, dev, dev_labels, args):
    set_seed(args.seed, deterministic=True)
    model, _ = build_classifier(checkpoint, label_map)
    config = TrainConfig(per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                         xla=args.xla)
    common = dict(shuffle=True, seed=args.seed, pad_id=0)
    if name == "a":
        data = RandomBatches(encoded, labels, args.batch_size, pad_multiple=args.max_seq_length, **common)
    elif name == "b":
        data = RandomBatches(encoded, labels, args.batch_size, pad_multiple=1, **common)
    else:
        data = LengthBatchedData(encoded, labels, args.batch_size, pad_multiple=XLA_PAD_MULTIPLE if args.xla else 1, **common)
    compile_classifier(model, config, len(data) * args.epochs)
    dataset = data.to_tf_dataset()
    total = 0.0
    for epoch in range(args.epochs):
        data.epoch = epoch
        start, cpu_start = time.perf_counter(), time.process_time()
        model.fit(dataset, epochs=1, verbose=2 if args.verbose else 0)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        total += seconds
    metrics, _ = classification_metrics(dev_labels, predict_logits(model, dev), label_map)
    return {
        "pipeline": name,
        "seconds": total,
        "examples_per_s": len(labels) / seconds,
        "examples_per_cpu_s": len(labels) / cpu_seconds,
        "padding": data.padding_fraction(),
        "dev_accuracy": metrics["eval_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_samples", type=int, default=1600, help="SST-2 training examples (0: all 67,349).")
    parser.add_argument("--pipelines", default="abc", help="Which pipelines to run, e.g. 'abc' or 'c'.")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per pipeline; speeds are of the last one.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--xla", action="store_true", help="jit_compile the train step (c pads to a multiple of 8).")
    parser.add_argument("--threads", default=None, metavar="INTER,INTRA",
                        help="TensorFlow inter-op and intra-op thread pool sizes (default: TensorFlow's choice).")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import tensorflow as tf

        inter, intra = (int(n) for n in args.threads.split(","))
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        tf.config.threading.set_intra_op_parallelism_threads(intra)

    checkpoint = embedded_checkpoint()
    encoder = text_encoder(load_tokenizer(checkpoint), args.max_seq_length)
    train = read_examples(str(SST2 / "train.tsv"), DataConfig())
    train = sample(train, args.train_samples or None, args.seed)
    dev_examples = read_examples(str(SST2 / "dev.tsv"), DataConfig())
    label_map = LabelMap.from_labels(train.labels)
    labels = label_map.encode(train)
    encoded = encoder.encode(train.texts)
    dev_labels = label_map.encode(dev_examples)
    dev = LengthBatchedData(encoder.encode(dev_examples.texts), dev_labels, 64, shuffle=False)

    results = []
    for name in args.pipelines:
        result = run_pipeline(name, checkpoint, label_map, encoded, labels, dev, dev_labels, args)
        results.append(result)
        print(f"# done ({name}): {result}", file=sys.stderr, flush=True)

    titles = {
        "a": f"(a) pad every example to {args.max_seq_length}",
        "b": "(b) random batches, per-batch padding",
        "c": "(c) tfsft length-batched",
    }
    by_name = {r["pipeline"]: r for r in results}
    print(
        f"\nSST-2 train slice: {len(labels)} examples, batch {args.batch_size}, {args.epochs} epoch(s), "
        f"{os.cpu_count()} CPU cores; speeds are of the last epoch (shapes already traced)\n"
    )
    print("| pipeline | examples/s | examples/CPU-s | total wall s | padding | dev accuracy | (c) vs this, wall | (c) vs this, CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        c = by_name.get("c")
        wall = c["examples_per_s"] / r["examples_per_s"] if c else float("nan")
        cpu = c["examples_per_cpu_s"] / r["examples_per_cpu_s"] if c else float("nan")
        print(
            f"| {titles[r['pipeline']]} | {r['examples_per_s']:.1f} | {r['examples_per_cpu_s']:.1f} | "
            f"{r['seconds']:.1f} | {r['padding']:.1%} | {r['dev_accuracy']:.4f} | {wall:.2f}x | {cpu:.2f}x |"
        )
    print("\nexamples/CPU-s counts this process's CPU time only, so it is steadier than wall time on a shared machine.")


if __name__ == "__main__":
    main()
