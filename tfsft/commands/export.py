"""Export a finished fine-tuning run to a verified ONNX bundle in RUN_DIR/onnx/."""

from __future__ import annotations

import argparse
import json

from tfsft.cli import ArgumentParser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("run_dir", help="A finished run directory written by `tfsft finetune`.")
    return parser


def run(args: argparse.Namespace) -> None:
    from tfsft.artifacts import require_run_dir

    require_run_dir(args.run_dir)  # a wrong directory fails here, before TensorFlow is loaded
    from tfsft.pipeline import export_finished_run

    print(json.dumps(export_finished_run(args.run_dir), indent=2, sort_keys=True))
