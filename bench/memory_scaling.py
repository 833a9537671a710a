"""Peak memory of `--streaming` training as the corpus grows: 10k, 100k and 1M synthetic rows.

Rows are generated on the fly from the SST-2 vocabulary (words sampled from the training
sentences, sentence lengths drawn from SST-2's) into a temp CSV. Each size runs in a fresh
subprocess that builds the token cache (one read pass, chunked, parallel tokenization) and
trains a few steps on the stream; it reports its own peak RSS (getrusage ru_maxrss). The
target is a 1M/10k ratio under 1.5x.

    python bench/memory_scaling.py [--sizes 10000,100000,1000000] [--steps 20] [--model tiny|embedded]

`tiny` (default) is a randomly initialised 2-layer, hidden-32 BERT with the MiniLM tokenizer:
memory is about the data path, and the embedded MiniLM is slow on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"


def write_corpus(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` synthetic sentence,label rows: SST-2 words, SST-2 sentence lengths, written in chunks."""
    import numpy as np

    lines = SST2.read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t")[0].split() for line in lines]
    vocab = np.asarray(sorted({word for words in sentences for word in words}))
    lengths = np.asarray([len(words) for words in sentences if words])
    rng = np.random.default_rng(seed)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            sizes = rng.choice(lengths, size=n)
            words = vocab[rng.integers(0, len(vocab), size=int(sizes.sum()))]
            labels = rng.integers(0, 2, size=n)
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            writer.writerows([" ".join(words[offsets[i] : offsets[i + 1]]), int(labels[i])] for i in range(n))


def make_tiny_checkpoint(directory: Path) -> None:
    import shutil

    from transformers import BertConfig, TFBertModel

    from tfsft.modeling import embedded_checkpoint

    model = TFBertModel(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    ))
    model(model.dummy_inputs)
    model.save_pretrained(str(directory))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(embedded_checkpoint() / name, directory / name)


def child(csv_path: str, checkpoint: str, cache_dir: str, steps: int) -> None:
    """Cache (write) + stream-train `steps` steps; prints one JSON line with peak RSS."""
    from tfsft.config import DataConfig, TrainConfig
    from tfsft.modeling import build_classifier, feature_names, load_tokenizer, text_encoder
    from tfsft.streaming import StreamingData, open_cache
    from tfsft.training import compile_model

    data_config = DataConfig(train_file=csv_path, max_seq_length=128)
    encoder = text_encoder(load_tokenizer(Path(checkpoint)), data_config.max_seq_length)
    start = time.perf_counter()
    cache = open_cache(csv_path, encoder, data_config, cache_dir)
    cache_seconds = time.perf_counter() - start
    rss_after_cache = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, _ = build_classifier(Path(checkpoint), cache.label_map)
    data = StreamingData(cache, 32, seed=0, pad_id=encoder.pad_id, feature_names=feature_names(model))
    compile_model(model, TrainConfig(), len(data), "classification")
    start = time.perf_counter()
    history = model.fit(data.to_tf_dataset().take(steps), epochs=1, verbose=0)
    print(json.dumps({
        "rows": cache.num_examples, "batches_per_epoch": len(data), "cache_s": round(cache_seconds, 1),
        "train_s": round(time.perf_counter() - start, 1), "loss": round(history.history["loss"][-1], 4),
        "peak_rss_after_cache_mb": round(rss_after_cache / 1024, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--child", nargs=4, metavar=("CSV", "CHECKPOINT", "CACHE_DIR", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child[:3], int(args.child[3]))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="tfsft-memory-") as tmp:
        work = Path(tmp)
        if args.model == "tiny":
            checkpoint = work / "tiny"
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                            f"from bench.memory_scaling import make_tiny_checkpoint as m; from pathlib import Path; "
                            f"m(Path({str(checkpoint)!r}))"], check=True, cwd=ROOT)
        else:
            from tfsft.modeling import embedded_checkpoint

            checkpoint = embedded_checkpoint()
        results = []
        for size in sizes:
            corpus = work / f"corpus-{size}.csv"
            write_corpus(corpus, size)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(corpus), str(checkpoint), str(work / "cache"), str(args.steps)],
                capture_output=True, text=True, cwd=ROOT,
            )
            if out.returncode != 0:
                sys.exit(f"{size} rows failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["csv_mb"] = round(corpus.stat().st_size / 2**20, 1)
            results.append(result)
            corpus.unlink()
            print(json.dumps(result), flush=True)
    print(f"\nmodel: {args.model}; {args.steps} training steps per size, batch 32, max_seq_length 128")
    print("| rows | CSV MB | cache s | peak RSS after cache MB | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']} | {r['csv_mb']} | {r['cache_s']} | {r['peak_rss_after_cache_mb']} | {r['peak_rss_mb']} |")
    print(f"\npeak RSS ratio {results[-1]['rows']}/{results[0]['rows']} rows: "
          f"{results[-1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.2f}x (target < 1.5x)")


if __name__ == "__main__":
    main()
