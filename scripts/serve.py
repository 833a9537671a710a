"""Serve an ONNX bundle over HTTP: POST /predict, GET /health, GET /metadata.

Concurrent requests are collected into one model call (`--max_batch_texts`, `--max_wait_ms`);
`--no_micro_batching` gives each request its own model call, run concurrently in a thread pool.
"""

from tfsft.cli import ArgumentParser, non_negative_float, port_number, positive_int, run_cli


def main() -> None:
    from tfsft.serving import Batching, Limits, serve

    defaults, batching = Limits(), Batching()
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("bundle", help="An ONNX bundle directory (RUN_DIR/onnx).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8080)
    parser.add_argument("--int8", action="store_true", help="Serve the int8-quantized model.")
    parser.add_argument("--max_texts", type=positive_int, default=defaults.max_texts, help="Most inputs per request.")
    parser.add_argument("--max_chars", type=positive_int, default=defaults.max_chars, help="Most characters per text.")
    parser.add_argument("--num_threads", type=positive_int, default=None, help="onnxruntime intra-op threads.")
    parser.add_argument("--max_batch_texts", type=positive_int, default=batching.max_texts,
                        help="Most inputs in one micro-batch of concurrent requests.")
    parser.add_argument("--max_wait_ms", type=non_negative_float, default=batching.max_wait_ms,
                        help="How long a micro-batch waits for more requests after its first (0: only "
                             "requests already queued are batched; no added latency).")
    parser.add_argument("--micro_batching", action="store_true", default=True,
                        help="Batch concurrent requests into one model call (the default).")
    parser.add_argument("--no_micro_batching", dest="micro_batching", action="store_false",
                        help="Give each request its own model call, run concurrently in a thread pool.")
    parser.add_argument("--access_log", action="store_true", help="Log every request.")
    args = parser.parse_args()
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars)
    micro = Batching(max_texts=args.max_batch_texts, max_wait_ms=args.max_wait_ms) if args.micro_batching else None
    serve(args.bundle, args.host, args.port, int8=args.int8, limits=limits, num_threads=args.num_threads,
          batching=micro, access_log=args.access_log)


if __name__ == "__main__":
    run_cli(main)
