"""Choose the learning rate and the number of epochs on validation: a plain grid of full runs.

Every trial is an ordinary run (its own directory under the search's --output_dir) trained on the
training data and scored on validation, without a test set and without an export. Only the best
trial is then evaluated on --test_file and exported, so the test set cannot steer the choice.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tfsft import artifacts
from tfsft.config import LOWER_IS_BETTER, SEARCH_FIELDS, RunConfig
from tfsft.errors import ConfigError, stage

SEARCH_JSON = "search.json"
SEARCH_CSV = "search.csv"


@dataclass(frozen=True)
class SearchResult:
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    test_metrics: Optional[dict[str, Any]]
    output_dir: Path


def _log(message: str) -> None:
    print(f"[tfsft] {message}", file=sys.stderr, flush=True)


def trial_name(index: int, config: RunConfig) -> str:
    return f"trial-{index:02d}-lr{config.train.learning_rate:g}-epochs{config.train.num_train_epochs}"


def run_search(trials: Sequence[RunConfig], callbacks: Optional[Sequence] = None, verbose: int = 1) -> SearchResult:
    """Train every trial, keep the one with the best validation metric, then test and export it.

    Args:
        trials: configs differing only in SEARCH_FIELDS (from `tfsft.config.search_trials`); their
            shared --output_dir receives one directory per trial, search.csv and search.json.
    """
    from tfsft.pipeline import evaluate_run, finetune

    if not trials:
        raise ConfigError("--search needs at least one trial")
    first = trials[0]
    output_dir = Path(first.output_dir or f"saved_models/search-{first.model.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    if output_dir.exists() and any(output_dir.iterdir()) and not first.overwrite_output_dir:
        raise ConfigError(
            f"--output_dir {output_dir} is not empty; pass --overwrite_output_dir to replace it. "
            f"Received: output_dir={str(output_dir)!r}"
        )
    metric = first.train.metric_for_best_model
    key = f"eval_{metric}"
    rows: list[dict[str, Any]] = []
    for index, trial in enumerate(trials, start=1):
        name = trial_name(index, trial)
        _log(f"search trial {index}/{len(trials)}: {name}")
        config = trial.replace(output_dir=str(output_dir / name), test_file=None, export=False)
        result = finetune(config, callbacks=callbacks, verbose=verbose)
        rows.append({
            "trial": name,
            **{field: getattr(trial.train, field) for field in SEARCH_FIELDS},
            "score": result.metrics[key],
            **{k: v for k, v in result.metrics.items() if k.startswith("eval_") or k in ("train_runtime_s", "epochs")},
        })
    lower = metric in LOWER_IS_BETTER
    best = min(rows, key=lambda r: r["score"]) if lower else max(rows, key=lambda r: r["score"])
    best_index = rows.index(best)
    best_dir = output_dir / best["trial"]
    test_metrics = None
    if first.data.test_file:
        test_metrics = {k.replace("eval_", "test_", 1): v for k, v in evaluate_run(str(best_dir), first.data.test_file).items()}
    summary = {
        "metric": key,
        "mode": "min" if lower else "max",
        "best": {**best, "run_dir": str(best_dir), "index": best_index},
        "test_metrics": test_metrics,
        "trials": rows,
    }
    artifacts.write_json(output_dir / SEARCH_JSON, summary)
    artifacts.write_text(output_dir / SEARCH_CSV, _csv(rows))
    if first.export.export:
        from tfsft.export import export_run

        with stage("export"):
            export_run(best_dir)
    _log(f"search: best {best['trial']} with {key}={best['score']:.4f}; its run: {best_dir}")
    return SearchResult(rows, summary["best"], test_metrics, output_dir)


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
