"""Fine-tune a BERT-family encoder on labeled data: train -> evaluate -> save (-> ONNX).

With no arguments it fine-tunes the embedded MiniLM on the embedded tweet-sentiment set.
"""

import json

from tfsft.cli import run_cli
from tfsft.config import build_arg_parser, config_from_args


def main() -> None:
    parser = build_arg_parser(__doc__)
    args = parser.parse_args()
    config = config_from_args(args)
    from tfsft.pipeline import finetune

    result = finetune(config)
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print(f"Run written to {result.run_dir}")


if __name__ == "__main__":
    run_cli(main)
