"""Fine-tune and evaluate on the shared GLUE / CoNLL sets and write a Markdown results table.

Each task is one ordinary `finetune` run (train, evaluate, export with parity, int8), so every
figure in the table can be reproduced from its run directory. The score is the task's usual
metric on the split the literature reports: SST-2, STS-B and SQuAD v1.1 on dev (their test
labels are not public), MRPC and CoNLL-2003 on test. That split is never used to choose anything: the best
epoch is picked on a held-out slice of train (SST-2, MRPC, STS-B, SQuAD) or on CoNLL's dev set, and the
reported split is scored once, at the end. The int8 column is the quantized ONNX model on the
validation split, beside the Keras model on the same examples, so the two are comparable.
Each task has its own learning rate and epoch count (see TASKS); the flags override them.
MRPC starts from the STS-B run's model rather than from the checkpoint: intermediate training on
a related task with more data (STILTs, Phang et al. 2018), which this checkpoint, trained for
single sentences, needs to reach a competitive pair classifier; the STS-B run is made first if the
output directory holds none, and `--direct` starts every task from --model_name_or_path.
The table (and its rows as JSON beside it) is rewritten after every task, so a long run shows
its progress; rows of tasks run earlier into the same table are kept, so a task can be rerun
alone.

Example (small caps, minutes on 2 CPU cores):
    python scripts/benchmark.py --tasks sst2,stsb --max_train_samples 2000 --max_eval_samples 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tfsft.artifacts import HISTORY_FILE, MODEL_DIR, is_finished_run, write_text
from tfsft.cli import ArgumentParser, positive_int, run_cli
from tfsft.config import DEFAULT_MODEL, LOWER_IS_BETTER, RunConfig
from tfsft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TASKS = {
    "sst2": dict(
        folder="glue/SST-2", files=dict(train_file="train.tsv", test_file="dev.tsv"),
        flags=dict(task="classification", validation_split_percentage=5, num_train_epochs=3, learning_rate=1e-4,
                   pooling="cls"),
        metric="test_accuracy", name="SST-2 dev accuracy",
    ),
    "mrpc": dict(
        folder="glue/MRPC", files=dict(train_file="train.tsv", test_file="test.tsv"),
        flags=dict(task="classification", text_column="#1 String", text_pair_column="#2 String", label_column="Quality",
                   num_train_epochs=5, learning_rate=5e-5, metric_for_best_model="f1"),
        metric="test_f1", name="MRPC test F1", start_from="stsb",
    ),
    "stsb": dict(
        folder="glue/STS-B", files=dict(train_file="train.tsv", test_file="dev.tsv"),
        flags=dict(task="regression", label_column="score", num_train_epochs=4, learning_rate=1e-4),
        metric="test_spearman", name="STS-B dev Spearman",
    ),
    "conll": dict(
        folder="conll2003", files=dict(train_file="train.txt", validation_file="dev.txt", test_file="test.txt"),
        flags=dict(task="ner", num_train_epochs=5, learning_rate=1e-4, early_stopping_patience=1),
        metric="test_f1", name="CoNLL-2003 test entity F1",
    ),
    "squad": dict(
        folder="squad-v1.1", files=dict(train_file="train-v1.1.json", test_file="dev-v1.1.json"),
        flags=dict(task="qa", validation_split_percentage=5, num_train_epochs=2, learning_rate=1e-4),
        metric="test_f1", name="SQuAD v1.1 dev F1",
    ),
}


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_name_or_path", default=DEFAULT_MODEL, help="Checkpoint to fine-tune.")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"Comma-separated subset of {list(TASKS)}.")
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"), help="The shared data folder.")
    parser.add_argument("--max_train_samples", type=positive_int, default=None, help="Training sample cap per task (default: all).")
    parser.add_argument("--max_eval_samples", type=positive_int, default=None, help="Validation/test sample cap (default: all).")
    parser.add_argument("--num_train_epochs", type=positive_int, default=None, help="Epochs for every task (default: per task).")
    parser.add_argument("--learning_rate", type=float, default=None, help="Peak learning rate for every task (default: per task).")
    parser.add_argument("--layer_lr_decay", type=float, default=None,
                        help="Layer-wise learning-rate decay for every task (default: per task).")
    parser.add_argument("--seed", type=int, default=None, help="Random seed for every task (default: 42).")
    parser.add_argument("--direct", action="store_true", help="Start every task from --model_name_or_path (MRPC too).")
    parser.add_argument("--pooling", default=None,
                        help="Sequence head pooling for every task: auto, cls or mean (default: per task).")
    parser.add_argument("--per_device_train_batch_size", type=positive_int, default=32)
    parser.add_argument("--max_seq_length", type=positive_int, default=None,
                        help="Tokens per example (window, for squad) for every task (default: 128; 384 for squad).")
    parser.add_argument("--output_dir", default="saved_models/benchmark", help="Run directories go here, one per task.")
    parser.add_argument("--output", default=None, help="Markdown table file (default: OUTPUT_DIR/results.md).")
    return parser.parse_args()


def task_config(args: argparse.Namespace, task: str) -> RunConfig:
    spec = TASKS[task]
    folder = Path(args.data_dir) / spec["folder"]
    files = {flag: str(folder / name) for flag, name in spec["files"].items()}
    overrides = {
        name: getattr(args, name)
        for name in ("num_train_epochs", "learning_rate", "layer_lr_decay", "pooling", "seed", "max_seq_length")
        if getattr(args, name) is not None
    }
    source = start_from(args, task)
    model = str(Path(args.output_dir) / source / MODEL_DIR) if source else args.model_name_or_path
    return RunConfig.from_flat(dict(
        model_name_or_path=model, **files, **{**spec["flags"], **overrides},
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        max_predict_samples=args.max_eval_samples,
        per_device_train_batch_size=args.per_device_train_batch_size,
        output_dir=str(Path(args.output_dir) / task), overwrite_output_dir=True, export=True, quantize_int8=True,
    ))


def start_from(args: argparse.Namespace, task: str) -> str | None:
    """The task whose finished run this task fine-tunes further (None: the checkpoint itself)."""
    return None if args.direct else TASKS[task].get("start_from")


def run_order(args: argparse.Namespace, tasks: list[str]) -> list[str]:
    """`tasks`, each preceded by the task it starts from when that is requested too or not yet run."""
    order: list[str] = []
    for task in tasks:
        source = start_from(args, task)
        if source and source not in order and (source in tasks or not is_finished_run(Path(args.output_dir) / source)):
            order.append(source)
        if task not in order:
            order.append(task)
    return order


def table(rows: list[dict]) -> str:
    """The results table, then the command that produced each row."""
    lines = [
        "| task | metric | score | train examples | epochs, lr | best epoch | train examples/s | wall time (s) | int8 ONNX (validation) | Keras (validation) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['score']:.4f} | {r['train_samples']} | {r['schedule']} | {r['best_epoch']} | "
            f"{r['examples_per_s']:.1f} | {r['wall_s']:.0f} | {r['int8']} | {r['keras']} |"
        )
    lines.append("")
    lines += [f"- {r['task']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def merged(previous: list[dict], row: dict) -> list[dict]:
    """Earlier rows of other tasks kept (a task can be rerun alone), in TASKS order."""
    rows = [r for r in previous if r.get("task") != row["task"] and r.get("task") in TASKS] + [row]
    return sorted(rows, key=lambda r: list(TASKS).index(r["task"]))


def main() -> None:
    args = parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ConfigError(f"--tasks must name some of {list(TASKS)}. Received: tasks={args.tasks!r}")
    from tfsft.pipeline import finetune

    output = Path(args.output or Path(args.output_dir) / "results.md")
    rows_file = output.with_suffix(".json")
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
    for task in run_order(args, tasks):
        config = task_config(args, task)
        start = time.perf_counter()
        result = finetune(config, verbose=2)
        wall_s = time.perf_counter() - start
        row = result_row(task, config, result.run_dir, wall_s, command.strip(), start_from(args, task))
        rows = merged(rows, row)
        markdown = table(rows)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text(rows_file, json.dumps(rows, indent=2) + "\n")
        write_text(output, markdown)
        print(markdown, flush=True)
        print(f"Table written to {output}", flush=True)


def result_row(
    task: str, config: RunConfig, run_dir: Path, wall_s: float, command: str, source: str | None = None
) -> dict:
    """One table row, read from the finished run directory's metrics, export report and history;
    `source`: the task whose run it was fine-tuned from."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = json.loads((run_dir / "onnx" / "export_report.json").read_text())
    score_name = next(k[len("keras_"):] for k in report if k.startswith("keras_"))
    int8 = report.get("int8", {}).get(score_name)
    return dict(
        task=task, command=command, metric=TASKS[task]["name"], score=metrics[TASKS[task]["metric"]],
        train_samples=metrics["train_samples"], examples_per_s=metrics["train_examples_per_s"] or 0.0,
        schedule=f"{config.train.num_train_epochs}, {config.train.learning_rate:g}"
        + (f", layer decay {config.train.layer_lr_decay:g}" if config.train.layer_lr_decay != 1.0 else "")
        + (f", from the {source} run" if source else ""),
        best_epoch=best_epoch(run_dir, f"val_{config.train.metric_for_best_model}"),
        wall_s=wall_s, int8="n/a" if int8 is None else f"{score_name} {int8:.4f}",
        keras=f"{score_name} {report['keras_' + score_name]:.4f}",
    )


def best_epoch(run_dir: Path, monitor: str) -> str:
    """The epoch whose weights were kept (1-based) and the validation score of every epoch."""
    from tfsft.artifacts import read_history

    history = read_history(run_dir / HISTORY_FILE)
    scores = [row[monitor] for row in history if monitor in row]
    if not scores:
        return "last"
    pick = min if monitor[len("val_"):] in LOWER_IS_BETTER else max
    best = pick(range(len(scores)), key=scores.__getitem__)
    return f"{best + 1} ({monitor[4:]}: {' / '.join(f'{s:.4f}' for s in scores)})"


if __name__ == "__main__":
    run_cli(main)
