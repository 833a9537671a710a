"""Export a finished fine-tuning run to a verified ONNX bundle in RUN_DIR/onnx/."""

import json

from tfsft.cli import ArgumentParser, run_cli


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="A finished run directory written by scripts/finetune.py.")
    args = parser.parse_args()
    from tfsft.artifacts import require_run_dir

    require_run_dir(args.run_dir)  # a wrong directory fails here, before TensorFlow is loaded
    from tfsft.pipeline import export_finished_run

    report = export_finished_run(args.run_dir)
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_cli(main)
