"""Evaluate a saved fine-tuning run on another labeled file (same columns as the run's config)."""

from __future__ import annotations

import argparse
import json

from tfsft.cli import ArgumentParser, positive_int


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("run_dir", help="A finished run directory written by `tfsft finetune`.")
    parser.add_argument("--file", required=True, help="Labeled CSV, TSV or JSONL file to evaluate on.")
    parser.add_argument("--batch_size", type=positive_int, default=None, help="Evaluation batch size (default: the run's).")
    parser.add_argument("--task", default=None, help="A multi-task run: the task (head) to evaluate, read with its columns.")
    return parser


def run(args: argparse.Namespace) -> None:
    from tfsft.pipeline import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, args.file, args.batch_size, args.task), indent=2, sort_keys=True))
