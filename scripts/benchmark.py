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

`--multitask` trains the chosen tasks (squad excepted) as one multi-task run instead: one encoder,
a head per task, each task with its own data and metric, the tasks' best epoch chosen together (the
mean of their validation metrics); its rows ("sst2 (multi-task)", ...) sit beside the single-task
rows, and a summary compares the mean score and the bundle bytes with the single-task runs in the
table (run those first, with the same caps and epochs, for a like-for-like comparison).

Example (small caps, minutes on 2 CPU cores):
    python scripts/benchmark.py --tasks sst2,stsb --max_train_samples 2000 --max_eval_samples 500
    python scripts/benchmark.py --tasks sst2,mrpc,stsb --multitask --max_train_samples 2000 --max_eval_samples 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from tfsft.artifacts import HISTORY_FILE, MODEL_DIR, is_finished_run, write_text
from tfsft.cli import ArgumentParser, positive_int, run_cli
from tfsft.config import DEFAULT_MODEL, LOWER_IS_BETTER, DataConfig, RunConfig
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
    parser.add_argument("--multitask", action="store_true",
                        help="Train the tasks jointly as one multi-task run (one encoder, a head per task).")
    return parser.parse_args()


OVERRIDES = ("num_train_epochs", "learning_rate", "layer_lr_decay", "pooling", "seed", "max_seq_length")
MULTITASK_RUN = "multitask"
"""The multi-task run's directory under --output_dir."""
MULTITASK_SUFFIX = "(multi-task)"
"""What a multi-task run's rows add to their task's name."""


def task_flags(args: argparse.Namespace, task: str) -> dict:
    """The task's files and flags, the command line's overrides and caps over them."""
    spec = TASKS[task]
    folder = Path(args.data_dir) / spec["folder"]
    files = {flag: str(folder / name) for flag, name in spec["files"].items()}
    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    return dict(
        **files, **{**spec["flags"], **overrides},
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        max_predict_samples=args.max_eval_samples,
    )


def task_config(args: argparse.Namespace, task: str) -> RunConfig:
    source = start_from(args, task)
    model = str(Path(args.output_dir) / source / MODEL_DIR) if source else args.model_name_or_path
    return RunConfig.from_flat(dict(
        model_name_or_path=model, **task_flags(args, task),
        per_device_train_batch_size=args.per_device_train_batch_size,
        output_dir=str(Path(args.output_dir) / task), overwrite_output_dir=True, export=True, quantize_int8=True,
    ))


def multitask_config(args: argparse.Namespace, tasks: list[str]) -> RunConfig:
    """One run training `tasks` jointly: each task's data flags under tasks:, the training flags shared
    (each flag the tasks set differently takes its largest value: the most epochs, the highest rate;
    pooling and sequence length are the checkpoint's and the run's defaults unless given)."""
    data_keys = {f.name for f in fields(DataConfig)} | {"metric_for_best_model", "task"}
    entries, shared = {}, {}
    for task in tasks:
        flags = task_flags(args, task)
        entries[task] = {key: value for key, value in flags.items() if key in data_keys and value is not None}
        for key, value in flags.items():
            if key not in data_keys and value is not None:
                shared[key] = max(shared.get(key, value), value) if not isinstance(value, str) else value
        entries[task].pop("validation_split_percentage", None)
        entries[task]["validation_split_percentage"] = flags.get("validation_split_percentage", 10)
    for name in ("early_stopping_patience", "max_seq_length", "pooling"):  # per-task choices; the flags alone set them here
        shared.pop(name, None)
    shared.update({name: getattr(args, name) for name in ("max_seq_length", "pooling") if getattr(args, name) is not None})
    return RunConfig.from_flat(dict(
        model_name_or_path=args.model_name_or_path, tasks=entries, **shared,
        per_device_train_batch_size=args.per_device_train_batch_size,
        output_dir=str(Path(args.output_dir) / MULTITASK_RUN), overwrite_output_dir=True, export=True, quantize_int8=True,
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
    """Earlier rows of other tasks kept (a task can be rerun alone), in TASKS order, each task's
    multi-task row after its single-task one."""
    def key(r: dict) -> tuple[int, bool]:
        return list(TASKS).index(r["task"].split(" ")[0]), r["task"].endswith(MULTITASK_SUFFIX)

    known = [r for r in previous if r.get("task", "").split(" ")[0] in TASKS]
    return sorted([r for r in known if r["task"] != row["task"]] + [row], key=key)


def multitask_summary(rows: list[dict], tasks: list[str], run_dir: Path) -> str:
    """Mean score of the multi-task rows against the single-task rows of the same tasks, and the
    multi-task bundle's bytes against the single-task bundles' total."""
    single = {r["task"]: r for r in rows if r["task"] in tasks}
    joint = {r["task"].split(" ")[0]: r for r in rows if r["task"].endswith(MULTITASK_SUFFIX)}
    if set(single) != set(tasks) or set(joint) != set(tasks):
        return "Run the single-task rows of the same tasks too for a comparison.\n"
    mean_single = sum(single[t]["score"] for t in tasks) / len(tasks)
    mean_joint = sum(joint[t]["score"] for t in tasks) / len(tasks)
    single_bytes = sum(single[t].get("bundle_bytes") or 0 for t in tasks)
    joint_bytes = joint[tasks[0]].get("bundle_bytes") or 0
    ratio = f"{joint_bytes / single_bytes:.2f}" if single_bytes else "n/a"
    return (
        f"Multi-task ({', '.join(tasks)}): mean score {mean_joint:.4f} vs {mean_single:.4f} for the single-task runs "
        f"({mean_joint - mean_single:+.4f}); one bundle of {joint_bytes / 2**20:.1f} MiB vs {single_bytes / 2**20:.1f} MiB "
        f"for the single-task bundles together (ratio {ratio}).\n"
    )


def bundle_bytes(run_dir: Path) -> int:
    """Bytes of the run's shipped ONNX models (what serving loads)."""
    report = json.loads((run_dir / "onnx" / "export_report.json").read_text())
    return int(sum(report.get("sizes_bytes", {}).values()))


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
    if args.multitask:
        run_multitask(args, tasks, output, rows_file, rows, command.strip())
        return
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


def run_multitask(args: argparse.Namespace, tasks: list[str], output: Path, rows_file: Path, rows: list[dict], command: str) -> None:
    """The multi-task run of `tasks`, a row per task, and the summary against the single-task rows."""
    from tfsft.pipeline import finetune

    joint = [task for task in tasks if task != "squad"]
    if len(joint) < 2:
        raise ConfigError(f"--multitask needs two or more of {[t for t in TASKS if t != 'squad']}. Received: tasks={args.tasks!r}")
    config = multitask_config(args, joint)
    start = time.perf_counter()
    result = finetune(config, verbose=2)
    wall_s = time.perf_counter() - start
    for task in joint:
        rows = merged(rows, result_row(task, config, result.run_dir, wall_s, command, multitask=True))
    markdown = table(rows) + "\n" + multitask_summary(rows, joint, result.run_dir)
    write_text(rows_file, json.dumps(rows, indent=2) + "\n")
    write_text(output, markdown)
    print(markdown, flush=True)
    print(f"Table written to {output}", flush=True)


def result_row(
    task: str, config: RunConfig, run_dir: Path, wall_s: float, command: str, source: str | None = None,
    multitask: bool = False,
) -> dict:
    """One table row, read from the finished run directory's metrics, export report and history;
    `source`: the task whose run it was fine-tuned from; `multitask`: the task's head of a multi-task run."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = json.loads((run_dir / "onnx" / "export_report.json").read_text())
    if multitask:
        task_metrics, head = metrics[task], report["tasks"][task]
        score_name = next(k[len("keras_"):] for k in head if k.startswith("keras_"))
        int8, keras, monitor = head.get("int8", {}).get(score_name), head[f"keras_{score_name}"], "val_mean"
        train_samples, examples_per_s = task_metrics["train_samples"], metrics["train_examples_per_s"] or 0.0
        score, name = task_metrics[TASKS[task]["metric"]], f"{task} {MULTITASK_SUFFIX}"
    else:
        score_name = next(k[len("keras_"):] for k in report if k.startswith("keras_"))
        int8, keras = report.get("int8", {}).get(score_name), report["keras_" + score_name]
        monitor = f"val_{config.train.metric_for_best_model}"
        train_samples, examples_per_s = metrics["train_samples"], metrics["train_examples_per_s"] or 0.0
        score, name = metrics[TASKS[task]["metric"]], task
    return dict(
        task=name, command=command, metric=TASKS[task]["name"], score=score,
        train_samples=train_samples, examples_per_s=examples_per_s,
        schedule=f"{config.train.num_train_epochs}, {config.train.learning_rate:g}"
        + (f", layer decay {config.train.layer_lr_decay:g}" if config.train.layer_lr_decay != 1.0 else "")
        + (f", from the {source} run" if source else "") + (", jointly" if multitask else ""),
        best_epoch=best_epoch(run_dir, monitor),
        wall_s=wall_s, int8="n/a" if int8 is None else f"{score_name} {int8:.4f}",
        keras=f"{score_name} {keras:.4f}", bundle_bytes=bundle_bytes(run_dir),
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
