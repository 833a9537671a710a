"""Serve an ONNX bundle over HTTP: POST /predict, GET /health, GET /metadata."""

import argparse

from tfsft.cli import run_cli


def main() -> None:
    from tfsft.serving import Limits, serve

    defaults = Limits()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle", help="An ONNX bundle directory (RUN_DIR/onnx).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--int8", action="store_true", help="Serve the int8-quantized model.")
    parser.add_argument("--max_texts", type=int, default=defaults.max_texts, help="Most inputs per request.")
    parser.add_argument("--max_chars", type=int, default=defaults.max_chars, help="Most characters per text.")
    parser.add_argument("--num_threads", type=int, default=None, help="onnxruntime intra-op threads.")
    args = parser.parse_args()
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars)
    serve(args.bundle, args.host, args.port, int8=args.int8, limits=limits, num_threads=args.num_threads)


if __name__ == "__main__":
    run_cli(main)
