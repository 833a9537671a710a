"""Fine-tune a BERT-family encoder on labeled data: train -> evaluate -> save (-> ONNX).

With no arguments it fine-tunes the embedded MiniLM on the embedded tweet-sentiment set.
"""

from __future__ import annotations

import argparse
import json

from tfsft.cli import ArgumentParser
from tfsft.config import RunConfig, build_arg_parser, collect_args, search_trials, wants_search


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = build_arg_parser(__doc__, ArgumentParser)
    if prog:
        parser.prog = prog
    return parser


def run(args: argparse.Namespace) -> None:
    values = collect_args(args)
    if wants_search(values):
        from tfsft.search import run_search

        search = run_search(search_trials(values))
        print(json.dumps({"best": search.best, "test_metrics": search.test_metrics}, indent=2, sort_keys=True))
        print(f"Search written to {search.output_dir}")
        return
    config = RunConfig.from_flat(values)
    from tfsft.pipeline import finetune

    result = finetune(config)
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print(f"Run written to {result.run_dir}")
