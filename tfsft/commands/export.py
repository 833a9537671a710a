"""Export a finished fine-tuning run to a verified ONNX bundle in RUN_DIR/onnx/.

The export settings are the run's own (its config.json); the flags below replace them for this
export, e.g. `--export_variants int8` for a bundle that ships the int8 model alone.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tfsft.cli import ArgumentParser

EXPORT_FLAGS = ("opset", "export_variants", "quantize_int8", "adapter_files", "external_data")
"""The ExportConfig fields `tfsft export` takes as flags (`export` itself is implied)."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from tfsft.config import add_config_flags

    parser = ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("run_dir", help="A finished run directory written by `tfsft finetune`.")
    add_config_flags(parser, EXPORT_FLAGS, defaults_help=" (default: the run's setting)")
    return parser


def run(args: argparse.Namespace) -> None:
    from tfsft.artifacts import read_config, require_run_dir

    # A wrong directory or setting fails here, before TensorFlow is loaded.
    run_dir = require_run_dir(args.run_dir)
    overrides: dict[str, Any] = {name: getattr(args, name) for name in EXPORT_FLAGS if getattr(args, name) is not None}
    settings = read_config(run_dir).replace(**overrides).export if overrides else None
    from tfsft.pipeline import export_finished_run

    print(json.dumps(export_finished_run(run_dir, settings), indent=2, sort_keys=True))
