"""Peak memory and wall time of `tfsft export` for a tiny, a MiniLM and an MPNet-size model.

Each model gets a run directory as `finetune` leaves it (config.json, model/, the recorded
validation examples: 256 of the embedded tweets, as `--max_eval_samples 256`) without training:
the export costs the same for fresh and fine-tuned weights. The models:

- tiny: a seeded random 2-layer, hidden-32 BERT (the tests' model), 1M parameters;
- minilm: the embedded MiniLM-L6-H384 (22.7M parameters), the default model;
- base: a BERT-base-shaped model (12 layers, hidden 768, 110M parameters, the size of
  all-mpnet-base-v2) with seeded random weights.

Every export runs in its own subprocess (`python -m tfsft export RUN_DIR`), so peaks never mix;
its peak RSS is the kernel's (`wait4` ru_maxrss of that child alone), beside the per-stage peaks
the export wrote into export_report.json. The table gives the ratio of peak RSS to the bytes of
the model's float32 weights.

Baseline, measured in the same run: the tfsft package of another commit (default: BASELINE_REF,
the last one before this export's memory work; --baseline_ref) extracted with `git archive`
into a temp directory (the working tree is not touched) and run on a copy of each run directory
whose config.json loses the keys that commit does not know. A baseline export whose RSS passes
--baseline_cap_gb is killed and reported as such, so that it cannot take this machine's memory.

    python bench/export_memory.py [--models tiny,minilm,base] [--baseline_ref REF|none]
        [--baseline_models tiny,minilm,base] [--baseline_cap_gb 10] [--work_dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("tiny", "minilm", "base")
SHAPES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
"""BERT shapes of the random models (vocabulary: the MiniLM tokenizer's 30522 tokens)."""
EVAL_SAMPLES = 256
BASELINE_REF = "7d98427"
"""The last commit before the export's memory work (issue 15)."""
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_run(kind: str, directory: Path) -> Path:
    """A run directory of model `kind` in `directory` (see the module docstring); returns it."""
    import numpy as np

    from tfsft import artifacts
    from tfsft.config import RunConfig
    from tfsft.data import load_splits, task_label_map
    from tfsft.export import record_validation
    from tfsft.modeling import build_classifier, embedded_checkpoint, load_tokenizer, save_pretrained, tf

    checkpoint = embedded_checkpoint()
    if kind in SHAPES:
        from transformers import BertConfig, TFBertModel

        tf.keras.utils.set_random_seed(0)
        checkpoint = directory / f"{kind}-checkpoint"
        encoder = TFBertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **SHAPES[kind]))
        encoder(encoder.dummy_inputs)
        encoder.save_pretrained(str(checkpoint))
        for name in TOKENIZER_FILES:
            shutil.copy(embedded_checkpoint() / name, checkpoint / name)
    run_dir = directory / kind
    run_dir.mkdir(parents=True)
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(checkpoint), max_eval_samples=EVAL_SAMPLES, output_dir=str(run_dir),
    )).with_embedded_defaults()
    splits = load_splits(config.data, config.train.seed)
    label_map = task_label_map("classification", splits.train)
    model, _ = build_classifier(checkpoint, label_map)
    # A random head gives near-tied logits; widen its margins as training would.
    model.classifier.kernel.assign(model.classifier.kernel * 30.0)
    artifacts.save_config(config, run_dir)
    save_pretrained(model, load_tokenizer(checkpoint), run_dir / artifacts.MODEL_DIR)
    record_validation(run_dir, splits.validation)
    artifacts.write_json(run_dir / artifacts.METRICS_FILE, {"eval_samples": len(splits.validation)})
    weights = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    artifacts.write_json(directory / f"{kind}.weights.json", {"weight_bytes": weights, "parameters": weights // 4})
    if kind in SHAPES:
        shutil.rmtree(checkpoint)
    return run_dir


def _rss_bytes(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def measure(command: list[str], env: dict[str, str], cwd: Path, cap_bytes: Optional[int] = None) -> dict[str, Any]:
    """Run `command`; its peak RSS (ru_maxrss of that child alone, from wait4), wall time, exit
    code, stdout and stderr's tail. A child whose RSS passes `cap_bytes` is killed (`capped`)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        capped, done = threading.Event(), threading.Event()

        def watch() -> None:  # never polls the child: wait4 below must be the one to reap it
            while not done.wait(0.05):
                rss = _rss_bytes(process.pid)
                if cap_bytes is not None and rss is not None and rss > cap_bytes:
                    capped.set()
                    os.kill(process.pid, 9)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        watcher.join()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {
        "returncode": process.returncode,
        "capped": capped.is_set(),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "seconds": round(time.perf_counter() - start, 1),
        "stdout": stdout.decode(errors="replace"),
        "stderr": stderr.decode(errors="replace")[-3000:],
    }


def baseline_tree(ref: str, directory: Path) -> Path:
    """The tfsft package of commit `ref`, extracted (git archive) into `directory`."""
    directory.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "tfsft"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def baseline_run_copy(run_dir: Path, tree: Path, target: Path) -> Path:
    """A copy of `run_dir` whose config.json holds only the keys the baseline tree knows."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns(".onnx*", "onnx"))
    known = subprocess.run(
        [sys.executable, "-c", "import json, dataclasses, tfsft; from tfsft.config import _GROUPS; "
         "print(json.dumps([tfsft.__file__, {g: [f.name for f in dataclasses.fields(c)] for g, c in _GROUPS.items()}]))"],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True,
    )
    package, fields = json.loads(known.stdout)
    if not Path(package).is_relative_to(tree):
        sys.exit(f"the baseline imports tfsft from {package}, not from {tree}")
    config = json.loads((target / "config.json").read_text())
    for group, names in fields.items():
        config[group] = {k: v for k, v in config[group].items() if k in names}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def export_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "tfsft", "export", str(run_dir)]


def stage_summary(report: dict[str, Any]) -> str:
    stages = report.get("stages") or {}
    if not stages:
        return ""
    worst = max(stages, key=lambda name: (stages[name]["peak_rss_mb"], name.count("/")))
    return f"{worst} ({stages[worst]['peak_rss_mb']:.0f} MB)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--baseline_ref", default=BASELINE_REF, help="commit whose export is the baseline, or 'none'")
    parser.add_argument("--baseline_models", default="tiny,minilm,base")
    parser.add_argument("--baseline_cap_gb", type=float, default=10.0)
    parser.add_argument("--work_dir", help="keep the run directories here (reused when present)")
    parser.add_argument("--prepare", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        make_run(args.prepare[0], Path(args.prepare[1]))
        return
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; expected some of {list(MODELS)}")
    baseline_models = set() if args.baseline_ref == "none" else set(args.baseline_models.split(","))
    cap = int(args.baseline_cap_gb * 2**30)
    with tempfile.TemporaryDirectory(prefix="tfsft-export-memory-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tree = baseline_tree(args.baseline_ref, Path(tmp) / "baseline") if baseline_models else None
        rows = []
        for kind in models:
            if not (work / kind / "config.json").is_file():
                shutil.rmtree(work / kind, ignore_errors=True)
                subprocess.run([sys.executable, __file__, "--prepare", kind, str(work)], cwd=ROOT, check=True,
                               stdout=subprocess.DEVNULL)
            weights = json.loads((work / f"{kind}.weights.json").read_text())
            row: dict[str, Any] = {"model": kind, **weights}
            result = measure(export_command(work / kind), dict(os.environ), ROOT)
            if result["returncode"] != 0:
                sys.exit(f"{kind}: export failed:\n{result['stderr']}")
            report = json.loads(result["stdout"])
            bundle = work / kind / "onnx"
            row.update(
                peak_rss_bytes=result["peak_rss_bytes"], seconds=result["seconds"], worst_stage=stage_summary(report),
                stages=report.get("stages"), bundle_bytes=sum(p.stat().st_size for p in bundle.iterdir()),
                shipped=sorted((report.get("sizes_bytes") or {})),
            )
            if tree is not None and kind in baseline_models:
                copy = baseline_run_copy(work / kind, tree, Path(tmp) / f"baseline-{kind}")
                old = measure(export_command(copy), {**os.environ, "PYTHONPATH": str(tree)}, tree, cap)
                if old["returncode"] != 0 and not old["capped"]:
                    sys.exit(f"{kind}: baseline export failed:\n{old['stderr']}")
                row["baseline"] = {
                    "peak_rss_bytes": None if old["capped"] else old["peak_rss_bytes"],
                    "seconds": None if old["capped"] else old["seconds"],
                    "bundle_bytes": None if old["capped"] else sum(p.stat().st_size for p in (copy / "onnx").iterdir()),
                }
                shutil.rmtree(copy, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, args.baseline_ref, args.baseline_cap_gb)


def _gb(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def print_table(rows: list[dict[str, Any]], ref: str, cap_gb: float) -> None:
    print(f"\npeak RSS of `tfsft export` (GB = 1e9 bytes); baseline: the export of {ref} on the same run directory")
    print("| model | parameters | weights GB | peak RSS GB | peak / weights | target GB | wall s | "
          "worst stage | bundle MB | baseline peak GB | baseline s | baseline bundle MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        weights = r["weight_bytes"]
        target = 3.0 if r["model"] == "minilm" else (4 * weights + 1.5e9) / 1e9
        old = r.get("baseline")
        if old is None:
            old_cells = ["-", "-", "-"]
        elif old["peak_rss_bytes"] is None:
            old_cells = [f"> {cap_gb:g} GiB (killed)", "-", "-"]
        else:
            old_cells = [_gb(old["peak_rss_bytes"]), f"{old['seconds']:.1f}", f"{old['bundle_bytes'] / 1e6:.0f}"]
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {weights / 1e9:.3f} | {_gb(r['peak_rss_bytes'])} | "
              f"{r['peak_rss_bytes'] / weights:.1f}x | {target:.2f} | {r['seconds']:.1f} | {r['worst_stage']} | "
              f"{r['bundle_bytes'] / 1e6:.0f} | " + " | ".join(old_cells) + " |")
    names = sorted({name for r in rows for name in r["stages"] or {}},
                   key=lambda name: min(r["stages"][name]["started_s"] for r in rows if name in (r["stages"] or {})))
    print("\npeak RSS (MB = MiB) and seconds of each stage of the export, from export_report.json")
    print("| stage | " + " | ".join(r["model"] for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for name in names:
        cells = [f"{r['stages'][name]['peak_rss_mb']:.0f} MB, {r['stages'][name]['seconds']:.1f} s"
                 if name in (r["stages"] or {}) else "-" for r in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
