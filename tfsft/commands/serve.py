"""Serve an ONNX bundle over HTTP: POST /predict, GET /health, GET /metadata, GET /metrics.

Concurrent requests are collected into Predictor calls (`--max_batch_texts`, `--max_wait_ms`,
`--batch_concurrency` of them computing at once); `--no_micro_batching` gives each request its
own model call, run concurrently in a thread pool. `--workers N` runs N server processes on one
port. /metrics is in the Prometheus text format. Under overload a request gets a 503 with
Retry-After when `--max_queued_texts` inputs already wait or compute, and a 504 when its
predictions take longer than `--request_timeout_s`. A multi-task bundle answers /predict bodies
that name their task (`{"task": "NAME", "texts": [...]}`); /metadata lists its tasks.
"""

from __future__ import annotations

import argparse

from tfsft.cli import ArgumentParser, non_negative_float, port_number, positive_int


def named_bundle(value: str) -> tuple[str, str]:
    """NAME=RUN_DIR (or NAME=BUNDLE_DIR) -> (name, bundle directory)."""
    from tfsft.serving import bundle_directory

    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_DIR. Received: {value!r}")
    return name.strip(), bundle_directory(path.strip())


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from tfsft.inference import PRECISIONS
    from tfsft.serving import Batching, Limits

    defaults, batching = Limits(), Batching()
    parser = ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("bundle", nargs="?", default=None, help="An ONNX bundle directory (RUN_DIR/onnx, or RUN_DIR).")
    parser.add_argument("--adapter", action="append", type=named_bundle, default=[], metavar="NAME=RUN_DIR",
                        help="Serve several models from one process instead of one bundle (LoRA runs of one base, "
                             "say): repeat it; a request names its model in \"adapter\", and /metadata lists them. "
                             "LoRA runs exported with --adapter_files share one session of their base graph, each "
                             "call running its run's adapter; other bundles are served as they are (merged).")
    parser.add_argument("--no_share_base", dest="share_base", action="store_false", default=True,
                        help="With --adapter: serve every run's merged bundle, even where the runs could share a base.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8080)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="Model to serve: fp32 (the fused model), int8, or auto (default): int8 when the "
                             "bundle's export report shows its validation score within 1 point of Keras', or when "
                             "the bundle ships only int8.")
    parser.add_argument("--int8", dest="precision", action="store_const", const="int8", help="Same as --precision int8.")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="Server processes on the one port, each with its own model (default 1).")
    parser.add_argument("--max_texts", type=positive_int, default=defaults.max_texts, help="Most inputs per request.")
    parser.add_argument("--max_chars", type=positive_int, default=defaults.max_chars, help="Most characters per text.")
    parser.add_argument("--max_queued_texts", type=positive_int, default=defaults.max_queued_texts,
                        help="Most inputs queued or computing per server process; a request past it gets a 503 with "
                             "Retry-After at once (default %(default)s; at least --max_texts).")
    parser.add_argument("--request_timeout_s", type=non_negative_float, default=defaults.request_timeout_s,
                        help="Seconds a request may wait for its predictions before a 504 (default %(default)s; "
                             "0 waits as long as it takes).")
    parser.add_argument("--num_threads", type=positive_int, default=None,
                        help="onnxruntime intra-op threads per process (default: all cores, divided among --workers).")
    parser.add_argument("--max_batch_texts", type=positive_int, default=batching.max_texts,
                        help="Most inputs in one micro-batch of concurrent requests.")
    parser.add_argument("--max_wait_ms", type=non_negative_float, default=batching.max_wait_ms,
                        help="How long a micro-batch waits for more requests after its first (0: only "
                             "requests already queued are batched; no added latency).")
    parser.add_argument("--batch_concurrency", type=positive_int, default=batching.concurrency,
                        help="Micro-batches computing at once: a request arriving while one computes starts on another.")
    parser.add_argument("--max_batched_chars", type=positive_int, default=batching.max_input_chars,
                        help="Only requests whose texts all have at most this many characters are micro-batched; "
                             "longer ones get their own model call, where batching no longer pays on CPUs.")
    parser.add_argument("--batch_every_request", dest="max_batched_chars", action="store_const", const=None,
                        help="Micro-batch requests of any length.")
    parser.add_argument("--micro_batching", action="store_true", default=True,
                        help="Batch concurrent requests into one model call (the default).")
    parser.add_argument("--no_micro_batching", dest="micro_batching", action="store_false",
                        help="Give each request its own model call, run concurrently in a thread pool.")
    parser.add_argument("--access_log", action="store_true", help="Log every request.")
    return parser


def run(args: argparse.Namespace) -> None:
    from tfsft.serving import Batching, Limits, ServeSettings, bundle_directory, serve

    micro = Batching(max_texts=args.max_batch_texts, max_wait_ms=args.max_wait_ms, concurrency=args.batch_concurrency,
                     max_input_chars=args.max_batched_chars)
    settings = ServeSettings(
        bundle_dir=None if args.bundle is None else bundle_directory(args.bundle), adapters=tuple(args.adapter),
        precision=args.precision,
        limits=Limits(max_texts=args.max_texts, max_chars=args.max_chars, max_queued_texts=args.max_queued_texts,
                      request_timeout_s=args.request_timeout_s or None),
        batching=micro if args.micro_batching else None, num_threads=args.num_threads, share_base=args.share_base,
    )
    serve(settings, args.host, args.port, workers=args.workers, access_log=args.access_log)

