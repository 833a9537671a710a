"""Fine-tune a BERT-family encoder on labeled data: train -> evaluate -> save (-> ONNX).

With no arguments it fine-tunes the embedded MiniLM on the embedded tweet-sentiment set.
"""

import json

from tfsft.cli import ArgumentParser, run_cli
from tfsft.config import RunConfig, build_arg_parser, collect_args, search_trials, wants_search


def main() -> None:
    parser = build_arg_parser(__doc__, ArgumentParser)
    args = parser.parse_args()
    values = collect_args(args)
    if wants_search(values):
        from tfsft.search import run_search

        trials = search_trials(values)
        search = run_search(trials)
        print(json.dumps({"best": search.best, "test_metrics": search.test_metrics}, indent=2, sort_keys=True))
        print(f"Search written to {search.output_dir}")
        return
    config = RunConfig.from_flat(values)
    from tfsft.pipeline import finetune

    result = finetune(config)
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print(f"Run written to {result.run_dir}")


if __name__ == "__main__":
    run_cli(main)
