"""Export a finished fine-tuning run to a verified ONNX bundle in RUN_DIR/onnx/."""

import argparse
import json

from tfsft.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="A finished run directory written by scripts/finetune.py.")
    args = parser.parse_args()
    from tfsft.artifacts import require_run_dir

    require_run_dir(args.run_dir)  # a wrong directory fails here, before TensorFlow is loaded
    from tfsft.export import export_run

    report = export_run(args.run_dir)
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_cli(main)
