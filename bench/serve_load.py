"""Server under load: requests/s, p50/p99 latency, errors and the batch sizes that formed, per
serving mode, against the in-process ceiling.

Starts `scripts/serve.py BUNDLE` on a free loopback port (127.0.0.1 only) once per mode, drives
it with `--clients` concurrent keep-alive clients (threads) for `--duration` seconds, each
request holding `--texts_per_request` texts drawn from a real evaluation file, reads the
server's /metrics before and after, then stops it. Modes: one request at a time (one batch
worker taking one request's texts), one model call per request in a thread pool
(`--no_micro_batching`), micro-batching with one batch in flight, and the default
(micro-batching, two batches in flight); `--workers N` adds the default mode with N processes.
The in-process ceiling is the same texts through the Predictor in batches of `--clients`
requests, without HTTP, in this process. The clients run on the same machine as the server, so
they share its cores.

    python bench/serve_load.py BUNDLE [--clients 16] [--duration 10] [--texts_per_request 1] [--max_words N]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfsft.inference import input_format, read_inputs  # noqa: E402
from tfsft.serving import Batching  # noqa: E402

START_TIMEOUT_S = 120
MAX_CLIENTS = 256
MAX_DURATION_S = 300


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`scripts/serve.py` in its own process; always stopped on exit from the `with` block."""

    def __init__(self, bundle: str, extra: list[str]):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "serve.py"), bundle, "--host", "127.0.0.1",
             "--port", str(self.port), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"serve.py exited with {self.process.returncode} before answering /health")
            if time.monotonic() > deadline:
                self.__exit__()
                raise SystemExit(f"serve.py did not answer /health within {START_TIMEOUT_S} s")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def drive(port: int, texts: list[str], clients: int, duration_s: float, per_request: int, seed: int = 0) -> LoadResult:
    """`clients` threads posting back to back over keep-alive connections until the deadline."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_barrier = threading.Barrier(clients + 1)
    deadline_box: list[float] = []

    def client(index: int) -> None:
        rng = random.Random(seed + index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start_barrier.wait()
        deadline = deadline_box[0]
        while time.perf_counter() < deadline:
            body = json.dumps({"texts": rng.sample(texts, per_request)}).encode()
            begin = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"content-type": "application/json"})
                response = conn.getresponse()
                ok = response.status == 200 and len(json.loads(response.read())["predictions"]) == per_request
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            if ok:
                latencies[index].append((time.perf_counter() - begin) * 1000)
            else:
                errors[index] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline_box.append(time.perf_counter() + duration_s)
    began = time.perf_counter()
    start_barrier.wait()
    for thread in threads:
        thread.join(timeout=duration_s + 60)
    seconds = time.perf_counter() - began
    flat = [ms for per_client in latencies for ms in per_client]
    return LoadResult(requests=len(flat), errors=sum(errors), seconds=seconds, latencies_ms=flat)


def metrics_snapshot(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


BATCH_BINS = ((1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 256))


def batch_distribution(before: dict, after: dict) -> tuple[float, dict[str, float]]:
    """(mean inputs per Predictor call, {bin: share of calls}) between two /metrics snapshots."""
    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    calls = delta("tfsft_batch_texts_count")
    if not calls:
        return float("nan"), {}
    cumulative = {hi: delta("tfsft_batch_texts_bucket", (("le", f"{float(hi)}"),)) for _, hi in BATCH_BINS}
    shares, below = {}, 0.0
    for lo, hi in BATCH_BINS:
        shares[f"{lo}" if lo == hi else f"{lo}-{hi}"] = (cumulative[hi] - below) / calls
        below = cumulative[hi]
    return delta("tfsft_batch_texts_sum") / calls, shares


def in_process_ceiling(bundle: str, texts: list[str], batch: int, duration_s: float, precision: str,
                       num_threads: int | None, seed: int = 0) -> float:
    """Texts/s of the Predictor alone on batches of `batch` texts drawn like the clients draw them."""
    from tfsft.inference import Bundle, Predictor, choose_precision

    choice = choose_precision(Bundle.load(bundle), precision)
    predictor = Predictor(bundle, int8=choice.int8, num_threads=num_threads)
    rng = random.Random(seed)
    predictor.predict(rng.sample(texts, batch))
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < duration_s:
        predictor.predict(rng.sample(texts, batch))
        done += batch
    return done / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="An ONNX bundle directory (RUN_DIR/onnx).")
    parser.add_argument("--eval_file", default=str(ROOT.parent / "shared/data/glue/SST-2/dev.tsv"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds of load per mode.")
    parser.add_argument("--texts_per_request", type=int, default=1)
    parser.add_argument("--max_words", type=int, default=None,
                        help="Cut each text to its first N words: short queries, where per-call overhead dominates.")
    parser.add_argument("--max_batch_texts", type=int, default=64)
    parser.add_argument("--max_wait_ms", type=float, default=0.0)
    parser.add_argument("--max_batched_chars", type=int, default=None,
                        help="The default mode's length limit for micro-batched requests (default: the server's).")
    parser.add_argument("--batch_concurrency", type=int, default=None,
                        help="Batches in flight in the default mode (default: the server's default).")
    parser.add_argument("--num_threads", type=int, default=None, help="onnxruntime intra-op threads in the server.")
    parser.add_argument("--precision", choices=("fp32", "int8", "auto"), default="fp32",
                        help="Model every mode serves (default fp32, so that modes compare on one model).")
    parser.add_argument("--workers", type=int, default=None, help="Also measure the default mode with this many processes.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Measure every mode this many times, in alternating order, and report each mode's "
                             "median run: on a shared 2-core machine, the order alone moves a result by ~10%%.")
    parser.add_argument("--modes", default=None, help="Comma-separated subset of the modes' short names "
                        "(serial, threadpool, batch1, batchall, default, workers).")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.duration <= MAX_DURATION_S:
        raise SystemExit(f"--clients must be in [1, {MAX_CLIENTS}] and --duration in (0, {MAX_DURATION_S}]")
    with open(args.eval_file, encoding="utf-8") as f:
        texts = [t for _, t in read_inputs(f, input_format(args.eval_file), args.eval_file) if isinstance(t, str)]
    if args.max_words:
        texts = sorted({" ".join(t.split()[: args.max_words]) for t in texts})
    common = ["--max_texts", str(max(args.texts_per_request, 1)), "--precision", args.precision]
    if args.num_threads:
        common += ["--num_threads", str(args.num_threads)]
    batching = ["--max_batch_texts", str(args.max_batch_texts), "--max_wait_ms", str(args.max_wait_ms)]
    if args.batch_concurrency:
        batching += ["--batch_concurrency", str(args.batch_concurrency)]
    concurrency = args.batch_concurrency or Batching().concurrency
    batched_chars = args.max_batched_chars or Batching().max_input_chars
    default_flags = [*batching, "--max_batched_chars", str(batched_chars)] if batched_chars else [*batching, "--batch_every_request"]
    modes = {
        "serial": ("one request at a time", ["--max_batch_texts", str(args.texts_per_request), "--batch_concurrency", "1",
                                             "--batch_every_request"]),
        "threadpool": ("one call per request, thread pool", ["--no_micro_batching"]),
        "batch1": ("micro-batching every request, 1 batch in flight", [*batching, "--batch_concurrency", "1",
                                                                       "--batch_every_request"]),
        "batchall": (f"micro-batching every request, {concurrency} in flight", [*batching, "--batch_every_request"]),
        "default": (f"default: micro-batching texts <= {batched_chars} chars, {concurrency} in flight, "
                    "longer ones in the thread pool", default_flags),
    }
    if args.workers:
        modes["workers"] = (f"default mode, {args.workers} processes", [*batching, "--workers", str(args.workers)])
    chosen = args.modes.split(",") if args.modes else list(modes)
    runs: dict[str, list[tuple[LoadResult, tuple]]] = {key: [] for key in chosen}
    for repeat in range(max(1, args.repeats)):
        for key in chosen if repeat % 2 == 0 else chosen[::-1]:
            name, flags = modes[key]
            with Server(args.bundle, common + flags) as server:
                drive(server.port, texts, args.clients, min(2.0, args.duration), args.texts_per_request, seed=99)
                before = metrics_snapshot(server.port)
                result = drive(server.port, texts, args.clients, args.duration, args.texts_per_request, seed=repeat)
                runs[key].append((result, batch_distribution(before, metrics_snapshot(server.port))))
    results, batches = {}, {}
    for key, measured in runs.items():
        ordered = sorted(measured, key=lambda run: run[0].requests_per_s)
        results[key], batches[key] = ordered[(len(ordered) - 1) // 2]
    ceiling = in_process_ceiling(args.bundle, texts, args.clients * args.texts_per_request, min(args.duration, 10.0),
                                 args.precision, args.num_threads)
    print(f"# {args.bundle}: {args.clients} clients x {args.duration:g} s, {args.texts_per_request} text(s) per "
          f"request{f' (first {args.max_words} words)' if args.max_words else ''}, {args.precision}, "
          f"median of {max(1, args.repeats)} run(s) per mode, "
          f"{os.cpu_count()} CPUs (clients and server share them)\n")
    bins = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in BATCH_BINS]
    print("| mode | requests/s | texts/s | of ceiling | p50 ms | p99 ms | errors | mean batch | "
          + " | ".join(f"calls of {b}" for b in bins) + " |")
    print("|---|" + "---|" * (7 + len(bins)))
    for key, r in results.items():
        mean, shares = batches[key]
        texts_per_s = r.requests_per_s * args.texts_per_request
        print(f"| {modes[key][0]} | {r.requests_per_s:.1f} | {texts_per_s:.1f} | {texts_per_s / ceiling:.0%} | "
              f"{r.percentile(0.5):.1f} | {r.percentile(0.99):.1f} | {r.errors} | {mean:.1f} | "
              + " | ".join(f"{shares.get(b, 0):.0%}" for b in bins) + " |")
    print(f"| in-process ceiling (Predictor, batches of {args.clients * args.texts_per_request}, no HTTP) | | "
          f"{ceiling:.1f} | 100% | | | | | " + " | " * (len(bins) - 1) + " |")
    if max(1, args.repeats) > 1:
        print("\nevery run, requests/s: " + "; ".join(
            f"{key} " + ", ".join(f"{run.requests_per_s:.1f}" for run, _ in measured) for key, measured in runs.items()))
    if "default" in results:
        d = results["default"]
        for key, label in (("serial", "one request at a time"), ("threadpool", "the thread pool"), ("batch1", "1 batch in flight")):
            if key in results:
                print(f"\ndefault / {label}: {d.requests_per_s / results[key].requests_per_s:.2f}x requests/s, "
                      f"p99 {d.percentile(0.99):.1f} vs {results[key].percentile(0.99):.1f} ms", end="")
        print()
    if any(r.errors for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
