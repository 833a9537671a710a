"""Evaluate a saved fine-tuning run on another labeled file (same columns as the run's config)."""

import json

from tfsft.cli import ArgumentParser, positive_int, run_cli


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="A finished run directory written by scripts/finetune.py.")
    parser.add_argument("--file", required=True, help="Labeled CSV, TSV or JSONL file to evaluate on.")
    parser.add_argument("--batch_size", type=positive_int, default=None, help="Evaluation batch size (default: the run's).")
    args = parser.parse_args()
    from tfsft.pipeline import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, args.file, args.batch_size), indent=2, sort_keys=True))


if __name__ == "__main__":
    run_cli(main)
