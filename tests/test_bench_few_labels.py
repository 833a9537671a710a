"""bench/few_labels.py: the per-class draws and unlabelled files (unit), and the script end to end
on the tiny BERT (plain always; few_shot and self_training where the installed tfsft has --few_shot)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, shared_path

SCRIPT = ROOT / "bench" / "few_labels.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_few_labels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_draws_are_balanced_seeded_nested_and_disjoint_from_the_unlabeled_file(tmp_path):
    bench = load_bench()
    labels = ["neg"] * 50 + ["pos"] * 30 + ["neu"] * 20
    texts = [f"text {i}" for i in range(len(labels))]
    texts[99] = texts[0]  # a repeated text: never unlabelled when its twin is drawn
    draw = bench.draw_per_class(labels, 8, seed=3)
    assert Counter(labels[i] for i in draw) == {"neg": 8, "pos": 8, "neu": 8}
    assert draw == bench.draw_per_class(labels, 8, seed=3) == sorted(set(draw))
    assert draw != bench.draw_per_class(labels, 8, seed=4)
    assert set(draw) <= set(bench.draw_per_class(labels, 16, seed=3))  # nested: 8 per class inside 16
    with pytest.raises(ValueError, match="fewer than 32 per class"):
        bench.draw_per_class(labels, 32, seed=0)

    files = bench.prepare_draw(tmp_path / "a", texts, labels, [4, 8], 3, unlabeled_samples=30)
    again = bench.prepare_draw(tmp_path / "b", texts, labels, [4, 8], 3, unlabeled_samples=30)
    for name in ("k4.tsv", "k8.tsv", "unlabeled.txt"):  # every method of the draw reads the same files
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert files["drawn"][8] == draw and set(files["drawn"][4]) <= set(draw)
    k8 = (tmp_path / "a" / "k8.tsv").read_text().splitlines()
    assert k8[0] == "sentence\tlabel" and len(k8) == 1 + 24
    unlabeled = (tmp_path / "a" / "unlabeled.txt").read_text().splitlines()
    assert len(unlabeled) == 30 == len(set(unlabeled))
    drawn_texts = {texts[i] for i in draw}
    assert not drawn_texts & set(unlabeled) and not set(draw) & set(again["unlabeled_indices"])
    if 0 in draw or 99 in draw:
        assert texts[0] not in unlabeled
    assert bench.clean("a\tb\nc  d\r") == "a b c d"


def test_a_row_matches_its_cell_across_a_setting_added_since_it_ran():
    """A row recorded before a setting existed stays valid while the cell leaves that setting at its
    default; any other difference (a value, a setting at another value, a setting removed since)
    runs the cell again."""
    bench = load_bench()
    defaults = bench.default_settings()
    assert defaults["seed"] == 42 and defaults["teacher_cache_dir"] is None
    cell_settings = bench.jsonable(bench.resolved_settings(dict(train_file="t.tsv", seed=3, learning_rate=5e-5)))
    key = dict(dataset="sst2", model="m", method="plain", k=16, draw=3, timed=False, max_seq_length=64,
               train_sha="a", dev_sha="b", unlabeled_sha=None)
    cell = dict(key, settings=cell_settings)
    old = {name: value for name, value in cell_settings.items() if name != "teacher_cache_dir"}
    assert bench.same_settings(cell_settings, old, defaults)
    assert not bench.same_settings(dict(cell_settings, teacher_cache_dir="/cache"), old, defaults)
    assert not bench.same_settings(cell_settings, dict(old, learning_rate=1e-4), defaults)
    assert not bench.same_settings(cell_settings, dict(cell_settings, removed_setting=1), defaults)
    assert not bench.same_settings(cell_settings, None, defaults)

    row = dict(key, settings=old, eval_accuracy=0.8)
    failed = dict(key, settings=cell_settings, error="killed")
    other_draw = dict(key, draw=4, settings=cell_settings, eval_accuracy=0.7)
    assert bench.matching_row([row, failed, other_draw], cell, defaults) is row
    newer = dict(row, eval_accuracy=0.9)
    assert bench.matching_row([row, newer], cell, defaults) is newer  # the last one recorded
    assert bench.matching_row([failed, other_draw], cell, defaults) is None


def check_rows(rows: list[dict], out: Path) -> None:
    for r in rows:
        assert r.get("error") is None, r
        assert r["k"] == 4 and r["train_examples"] == 8 and r["dev_examples"] == 50 and r["wall_s"] > 0
        assert 0 <= r["eval_accuracy"] <= 1 and r["train_runtime_s"] is not None
        run_dir = out / "runs" / f"k4-d{r['draw']}-{r['method']}"
        config = json.loads((run_dir / "config.json").read_text())
        assert Path(config["data"]["train_file"]) == out / "data" / f"draw{r['draw']}" / "k4.tsv"  # the draw's file
        assert config["train"]["seed"] == r["draw"]
        assert (run_dir / "metrics.json").is_file() and not (run_dir / "model").exists()  # weights pruned
        if r["method"] == "plain":
            assert config["train"]["num_train_epochs"] == 10 and r["epochs"] == 10 and "last_epoch_accuracy" in r
        else:
            assert r["few_shot_seconds"] is not None
        if r["method"] == "self_training":
            assert r["unlabeled_examples"] == 50 and isinstance(r["self_training"], list)
            assert r["unlabeled_sha"] is not None
    by_draw: dict[int, set] = {}
    for r in rows:  # one training file (hash) for every method of a draw, another for each draw
        by_draw.setdefault(r["draw"], set()).add(r["train_sha"])
    assert all(len(shas) == 1 for shas in by_draw.values()) and len(set.union(*by_draw.values())) == len(by_draw)


def test_few_labels_bench_end_to_end_on_the_tiny_bert(tiny_checkpoint, tmp_path):
    """sizes 4, draw 0, plain: a row per run, the summary table, the PNG. Then a rerun with plain and
    self_training (the few-shot recipe plus pseudo-labels): plain's run is skipped, as done."""
    shared_path("glue", "SST-2", "train.tsv")
    out = tmp_path / "out"
    common = ["--model_name_or_path", str(tiny_checkpoint), "--sizes", "4", "--max_eval_samples", "50",
              "--unlabeled_samples", "50", "--no-timed_run", "--output", str(out)]
    result = run_bench(*common, "--draws", "1", "--methods", "plain")
    assert result.returncode == 0, result.stderr[-3000:]

    rows = read_rows(out / "results.jsonl")
    assert sorted((r["method"], r["draw"]) for r in rows) == [("plain", 0)]
    check_rows(rows, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"]["4"]["plain"]["n"] == 1
    table = (out / "summary.md").read_text()
    assert "| per class | plain | plain, last epoch |" in table and "\n| 4 | " in table
    assert "## Targets (issue 14)" in table and "not measured" in table  # no 16/64 per class, no timed run
    assert table in result.stdout
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run_bench(*common, "--draws", "1", "--methods", "plain,self_training")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 run(s) planned, 1 already in" in again.stderr
    rows = read_rows(out / "results.jsonl")
    assert sorted((r["method"], r["draw"]) for r in rows) == [("plain", 0), ("self_training", 0)]
    check_rows(rows, out)
    summary = json.loads((out / "summary.json").read_text())
    assert {m: summary["cells"]["4"][m]["n"] for m in ("plain", "self_training")} == {"plain": 1, "self_training": 1}
    assert "| per class | plain | self_training |" in (out / "summary.md").read_text()

    later = run_bench(*common, "--first_draw", "1", "--draws", "1", "--methods", "plain")
    assert later.returncode == 0, later.stderr[-3000:]
    assert "1 run(s) planned, 0 already in" in later.stderr
    rows = read_rows(out / "results.jsonl")
    assert sorted((r["method"], r["draw"]) for r in rows) == [("plain", 0), ("plain", 1), ("self_training", 0)]
    assert json.loads((out / "summary.json").read_text())["cells"]["4"]["plain"]["n"] == 1  # draw 1 only
    assert "1 seeded draw(s) (seeds 1..1)" in (out / "summary.md").read_text()
