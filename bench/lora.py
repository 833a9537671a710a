"""LoRA against full fine-tuning (issue 17): score, trainable parameters, stored bytes, speed.

For each task in --tasks, one full fine-tuning run and one `--lora_rank R` run of the same
checkpoint on the same examples, seed and epochs (each method at its own learning rate: LoRA
trains a few thousand parameters from zero and wants a larger one), each a fresh
`scripts/finetune.py` process. The best epoch is chosen on a hold-out of train; the reported
split (SST-2 dev accuracy, STS-B dev Spearman) is scored once at the end, as
`scripts/benchmark.py` does. Each run exports its ONNX bundle (LoRA: adapters merged), so the
parity gate is part of every row.

Reported per task: both scores and LoRA minus full in points (target: within 1.5), trainable and
total parameters, the bytes of the run's `model/` directory and of its weights file alone (LoRA:
`adapter_model.safetensors`; full: `tf_model.h5`) and their ratio (target: under 5%), training
examples/s and wall seconds. Results go to OUTPUT/results.jsonl (a rerun skips runs already
there with the same command) and OUTPUT/summary.md (also printed).

    python bench/lora.py                                   # sst2 (8,000 training rows) and stsb, 2 epochs each
    python bench/lora.py --tasks stsb --epochs 3 --lora_learning_rate 1e-3
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfsft.artifacts import write_text  # noqa: E402

TASKS = {
    "sst2": dict(
        folder="glue/SST-2", flags=["--train_file", "train.tsv", "--test_file", "dev.tsv", "--validation_split_percentage", "5"],
        metric="test_accuracy", name="SST-2 dev accuracy",
    ),
    "stsb": dict(
        folder="glue/STS-B",
        flags=["--train_file", "train.tsv", "--test_file", "dev.tsv", "--task", "regression", "--label_column", "score"],
        metric="test_spearman", name="STS-B dev Spearman",
    ),
}
WEIGHT_FILES = {"full": "tf_model.h5", "lora": "adapter_model.safetensors"}


def run_command(args: argparse.Namespace, task: str, method: str, output_dir: Path) -> list[str]:
    spec = TASKS[task]
    folder = Path(args.data_dir) / spec["folder"]
    flags = [str(folder / value) if value.endswith(".tsv") else value for value in spec["flags"]]
    learning_rate = args.lora_learning_rate if method == "lora" else args.learning_rate
    command = [
        sys.executable, str(ROOT / "scripts" / "finetune.py"), "--model_name_or_path", args.model_name_or_path, *flags,
        "--num_train_epochs", str(args.epochs), "--learning_rate", str(learning_rate), "--seed", str(args.seed),
        "--output_dir", str(output_dir), "--overwrite_output_dir",
    ]
    if args.max_train_samples.get(task):
        command += ["--max_train_samples", str(args.max_train_samples[task])]
    if method == "lora":
        command += ["--lora_rank", str(args.lora_rank), "--lora_alpha", str(args.lora_alpha)]
        if args.lora_targets:
            command += ["--lora_targets", args.lora_targets]
    return command


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def measure(args: argparse.Namespace, task: str, method: str, output: Path) -> dict[str, Any]:
    run_dir = output / "runs" / f"{task}-{method}"
    command = run_command(args, task, method, run_dir)
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if finished.returncode != 0:
        return {"task": task, "method": method, "command": shlex.join(command), "error": finished.stderr.strip().splitlines()[-1:]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model_dir = run_dir / "model"
    report = json.loads((run_dir / "onnx" / "export_report.json").read_text())
    return {
        "task": task, "method": method, "command": shlex.join(command), "score": metrics[TASKS[task]["metric"]],
        "trainable_parameters": metrics["trainable_parameters"], "total_parameters": metrics["total_parameters"],
        "model_dir_bytes": directory_bytes(model_dir), "weights_bytes": (model_dir / WEIGHT_FILES[method]).stat().st_size,
        "train_examples_per_s": metrics["train_examples_per_s"], "train_runtime_s": metrics["train_runtime_s"],
        "train_samples": metrics["train_samples"], "wall_s": round(wall, 1),
        "onnx_fp32_max_abs_logit_diff": max(
            (check["max_abs_logit_diff"] for name, checks in report["parity"].items() if "int8" not in name
             for check in checks.values()),
            default=None,
        ),
    }


def summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by = {(row["task"], row["method"]): row for row in rows if "score" in row}
    lines = [
        f"LoRA rank {args.lora_rank} (alpha {args.lora_alpha}, lr {args.lora_learning_rate}, targets "
        f"{args.lora_targets or 'default'}) against full fine-tuning "
        f"(lr {args.learning_rate}), {args.epochs} epochs, seed {args.seed}, {args.model_name_or_path}.",
        "",
        "| task | full | LoRA | LoRA - full (points) | trainable params (LoRA / full) | weights bytes (LoRA / full) | model/ bytes (LoRA / full) | train ex/s (LoRA / full) | wall s (LoRA / full) |",
        "|---|---:|---:|---:|---|---|---|---|---|",
    ]
    for task in args.tasks:
        full, lora = by.get((task, "full")), by.get((task, "lora"))
        if not (full and lora):
            lines.append(f"| {task} | {'failed or missing' if not full else round(full['score'], 4)} | "
                         f"{'failed or missing' if not lora else round(lora['score'], 4)} | | | | | | |")
            continue
        lines.append(
            f"| {TASKS[task]['name']} | {full['score']:.4f} | {lora['score']:.4f} | {100 * (lora['score'] - full['score']):+.2f} | "
            f"{lora['trainable_parameters']:,} / {full['trainable_parameters']:,} | "
            f"{lora['weights_bytes']:,} / {full['weights_bytes']:,} ({100 * lora['weights_bytes'] / full['weights_bytes']:.2f}%) | "
            f"{lora['model_dir_bytes']:,} / {full['model_dir_bytes']:,} ({100 * lora['model_dir_bytes'] / full['model_dir_bytes']:.2f}%) | "
            f"{lora['train_examples_per_s']:.1f} / {full['train_examples_per_s']:.1f} "
            f"({lora['train_examples_per_s'] / full['train_examples_per_s']:.2f}x) | {lora['wall_s']:.0f} / {full['wall_s']:.0f} |"
        )
    for row in rows:
        if "error" in row:
            lines.append(f"\n{row['task']} {row['method']} failed: {row['error']}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb", help=f"Comma-separated, of {', '.join(TASKS)}.")
    parser.add_argument("--methods", default="full,lora", help="Comma-separated, of full, lora.")
    parser.add_argument("--model_name_or_path", default="embedded-minilm")
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--sst2_train_samples", type=int, default=8000, help="SST-2 training rows (0: all 67k).")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Full fine-tuning's peak learning rate.")
    parser.add_argument("--lora_learning_rate", type=float, default=1e-3)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16.0)
    parser.add_argument("--lora_targets", default=None, help="Default: the library's (the query and value projections).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "lora"))
    args = parser.parse_args(argv)
    args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown:
        parser.error(f"unknown --tasks {unknown}; known: {list(TASKS)}")
    args.max_train_samples = {"sst2": args.sst2_train_samples or None}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results_file = output / "results.jsonl"
    rows = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    done = {row["command"] for row in rows if "score" in row}
    for task in args.tasks:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            command = shlex.join(run_command(args, task, method, output / "runs" / f"{task}-{method}"))
            if command in done:
                continue
            print(f"[bench/lora] {task} {method}: {command}", file=sys.stderr, flush=True)
            row = measure(args, task, method, output)
            rows = [r for r in rows if r["command"] != command] + [row]
            write_text(results_file, "".join(json.dumps(r) + "\n" for r in rows))
    current = [row for row in rows if row["command"] in {
        shlex.join(run_command(args, t, m, output / "runs" / f"{t}-{m}")) for t in args.tasks for m in ("full", "lora")
    }]
    text = summary(current, args)
    write_text(output / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
