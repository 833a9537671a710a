"""Several LoRA adapters of one base on CPU (issue 17): merged bundles against one base session
with per-adapter weights.

Modes, each measured for N adapters (`--adapters`, default 1,2,4,8):

- `merged` / `merged_int8`: N onnxruntime sessions, one per merged bundle (`RUN/onnx/model.fused.onnx`,
  or `model.int8.onnx`): what `tfsft serve --adapter a=RUN_A --adapter b=RUN_B` does for bundles
  without shared-base files.
- `lora` / `lora_fused` / `lora_int8`: ONE session of the unmerged graph (`lora_fused` and
  `lora_int8` are what `tfsft serve --adapter` runs for runs exported with `--adapter_files`), whose LoRA A/B matrices and
  head weights are graph inputs with initializer defaults, and per adapter an onnxruntime adapter
  file (`.onnx_adapter`) activated per call (`RunOptions.add_active_adapter`). `lora` is the graph
  as tf2onnx converted it (onnxruntime's own graph optimizations only); `lora_fused` after tfsft's
  rewrites and onnxruntime's transformer optimizer (`tfsft.export.optimize`); `lora_int8` that
  graph with its base weights quantized as `tfsft.export.quantize_int8` does, the adapters' and
  head's MatMuls left in fp32.

Preparation (this process, with TensorFlow): the unmerged Keras model of the first run
(`tfsft.lora.load_adapter(merge=False)`) is converted (`tfsft.export.convert_to_onnx`, opset 17);
the initializers holding its saved adapter and head weights are found by value and exposed as
graph inputs named `adapter/<weight>` (`tfsft.export_shared_base`, what `--adapter_files` ships);
adapter i gets the weights of run i mod len(RUNS), each
adapter its own file (and each merged session its own copy) so memory is honest. `--work_dir`
keeps these files and reuses them for the same runs. Parity: on `--check_examples` dev sentences
in batches of 8 of mixed lengths, every mode with each run's adapter is compared with that run's
unmerged Keras model, and every lora mode with the run's merged bundle (max |logit difference|);
an fp32 mode off by more than `FP32_TOLERANCE` is reported and not measured.

Measurement, in subprocesses without TensorFlow; the SST-2 dev sentences are tokenized first, and
only onnxruntime calls are timed. Speed: every (mode, N) cell in one process (the cells of a mode
share its sessions: N=2 calls the first 2 of N=8's), interleaved (turns of `--slice` batches, the
cells' order rotated every round) so that all share the machine's load alike, which on a shared
machine moves far more between processes than between cells: batches of
8 in file order, each padded to its longest, batch j of a cell to its adapter j mod N, until each
cell has run `--duration` seconds (texts/s); then `--latency_texts` sentences one at a time, each
through every cell, round-robin over its adapters (p50 ms). Memory: each cell alone in a fresh
process: load seconds, RSS (/proc/self/status VmRSS) before loading, after it, and after a fixed
workload. Each is repeated `--repeats` times (medians); speed ratios against `merged` N=1 are the
median of the ratios within each speed run. Also reported: bytes on disk per adapter and shared
by all. Results go to OUTPUT/results.json and OUTPUT/summary.md (also printed).

    python bench/lora_serving.py RUN_A RUN_B [RUN_C ...] [--adapters 1,2,4,8] [--repeats 3] [--duration 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfsft import artifacts  # noqa: E402
from tfsft.inference import Bundle, SharedBase, input_format, open_session, read_inputs  # noqa: E402
from tfsft.tokenize import TextEncoder, pad_batch  # noqa: E402

MODES = {
    "merged": "N sessions, merged fused fp32 bundles (model.fused.onnx)",
    "merged_int8": "N sessions, merged int8 bundles (model.int8.onnx)",
    "lora": "1 session, unmerged graph as converted + N adapter files",
    "lora_fused": "1 session, unmerged graph after the transformer optimizer + N adapter files",
    "lora_int8": "1 session, unmerged graph, int8 base + fp32 adapter files",
}
REFERENCE = ("merged", 1)
"""The cell every ratio is against."""
FP32_TOLERANCE = 1e-4
"""The export's parity bound (`tfsft.export.FP32_TOLERANCE`): an fp32 mode further off is not measured."""
BATCH_SIZE = 8
OPSET = 17
CHECK_BATCH = 8
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
"""`tfsft.lora.ADAPTER_WEIGHTS_FILE` (that module imports TensorFlow, which the measuring processes must not)."""


# ------------------------------------------------------------------------------- helpers


def rss_mb() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and at its peak (VmHWM), in MB."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": values["VmRSS"], "peak_rss_mb": values["VmHWM"]}


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [text for _, text in read_inputs(f, input_format(path), path) if isinstance(text, str)]


def padded_batches(encoder: TextEncoder, texts: list[str], size: int) -> list[dict[str, np.ndarray]]:
    """`texts` in consecutive batches of `size`, each padded to its longest (as the Predictor pads)."""
    encoded = encoder.encode(texts)
    return [pad_batch(encoded, list(range(start, min(start + size, len(texts)))), encoder.pad_id)
            for start in range(0, len(texts), size)]


def file_bytes(path: Path) -> int:
    return Path(path).stat().st_size


# --------------------------------------------------------------------------- preparation


def check_runs(runs: list[Path]) -> dict[str, Any]:
    """The runs' shared settings; they must be LoRA runs of one base with the same adapters' shape."""
    from tfsft.lora import read_adapter_config

    shared = ("base_weights_sha256", "r", "lora_alpha", "target_modules", "modules_to_save")
    configs = [read_adapter_config(run / "model") for run in runs]
    for run, config in zip(runs[1:], configs[1:]):
        differ = [key for key in shared if config.get(key) != configs[0].get(key)]
        if differ:
            raise SystemExit(f"{run}: differs from {runs[0]} in {differ}; the runs must be adapters of one base")
    tokenizers = {(run / "onnx" / artifacts.BUNDLE_TOKENIZER).read_bytes() for run in runs}
    if len(tokenizers) != 1:
        raise SystemExit("the runs' bundles ship different tokenizers; they must be adapters of one base")
    return {key: configs[0].get(key) for key in (*shared, "base_model_name_or_path")}


def keras_logits(model, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    from tfsft.modeling import feature_names, tf

    names = feature_names(model)
    return np.concatenate([
        model({name: tf.constant(batch[name]) for name in names}, training=False).logits.numpy() for batch in batches
    ])


def onnx_logits(session, batches: list[dict[str, np.ndarray]], run_options=None) -> np.ndarray:
    return np.concatenate([session.run(None, batch, run_options)[0] for batch in batches])


def add_parity(parity: dict[str, Any], logits: dict[str, np.ndarray], keras: np.ndarray) -> None:
    """Fold one adapter's logits per mode into `parity`: the largest |difference| from the Keras
    logits and from the merged bundle's (int8 modes: the merged int8's), the lowest label agreement."""
    for mode, values in logits.items():
        entry = parity.setdefault(mode, {"max_abs_vs_keras": 0.0, "max_abs_vs_merged": None, "label_agreement": 1.0})
        entry["max_abs_vs_keras"] = max(entry["max_abs_vs_keras"], float(np.abs(values - keras).max()))
        reference = logits.get("merged_int8" if mode.endswith("int8") else "merged")
        if reference is not None and mode not in ("merged", "merged_int8"):
            entry["max_abs_vs_merged"] = max(entry["max_abs_vs_merged"] or 0.0, float(np.abs(values - reference).max()))
        agreement = float(np.mean(values.argmax(-1) == keras.argmax(-1)))
        entry["label_agreement"] = min(entry["label_agreement"], agreement)


def prepare_once(args: argparse.Namespace, runs: list[Path], work: Path, count: int) -> dict[str, Any]:
    """`prepare`, or what it left in `work` before for the same runs (by their adapters' SHA-256),
    at least `count` adapters and the same parity examples."""
    import hashlib

    key = {
        "runs": [str(run) for run in runs], "eval_file": args.eval_file, "check_examples": args.check_examples,
        "sha256": [hashlib.sha256((run / "model" / ADAPTER_WEIGHTS_FILE).read_bytes()).hexdigest() for run in runs],
    }
    record = work / "prepared.json"
    if record.is_file():
        earlier = json.loads(record.read_text())
        if earlier.get("key") == key and len(earlier["prepared"]["adapters"]) >= count:
            print(f"[lora_serving] reusing the graphs and adapters prepared in {work}", file=sys.stderr, flush=True)
            return earlier["prepared"]
    print(f"[lora_serving] preparing in {work}", file=sys.stderr, flush=True)
    prepared = prepare(args, runs, work, count)
    artifacts.write_json(record, {"key": key, "prepared": prepared})
    return prepared


def prepare(args: argparse.Namespace, runs: list[Path], work: Path, count: int) -> dict[str, Any]:
    """Build the unmerged graphs and `count` adapter files in `work`, check every mode's logits;
    returns what the report needs (files, sizes, fusion, parity, modes that passed)."""
    from safetensors.numpy import load_file

    import onnx

    from tfsft.export import convert_to_onnx, optimize
    from tfsft.export_shared_base import adapter_inputs, expose_adapter_weights, quantize_base, write_adapter_file
    from tfsft.lora import load_adapter

    def exposed_inputs(path: Path) -> set[str]:
        return set(adapter_inputs(onnx.load(str(path))))

    settings = check_runs(runs)
    saved = [load_file(str(run / "model" / ADAPTER_WEIGHTS_FILE)) for run in runs]
    bundle = Bundle.load(runs[0] / "onnx")
    encoder = TextEncoder.from_file(bundle.directory / artifacts.BUNDLE_TOKENIZER, bundle.max_seq_length)
    check = padded_batches(encoder, read_texts(args.eval_file)[: args.check_examples], CHECK_BATCH)
    plain = work / "base.onnx"
    graphs = {mode: work / f"{mode}.onnx" for mode in ("lora", "lora_fused", "lora_int8")}
    began = time.perf_counter()
    model = load_adapter(runs[0] / "model", merge=False)
    heads, hidden = int(model.config.num_attention_heads), int(model.config.hidden_size)
    convert_to_onnx(model, plain, OPSET)
    keras_values = [keras_logits(model, check)]
    del model
    proto = onnx.load(str(plain))
    mapping = set(expose_adapter_weights(proto, saved[0], plain))
    onnx.save(proto, str(graphs["lora"]))
    del proto
    plain.unlink()
    seconds = {"convert_s": time.perf_counter() - began}
    began = time.perf_counter()
    fusion = optimize(graphs["lora"], graphs["lora_fused"], heads, hidden, OPSET)
    seconds["optimize_s"] = time.perf_counter() - began
    fused_exposed = exposed_inputs(graphs["lora_fused"])
    notes: dict[str, str] = {}
    if fused_exposed != set(mapping):
        kept = len(fused_exposed & set(mapping))
        notes["lora_fused"] = f"the optimizer kept {kept} of {len(mapping)} adapter inputs"
    int8_source = graphs["lora" if "lora_fused" in notes else "lora_fused"]
    began = time.perf_counter()
    quantize_base(int8_source, graphs["lora_int8"])
    seconds["quantize_s"] = time.perf_counter() - began
    if exposed_inputs(graphs["lora_int8"]) != mapping:
        notes["lora_int8"] = "the quantizer dropped adapter inputs"
    adapters = []
    for index in range(max(count, len(runs))):  # one per run at least: the parity check uses them
        path = work / "adapters" / f"adapter-{index}.onnx_adapter"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_adapter_file(path, saved[index % len(runs)])
        adapters.append(path)
    merged_files = {"merged": artifacts.BUNDLE_MODEL_FUSED, "merged_int8": artifacts.BUNDLE_MODEL_INT8}
    for mode, name in merged_files.items():
        lacking = [str(run) for run in runs if not (run / "onnx" / name).is_file()]
        if lacking:
            notes[mode] = f"no {name} in {lacking[0]}/onnx (export with --export_variants fused,int8)"
    # Parity: each run's adapter in every lora graph against its Keras model and merged bundle.
    parity: dict[str, Any] = {}
    sessions = {mode: open_session(path, None, quiet=True) for mode, path in graphs.items() if mode not in notes}
    for index, run in enumerate(runs):
        if index:
            model = load_adapter(run / "model", merge=False)
            keras_values.append(keras_logits(model, check))
            del model
            gc.collect()
        logits = {mode: onnx_logits(open_session(run / "onnx" / name, None, quiet=True), check)
                  for mode, name in merged_files.items() if mode not in notes}
        options, adapter = SharedBase.activate(adapters[index])
        logits.update({mode: onnx_logits(session, check, options) for mode, session in sessions.items()})
        del options, adapter
        add_parity(parity, logits, keras_values[-1])
    # How far apart the adapters are: what the check must tell apart.
    apart = [float(np.abs(keras_values[i] - keras_values[j]).max()) for i in range(len(runs)) for j in range(i)]
    for mode, entry in parity.items():
        if not mode.endswith("int8") and entry["max_abs_vs_keras"] > FP32_TOLERANCE:
            notes[mode] = f"max |logit - Keras| {entry['max_abs_vs_keras']:.2e} > {FP32_TOLERANCE:g}"
    del sessions
    gc.collect()
    report = Bundle.load(runs[0] / "onnx").report() or {}
    return {
        "settings": settings,
        "adapter_inputs": len(mapping),
        "fusion": {"merged": report.get("fusion", {}).get("fused_operators"), "lora_fused": fusion["fused_operators"],
                   "lora_fused_rewrites": fusion["rewrites"]},
        "parity": parity,
        "parity_examples": sum(len(batch["input_ids"]) for batch in check),
        "adapters_apart": min(apart) if apart else None,
        "prepare_seconds": {key: round(value, 1) for key, value in seconds.items()},
        "notes": notes,
        "graphs": {mode: str(path) for mode, path in graphs.items()},
        "adapters": [str(path) for path in adapters],
        "bytes": {
            **{mode: [file_bytes(run / "onnx" / name) for run in runs] for mode, name in merged_files.items()
               if mode not in notes},
            "adapter_file": file_bytes(adapters[0]),
            "adapter_safetensors": file_bytes(runs[0] / "model" / ADAPTER_WEIGHTS_FILE),
            **{f"{mode}_graph": file_bytes(path) for mode, path in graphs.items()},
        },
    }


# ----------------------------------------------------------------------------- measurement

Cell = tuple[str, int]
"""(mode, N adapters)."""


def _merged_call(session) -> Callable:
    return lambda feed: session.run(None, feed)


def _adapter_call(session, active: tuple) -> Callable:
    return lambda feed: session.run(None, feed, active[0])  # `active` keeps its adapter alive


def open_cells(spec: dict[str, Any], cells: list[Cell]) -> dict[Cell, list[Callable]]:
    """Load what `cells` need and give each cell one callable per adapter. Cells of one mode share
    the loaded models (N=2 calls the first 2 of N=8's sessions or adapters): each call still goes
    to the session, or adapter, of its own adapter."""
    largest: dict[str, int] = {}
    for mode, n in cells:
        largest[mode] = max(largest.get(mode, 0), n)
    adapters = max((n for mode, n in largest.items() if not mode.startswith("merged")), default=0)
    active = [SharedBase.activate(Path(path)) for path in spec["adapters"][:adapters]]
    per_adapter: dict[str, list[Callable]] = {}
    for mode, n in largest.items():
        if mode.startswith("merged"):
            sessions = [open_session(Path(path), spec["num_threads"], quiet=True) for path in spec["models"][mode][:n]]
            per_adapter[mode] = [_merged_call(session) for session in sessions]
        else:
            session = open_session(Path(spec["graphs"][mode]), spec["num_threads"], quiet=True)
            per_adapter[mode] = [_adapter_call(session, pair) for pair in active[:n]]
    return {(mode, n): per_adapter[mode][:n] for mode, n in cells}


def _inputs(spec: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The dev sentences as model inputs: (batches of BATCH_SIZE in file order, single texts)."""
    bundle = Bundle.load(spec["bundle"])
    encoder = TextEncoder.from_file(bundle.directory / artifacts.BUNDLE_TOKENIZER, bundle.max_seq_length)
    texts = read_texts(spec["eval_file"])
    return padded_batches(encoder, texts, BATCH_SIZE), padded_batches(encoder, texts[: spec["latency_texts"]], 1)


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """One cell alone in this process: load seconds and RSS before loading, after it, and after
    a fixed workload (the widest batch through every adapter, then 2N batches round-robin)."""
    batches, _ = _inputs(spec)
    import onnxruntime  # noqa: F401  (in the baseline RSS, as in every mode)

    gc.collect()
    cell = (spec["mode"], spec["n"])
    before = rss_mb()
    began = time.perf_counter()
    calls = open_cells(spec, [cell])[cell]
    load_s = time.perf_counter() - began
    loaded = rss_mb()
    widest = max(batches, key=lambda batch: batch["input_ids"].size)
    for call in calls:
        call(widest)
    for j in range(max(16, 2 * len(calls))):
        calls[j % len(calls)](batches[j % len(batches)])
    after = rss_mb()
    return {
        "load_s": load_s, "rss_base_mb": before["rss_mb"], "rss_loaded_mb": loaded["rss_mb"],
        "rss_after_mb": after["rss_mb"], "models_mb": after["rss_mb"] - before["rss_mb"],
        "peak_rss_mb": after["peak_rss_mb"],
    }


def measure_speed(spec: dict[str, Any]) -> dict[str, Any]:
    """Every cell in this one process, interleaved so that all share the machine's load alike:
    rounds in which each cell (in an order rotated every round) runs `slice` batches, batch j of
    a cell going to its adapter j mod N, until each cell has run `duration` seconds; then each
    single text through every cell in turn (latency)."""
    batches, singles = _inputs(spec)
    cells = [tuple(cell) for cell in spec["cells"]]
    calls = open_cells(spec, cells)
    for cell in cells:
        for call in calls[cell]:
            call(batches[0])
    load_average = os.getloadavg()[0]
    spent, done, position = dict.fromkeys(cells, 0.0), dict.fromkeys(cells, 0), dict.fromkeys(cells, 0)
    rounds = 0
    while min(spent.values()) < spec["duration"]:
        for cell in cells[rounds % len(cells):] + cells[: rounds % len(cells)]:
            adapters, began = calls[cell], time.perf_counter()
            for _ in range(spec["slice"]):
                j = position[cell]
                batch = batches[j % len(batches)]
                adapters[j % len(adapters)](batch)
                done[cell] += len(batch["input_ids"])
                position[cell] = j + 1
            spent[cell] += time.perf_counter() - began
        rounds += 1
    latencies: dict[Cell, list[float]] = {cell: [] for cell in cells}
    for k, feed in enumerate(singles):
        for cell in cells[k % len(cells):] + cells[: k % len(cells)]:
            began = time.perf_counter()
            calls[cell][k % len(calls[cell])](feed)
            latencies[cell].append((time.perf_counter() - began) * 1000)
    return {
        "load_average_1m": [load_average, os.getloadavg()[0]], "rounds": rounds,
        "cells": [{"mode": mode, "n": n, "texts_per_s": done[(mode, n)] / spent[(mode, n)],
                   "p50_ms": float(np.median(latencies[(mode, n)])),
                   "p90_ms": float(np.percentile(latencies[(mode, n)], 90))} for mode, n in cells],
    }


def base_spec(args: argparse.Namespace, runs: list[Path], prepared: dict[str, Any], count: int) -> dict[str, Any]:
    """What a measuring process needs: model files (adapter i of a merged mode is run i mod
    len(runs)'s bundle), the unmerged graphs and adapter files, the inputs."""
    merged = {"merged": artifacts.BUNDLE_MODEL_FUSED, "merged_int8": artifacts.BUNDLE_MODEL_INT8}
    return {
        "bundle": str(runs[0] / "onnx"), "eval_file": args.eval_file, "latency_texts": args.latency_texts,
        "num_threads": args.num_threads, "duration": args.duration, "slice": args.slice,
        "models": {mode: [str(runs[i % len(runs)] / "onnx" / name) for i in range(count)]
                   for mode, name in merged.items()},
        "graphs": prepared["graphs"], "adapters": prepared["adapters"][:count],
    }


def run_measure(kind: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """`measure_memory` or `measure_speed` of `spec` in a fresh process (no TensorFlow in it)."""
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    finished = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", kind, str(path)],
                              capture_output=True, text=True, cwd=ROOT)
    if finished.returncode != 0:
        return {"error": (finished.stderr.strip().splitlines() or [f"exit {finished.returncode}"])[-1]}
    return json.loads(finished.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- report


def median_of(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def combine(cells: list[Cell], memory: dict[Cell, list[dict]], speed: list[dict[str, Any]]) -> dict[Cell, dict]:
    """Each cell's medians over the repeats; `x_` ratios are medians of each speed run's ratio
    against `REFERENCE` in that same run, so they compare cells that shared the machine's load."""
    runs = [{(c["mode"], c["n"]): c for c in run["cells"]} for run in speed if "error" not in run]
    combined: dict[Cell, dict] = {}
    for cell in cells:
        row: dict[str, Any] = {}
        ok = [m for m in memory.get(cell, []) if "error" not in m]
        for key in ("load_s", "rss_base_mb", "rss_loaded_mb", "rss_after_mb", "models_mb", "peak_rss_mb"):
            row[key] = median_of([m[key] for m in ok])
        errors = [m["error"] for m in [*memory.get(cell, []), *speed] if "error" in m]
        if errors:
            row["errors"] = errors
        for key in ("texts_per_s", "p50_ms", "p90_ms"):
            row[key] = median_of([run[cell][key] for run in runs if cell in run])
        for key in ("texts_per_s", "p50_ms"):
            row[f"x_{key}"] = median_of([run[cell][key] / run[REFERENCE][key] for run in runs
                                         if cell in run and REFERENCE in run])
        combined[cell] = row
    return combined


def paired(speed: list[dict[str, Any]], cell: Cell, other: Cell, key: str) -> Optional[float]:
    """Median over the speed runs of cell's `key` / other's, each pair from one run."""
    runs = [{(c["mode"], c["n"]): c for c in run["cells"]} for run in speed if "error" not in run]
    return median_of([run[cell][key] / run[other][key] for run in runs if cell in run and other in run])


def disk_bytes(prepared: dict[str, Any], mode: str, n: int) -> tuple[int, int]:
    """(bytes per adapter, bytes shared by all adapters) on disk for `n` adapters."""
    sizes = prepared["bytes"]
    if mode.startswith("merged"):
        per_run = sizes[mode]
        return int(np.mean([per_run[i % len(per_run)] for i in range(n)])), 0
    return sizes["adapter_file"], sizes[f"{mode}_graph"]


PAIRS = (("lora", "merged"), ("lora_fused", "merged"), ("lora_int8", "merged_int8"))
"""(one base session, N merged sessions) compared at the same N."""


def _num(value: Optional[float], spec: str, unit: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + unit


def summary(args: argparse.Namespace, runs: list[Path], prepared: dict[str, Any], cells: dict[Cell, dict],
            speed: list[dict[str, Any]]) -> str:
    """The Markdown report: every cell with ratios against `REFERENCE`, the modes compared at the
    same N, RSS per extra adapter, fusion and parity."""
    ref = cells.get(REFERENCE, {})
    mb = 1024 * 1024
    loads = [value for run in speed if "error" not in run for value in run["load_average_1m"]]
    settings = prepared["settings"]
    lines = [
        f"{len(runs)} LoRA runs of {settings['base_model_name_or_path']} (rank {settings['r']}, targets "
        f"{','.join(settings['target_modules'])}), adapter i = run i mod {len(runs)}. Speed: SST-2 dev in batches "
        f"of {BATCH_SIZE}, round-robin over the adapters, all cells interleaved in one process ({args.slice} batches "
        f"per turn, {args.duration:g} s per cell), {args.latency_texts} single texts for latency; memory: each cell "
        f"alone in a fresh process. Medians of {args.repeats} runs; {os.cpu_count()} CPUs, intra-op threads "
        f"{args.num_threads or 'default'}, machine load average (1 min) "
        f"{f'{min(loads):.1f} to {max(loads):.1f}' if loads else 'n/a'}. x: against {REFERENCE[0]} N={REFERENCE[1]} "
        "(speed: median of the ratios within each run).",
        "",
        "| mode | N | texts/s | x | p50 ms (1 text) | x | RSS loaded MB | RSS after runs MB | x | "
        "models MB (after - base) | load s | MB on disk per adapter | MB shared |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (mode, n), cell in cells.items():
        per, shared = disk_bytes(prepared, mode, n)
        rss_x = cell["rss_after_mb"] / ref["rss_after_mb"] if cell["rss_after_mb"] and ref.get("rss_after_mb") else None
        lines.append(
            f"| {mode} | {n} | {_num(cell['texts_per_s'], '.1f')} | {_num(cell['x_texts_per_s'], '.2f', 'x')} | "
            f"{_num(cell['p50_ms'], '.2f')} | {_num(cell['x_p50_ms'], '.2f', 'x')} | "
            f"{_num(cell['rss_loaded_mb'], '.0f')} | "
            f"{_num(cell['rss_after_mb'], '.0f')} | {_num(rss_x, '.2f', 'x')} | {_num(cell['models_mb'], '.0f')} | "
            f"{_num(cell['load_s'], '.2f')} | {per / mb:.2f} | {shared / mb:.1f} |"
        )
    counts = sorted({n for _, n in cells})
    same_n = []
    for lora, merged in PAIRS:
        for n in counts:
            a, b = cells.get((lora, n)), cells.get((merged, n))
            if a and b:
                rss = a["rss_after_mb"] / b["rss_after_mb"] if a["rss_after_mb"] and b["rss_after_mb"] else None
                texts, p50 = (paired(speed, (lora, n), (merged, n), key) for key in ("texts_per_s", "p50_ms"))
                same_n.append(f"| {lora} / {merged} | {n} | {_num(texts, '.2f', 'x')} | {_num(p50, '.2f', 'x')} | "
                              f"{_num(rss, '.2f', 'x')} |")
    if same_n:
        lines += ["", "One base session against N merged sessions, at the same N:", "",
                  "| modes | N | texts/s | p50 ms | RSS after runs |", "|---|---:|---:|---:|---:|", *same_n]
    slopes = []
    for mode in dict.fromkeys(mode for mode, _ in cells):
        ns = sorted(n for m, n in cells if m == mode and cells[(m, n)]["rss_after_mb"] is not None)
        if len(ns) > 1:
            low, high = cells[(mode, ns[0])], cells[(mode, ns[-1])]
            slopes.append(f"{mode} {(high['rss_after_mb'] - low['rss_after_mb']) / (ns[-1] - ns[0]):+.1f} MB")
    if slopes:
        lines += ["", f"RSS after runs per extra adapter (N={counts[0]} to {counts[-1]}): " + "; ".join(slopes)]
    fusion, apart = prepared["fusion"], prepared["adapters_apart"]
    lines += [
        "",
        f"Fusion: merged bundles {fusion['merged']}; the unmerged graph after the same rewrites and optimizer "
        f"{fusion['lora_fused'] or 'nothing'} (rewrites {fusion['lora_fused_rewrites']}).",
        "",
        f"Parity on {prepared['parity_examples']} dev sentences (batches of {CHECK_BATCH}, mixed lengths) with each "
        "run's adapter" + ("" if apart is None else f"; two runs' Keras logits differ by at least {apart:.2e}") + ":",
        "",
        "| mode | max abs vs Keras (unmerged) | max abs vs merged bundle (int8 modes: merged int8) | "
        "label agreement with Keras |",
        "|---|---:|---:|---:|",
    ]
    for mode, entry in prepared["parity"].items():
        merged = entry["max_abs_vs_merged"]
        lines.append(f"| {mode} | {entry['max_abs_vs_keras']:.2e} | {'' if merged is None else f'{merged:.2e}'} | "
                     f"{entry['label_agreement']:.3f} |")
    for mode, note in prepared["notes"].items():
        lines.append(f"\n{mode} not measured: {note}")
    errors = sorted({error for cell in cells.values() for error in cell.get("errors", [])})
    for error in errors:
        lines.append(f"\nA measuring process failed: {error}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="LoRA run directories (--lora_rank) of one base, with ONNX bundles.")
    parser.add_argument("--adapters", default="1,2,4,8", help="Comma-separated adapter counts N.")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated, of {', '.join(MODES)}.")
    parser.add_argument("--eval_file", default=str(ROOT.parent / "shared/data/glue/SST-2/dev.tsv"))
    parser.add_argument("--duration", type=float, default=3.0, help="Seconds of batched calls per cell and run.")
    parser.add_argument("--slice", type=int, default=4, help="Batches a cell runs per turn.")
    parser.add_argument("--latency_texts", type=int, default=100, help="Single-text calls per cell and run.")
    parser.add_argument("--check_examples", type=int, default=64, help="Dev sentences of the parity check.")
    parser.add_argument("--repeats", type=int, default=3, help="Speed runs, and fresh processes per cell for memory.")
    parser.add_argument("--num_threads", type=int, default=None, help="onnxruntime intra-op threads (default: ort's).")
    parser.add_argument("--work_dir", default=None,
                        help="Keep the unmerged graphs and adapter files here, and reuse them (default: a temp dir).")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "lora_serving"))
    parser.add_argument("--measure", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        kind, path = args.measure
        spec = json.loads(Path(path).read_text())
        print(json.dumps(measure_memory(spec) if kind == "memory" else measure_speed(spec)))
        return 0
    if not args.runs:
        parser.error("name at least one LoRA run directory")
    runs = [Path(run).resolve() for run in args.runs]
    counts = sorted({int(n) for n in args.adapters.split(",") if n.strip()})
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not counts or min(counts) < 1:
        parser.error(f"--modes of {list(MODES)}, --adapters positive. Received: {args.modes!r}, {args.adapters!r}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lora_serving-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepared = prepare_once(args, runs, work, max(counts))
        cells = [(mode, n) for mode in modes if mode not in prepared["notes"] for n in counts]
        spec = base_spec(args, runs, prepared, max(counts))
        memory: dict[Cell, list[dict[str, Any]]] = {cell: [] for cell in cells}
        speed: list[dict[str, Any]] = []
        for repeat in range(max(1, args.repeats)):
            for mode, n in cells if repeat % 2 == 0 else cells[::-1]:
                print(f"[lora_serving] run {repeat + 1}: memory of {mode} N={n}", file=sys.stderr, flush=True)
                memory[(mode, n)].append(run_measure("memory", {**spec, "mode": mode, "n": n}, work))
            print(f"[lora_serving] run {repeat + 1}: speed of all cells", file=sys.stderr, flush=True)
            order = cells if repeat % 2 == 0 else cells[::-1]
            speed.append(run_measure("speed", {**spec, "cells": order}, work))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    combined = combine(cells, memory, speed)
    text = summary(args, runs, prepared, combined, speed)
    output = Path(args.output)
    artifacts.write_json(output / "results.json", {
        "runs": [str(run) for run in runs], "args": {k: v for k, v in vars(args).items() if k != "measure"},
        "cpus": os.cpu_count(), "modes": {mode: MODES[mode] for mode in modes},
        "prepared": {k: v for k, v in prepared.items() if k not in ("graphs", "adapters")},
        "cells": [{"mode": mode, "n": n, **combined[(mode, n)], "memory_runs": memory[(mode, n)]} for mode, n in cells],
        "speed_runs": speed,
    })
    artifacts.write_text(output / "summary.md", text)
    print(text)
    return 1 if any("errors" in cell for cell in combined.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
