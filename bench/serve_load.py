"""Server under load: requests/s, p50/p99 latency and errors, with and without micro-batching.

Starts `scripts/serve.py BUNDLE` on a free loopback port (127.0.0.1 only) once per mode, drives
it with `--clients` concurrent keep-alive clients (threads) for `--duration` seconds, each
request holding `--texts_per_request` texts drawn from a real evaluation file, then stops it.
Three modes: one request at a time (a batch worker limited to one request's texts), one model
call per request run concurrently in a thread pool (`--no_micro_batching`), and micro-batching
(the default). Prints a Markdown table and micro-batching's throughput against both baselines.
The clients run on the same machine as the server, so they share its cores.

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
    parser.add_argument("--num_threads", type=int, default=None, help="onnxruntime intra-op threads in the server.")
    parser.add_argument("--int8", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.duration <= MAX_DURATION_S:
        raise SystemExit(f"--clients must be in [1, {MAX_CLIENTS}] and --duration in (0, {MAX_DURATION_S}]")
    with open(args.eval_file, encoding="utf-8") as f:
        texts = [t for _, t in read_inputs(f, input_format(args.eval_file), args.eval_file) if isinstance(t, str)]
    if args.max_words:
        texts = sorted({" ".join(t.split()[: args.max_words]) for t in texts})
    common = ["--max_texts", str(max(args.texts_per_request, 1))]
    if args.num_threads:
        common += ["--num_threads", str(args.num_threads)]
    if args.int8:
        common += ["--int8"]
    modes = {
        "one request at a time": ["--max_batch_texts", str(args.texts_per_request), "--max_wait_ms", "0"],
        "one call per request, thread pool": ["--no_micro_batching"],
        f"micro-batching (<= {args.max_batch_texts} texts, {args.max_wait_ms:g} ms)":
            ["--max_batch_texts", str(args.max_batch_texts), "--max_wait_ms", str(args.max_wait_ms)],
    }
    results = {}
    for name, flags in modes.items():
        with Server(args.bundle, common + flags) as server:
            drive(server.port, texts, args.clients, min(2.0, args.duration), args.texts_per_request, seed=99)
            results[name] = drive(server.port, texts, args.clients, args.duration, args.texts_per_request)
    print(f"# {args.bundle}: {args.clients} clients x {args.duration:g} s, {args.texts_per_request} text(s) per "
          f"request{f' (first {args.max_words} words)' if args.max_words else ''}, {os.cpu_count()} CPUs (clients and server share them)\n")
    print("| mode | requests/s | texts/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r.requests_per_s:.1f} | {r.requests_per_s * args.texts_per_request:.1f} | "
              f"{r.percentile(0.5):.1f} | {r.percentile(0.99):.1f} | {r.errors} |")
    serial, pooled, batched = results.values()
    print(f"\nmicro-batching / one request at a time: {batched.requests_per_s / serial.requests_per_s:.2f}x requests/s; "
          f"micro-batching / one call per request in a thread pool: {batched.requests_per_s / pooled.requests_per_s:.2f}x")
    if any(r.errors for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
