"""How to spend 2 CPU cores on onnxruntime calls of one window each (issue 13's Predictor target):
one session with 2 intra-op threads, against one session with 1 intra-op thread called from 2
Python threads at once (onnxruntime releases the GIL in `run`, and a session takes concurrent
calls), with the 1-thread session called serially as the reference for scaling. Sessions are
opened as the Predictor opens them (`tfsft.inference.open_session`: intra-op spinning off).

Windows are real: SQuAD v1.1 dev questions with their contexts, tokenized by the bundle's own
tokenizer as (question, context) pairs cut at `--max_length` tokens, one window per call, as the
issue's naive loop does. Every model of the bundle (`model.fused.onnx`, `model.int8.onnx`, ...) is
measured in every mode; modes and models are interleaved round by round so that they share the
machine's load alike; each figure is the median over `--rounds`, and each ratio the median of the
per-round ratios against the first model's 2-thread session. Only onnxruntime calls are timed.

    python bench/ort_threads.py BUNDLE_DIR [--windows 96] [--rounds 5] [--max_length 384]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from tfsft.inference import open_session

SQUAD_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "squad-v1.1" / "dev-v1.1.json"
MODES = ("2 intra-op threads", "1 thread, serial", "1 thread, 2 Python threads")


def squad_windows(bundle: Path, count: int, max_length: int) -> list[dict[str, np.ndarray]]:
    """The first `count` dev questions as (question, context) windows of at most `max_length` tokens."""
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.enable_truncation(max_length, strategy="only_second")
    pairs = [
        (qa["question"], paragraph["context"])
        for article in json.loads(SQUAD_DEV.read_text())["data"]
        for paragraph in article["paragraphs"] for qa in paragraph["qas"]
    ][:count]
    windows = []
    for encoding in tokenizer.encode_batch(pairs):
        windows.append({
            "input_ids": np.array([encoding.ids], dtype=np.int32),
            "attention_mask": np.array([encoding.attention_mask], dtype=np.int32),
            "token_type_ids": np.array([encoding.type_ids], dtype=np.int32),
        })
    return windows


def timed(mode: str, sessions: dict[int, ort.InferenceSession], feeds: list[dict[str, np.ndarray]],
          pool: ThreadPoolExecutor) -> float:
    """Seconds for every window through one mode."""
    start = time.perf_counter()
    if mode == MODES[0]:
        for feed in feeds:
            sessions[2].run(None, feed)
    elif mode == MODES[1]:
        for feed in feeds:
            sessions[1].run(None, feed)
    else:
        list(pool.map(lambda feed: sessions[1].run(None, feed), feeds))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--windows", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max_length", type=int, default=384)
    args = parser.parse_args()

    models = sorted(path for path in args.bundle.glob("model*.onnx"))
    if not models:
        raise SystemExit(f"error: {args.bundle}: no model*.onnx files (expected an exported tfsft bundle)")
    windows = squad_windows(args.bundle, args.windows, args.max_length)
    sessions = {model.name: {threads: open_session(model, threads) for threads in (1, 2)} for model in models}
    feeds = {}
    for model in models:
        names = {i.name for i in sessions[model.name][2].get_inputs()}
        feeds[model.name] = [{k: v for k, v in window.items() if k in names} for window in windows]
        for threads in (1, 2):
            for feed in feeds[model.name][:4]:
                sessions[model.name][threads].run(None, feed)
    cells = [(model.name, mode) for model in models for mode in MODES]
    seconds: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
    with ThreadPoolExecutor(2) as pool:
        for round_index in range(args.rounds):
            shift = round_index % len(cells)
            for cell in cells[shift:] + cells[:shift]:
                seconds[cell].append(timed(cell[1], sessions[cell[0]], feeds[cell[0]], pool))
    reference = cells[0]
    tokens = statistics.mean(int(w["input_ids"].shape[1]) for w in windows)
    print(f"{len(windows)} SQuAD dev windows, {tokens:.0f} tokens on average, {args.rounds} rounds, "
          f"reference: {reference[0]} with {reference[1]}")
    print("| model | mode | windows/s | vs reference |\n|---|---|---:|---:|")
    for cell in cells:
        rate = len(windows) / statistics.median(seconds[cell])
        ratio = statistics.median(r / s for r, s in zip(seconds[reference], seconds[cell]))
        print(f"| {cell[0]} | {cell[1]} | {rate:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
