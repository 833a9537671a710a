"""End-to-end runs of the fine-tuning job on the tiny BERT and slices of SST-2 / MRPC."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script, write_csv
from tfsft import RunConfig, finetune
from tfsft.modeling import tf


def tiny_config(tiny_checkpoint, sst2_slices, output_dir, **overrides):
    values = dict(
        model_name_or_path=str(tiny_checkpoint),
        train_file=str(sst2_slices["train"]),
        validation_file=str(sst2_slices["dev"]),
        num_train_epochs=3,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        per_device_train_batch_size=16,
        output_dir=str(output_dir),
        export=False,
    )
    values.update(overrides)
    return RunConfig.from_flat(values)


def test_finetune_script_trains_saves_and_reevaluates(tiny_checkpoint, sst2_slices, tmp_path):
    out = tmp_path / "run"
    result = run_script(
        "finetune.py",
        "--model_name_or_path", str(tiny_checkpoint),
        "--train_file", str(sst2_slices["train"]),
        "--validation_file", str(sst2_slices["dev"]),
        "--num_train_epochs", "3", "--learning_rate", "2e-3", "--warmup_ratio", "0",
        "--per_device_train_batch_size", "16", "--output_dir", str(out), "--no_export",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eval_accuracy", "eval_f1_macro", "eval_mcc", "eval_f1", "eval_loss", "train_runtime_s", "train_examples_per_s"):
        assert key in metrics
    assert metrics["train_loss_last_epoch"] < metrics["train_loss_first_epoch"]
    assert metrics["newly_initialized"] == ["classifier"]
    for name in ("config.json", "eval_report.json", "confusion_matrix.png", "history.csv", "model/tf_model.h5", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = EventAccumulator(str(out / "logs" / "steps")).Reload()
    assert {"learning_rate", "train_loss"} <= set(steps.Tags()["tensors"])
    assert len(steps.Tensors("learning_rate")) >= 3
    assert list((out / "logs" / "train").glob("events.out.tfevents.*"))
    assert not (tmp_path / ".run.partial").exists()
    saved = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert saved.output_dir == str(out) and saved.train.learning_rate == 2e-3

    history = (out / "history.csv").read_text().splitlines()
    val_accuracy = [float(dict(zip(history[0].split(","), row.split(",")))["val_accuracy"]) for row in history[1:]]
    assert metrics["eval_accuracy"] == pytest.approx(max(val_accuracy), abs=1e-6)

    from transformers import TFAutoModelForSequenceClassification

    reloaded = TFAutoModelForSequenceClassification.from_pretrained(str(out / "model"))
    assert reloaded.config.id2label == {0: "0", 1: "1"}

    again = run_script("evaluate.py", str(out), "--file", str(sst2_slices["dev"]))
    assert again.returncode == 0, again.stderr[-3000:]
    reevaluated = json.loads((out / "evaluations" / "dev" / "metrics.json").read_text())
    assert reevaluated["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    assert reevaluated["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)


def test_evaluate_run_writes_into_evaluations_and_never_touches_the_runs_own_files(tiny_checkpoint, sst2_slices, tmp_path):
    """Files named like the run's own reports (eval.tsv, test.tsv, metrics.tsv) are evaluated into
    RUN/evaluations/<stem>/; every file of the run outside it stays byte for byte as it was."""
    from conftest import make_run, write_tsv_slice
    from tfsft import artifacts
    from tfsft.evaluation import write_evaluation
    from tfsft.pipeline import evaluate_run

    _, run, _, _ = make_run(tmp_path / "made", tiny_checkpoint, sst2_slices["dev"])
    artifacts.write_json(run / artifacts.METRICS_FILE, {"eval_accuracy": 0.5, "test_accuracy": 0.5})
    for name in ("eval", "test"):
        write_evaluation(run, {}, {"labels": ["0", "1"], "confusion_matrix": [[1, 2], [3, 4]], "decision": {}}, name)

    def run_files():
        return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
                if p.is_file() and p.relative_to(run).parts[0] != "evaluations"}

    before = run_files()
    for index, stem in enumerate(("eval", "test", "metrics")):
        data = write_tsv_slice(sst2_slices["dev"], tmp_path / f"{stem}.tsv", 30 + index, start=40 * index)
        metrics = evaluate_run(str(run), str(data))
        assert metrics["eval_samples"] == 30 + index
        out = run / "evaluations" / stem
        assert json.loads((out / "metrics.json").read_text()) == metrics
        report = json.loads((out / "eval_report.json").read_text())
        assert report["data_file"] == str(data) and sum(map(sum, report["confusion_matrix"])) == 30 + index
        assert (out / "confusion_matrix.png").is_file()
    assert run_files() == before
    assert sorted(p.name for p in (run / "evaluations").iterdir()) == ["eval", "metrics", "test"]
    (tmp_path / "again").mkdir()
    again = write_tsv_slice(sst2_slices["dev"], tmp_path / "again" / "eval.tsv", 20)
    assert evaluate_run(str(run), str(again))["eval_samples"] == 20  # the same stem again: replaced whole
    assert json.loads((run / "evaluations" / "eval" / "metrics.json").read_text())["eval_samples"] == 20
    assert not list((run / "evaluations").glob(".*"))


def test_python_api_calls_user_callbacks_and_is_reproducible(tiny_checkpoint, sst2_slices, tmp_path):
    class Counter(tf.keras.callbacks.Callback):
        epochs = 0

        def on_epoch_end(self, epoch, logs=None):
            Counter.epochs += 1

    first = finetune(tiny_config(tiny_checkpoint, sst2_slices, tmp_path / "a", num_train_epochs=2), callbacks=[Counter()], verbose=0)
    assert Counter.epochs == 2
    second = finetune(tiny_config(tiny_checkpoint, sst2_slices, tmp_path / "b", num_train_epochs=2), verbose=0)
    for key in ("eval_loss", "eval_accuracy", "train_loss_first_epoch", "train_loss_last_epoch"):
        assert first.metrics[key] == second.metrics[key], key


def test_sentence_pairs_and_held_out_split(tiny_checkpoint, mrpc_slices, tmp_path):
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(mrpc_slices["train"]), test_file=str(mrpc_slices["test"]),
        text_column="#1 String", text_pair_column="#2 String", label_column="Quality",
        num_train_epochs=1, output_dir=str(tmp_path / "pairs"), export=False, validation_split_percentage=20,
    ))
    result = finetune(config, verbose=0)
    assert result.metrics["eval_samples"] == 40 and result.metrics["train_samples"] == 160
    assert result.metrics["test_samples"] == 100 and "test_f1" in result.metrics
    assert (result.run_dir / "test_report.json").is_file()


MIRRORED = """
import os, json, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
from tfsft.modeling import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfsft import RunConfig, finetune

class Steps(tf.keras.callbacks.Callback):
    # What the optimizer did, and how many examples the replicas together trained on.
    def on_train_end(self, logs=None):
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        schedule = optimizer._learning_rate
        accuracy = next(m for m in self.model.metrics if m.name == "accuracy")
        local = self.model.distribute_strategy.experimental_local_results(accuracy.count)
        self.seen = dict(iterations=int(optimizer.iterations.numpy()), total_steps=schedule.total_steps,
                         warmup_steps=schedule.warmup_steps, final_lr=float(schedule(optimizer.iterations)),
                         examples=int(sum(float(v.numpy()) for v in local)), replicas=len(local))

settings = json.loads(sys.argv[1])
steps = Steps()
metrics = finetune(RunConfig.from_flat(settings), callbacks=[steps], verbose=0).metrics
print(json.dumps(dict(metrics=metrics, steps=steps.seen)))
"""


def test_mirrored_strategy_steps_once_per_global_batch(tiny_checkpoint, sst2_slices, tmp_path):
    """Two replicas of 8: a global batch of 16, so 400 examples are 25 optimizer steps (not 50),
    the warmup/decay schedule spans exactly those steps, and each example is trained on once."""
    settings = dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["train"]),
        validation_file=str(sst2_slices["dev"]), num_train_epochs=1, per_device_train_batch_size=8,
        warmup_ratio=0.1, strategy="mirrored", output_dir=str(tmp_path / "mirrored"), export=False,
    )
    result = subprocess.run([sys.executable, "-c", MIRRORED, json.dumps(settings)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    steps = 400 // (8 * 2)
    assert report["steps"] == dict(iterations=steps, total_steps=steps, warmup_steps=round(0.1 * steps),
                                   final_lr=0.0, examples=400, replicas=2)
    assert report["metrics"]["replicas"] == 2 and report["metrics"]["eval_samples"] == 200


@pytest.mark.parametrize(
    "case",
    ["missing_file", "missing_column", "empty_text", "unseen_label", "non_utf8", "ragged_row"],
)
def test_bad_input_exits_with_one_line_error_and_writes_nothing(tiny_checkpoint, tmp_path, case):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["good movie", "pos"], ["bad movie", "neg"]] * 10)
    dev = tmp_path / "dev.csv"
    contents = {
        "missing_column": b"text,target\ngood,pos\n",
        "empty_text": b"text,label\ngood,pos\n  ,neg\n",
        "unseen_label": b"text,label\ngood,pos\nmeh,neutral\n",
        "non_utf8": b"text,label\ngood,pos\nna\xefve,neg\n",
        "ragged_row": b"text,label\ngood,pos\nbad,neg,extra\n",
    }
    if case in contents:
        dev.write_bytes(contents[case])
    out = tmp_path / "out"
    result = run_script(
        "finetune.py", "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(train),
        "--validation_file", str(dev), "--output_dir", str(out), "--no_export", timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dev.csv" in errors[0], result.stderr[-2000:]
    if case != "missing_file":
        assert "row" in errors[0] or "column" in errors[0]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_refuses_to_overwrite_a_finished_run(tiny_checkpoint, sst2_slices, tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "config.json").write_text("{}")
    result = run_script("finetune.py", "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(sst2_slices["train"]), "--output_dir", str(out), timeout=120)
    assert result.returncode == 2 and "--overwrite_output_dir" in result.stderr
    assert (out / "metrics.json").read_text() == "{}"


EXPORT_FAULT_DRIVER = """
import os, runpy, signal, sys
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

fault, script = sys.argv[1], sys.argv[2]
if fault == "optimizer":
    import onnxruntime.transformers.optimizer as optimizer

    def broken_optimize_model(*args, **kwargs):
        raise RuntimeError("injected failure inside the ONNX optimizer")

    optimizer.optimize_model = broken_optimize_model
elif fault == "quantizer":
    import onnxruntime.quantization as quantization

    def broken_quantize_dynamic(*args, **kwargs):
        raise MemoryError("injected failure inside the int8 quantizer")

    quantization.quantize_dynamic = broken_quantize_dynamic
elif fault == "sigkill":
    from tfsft import export

    export.quantize_int8 = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""

RUN_FILES = ("config.json", "metrics.json", "eval_report.json", "history.csv", "model/config.json", "model/tokenizer.json")


def script_with_fault(fault, script, args, tmp_path):
    """scripts/<script> with `fault` injected (see EXPORT_FAULT_DRIVER), logging to tmp_path/logs."""
    return subprocess.run(
        [sys.executable, "-c", EXPORT_FAULT_DRIVER, fault, str(ROOT / "scripts" / script), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "TFSFT_LOG_DIR": str(tmp_path / "logs")},
    )


def snapshot(run_dir):
    """Every file of a run outside onnx/, with its bytes: what a later export must not touch."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "onnx" not in p.relative_to(run_dir).parts[0]}


def export_args(tiny_checkpoint, sst2_slices, out):
    return [
        "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(sst2_slices["train"]),
        "--validation_file", str(sst2_slices["dev"]), "--max_train_samples", "64", "--max_eval_samples", "48",
        "--max_seq_length", "32", "--per_device_train_batch_size", "16", "--output_dir", str(out),
    ]


def assert_export_failure(result, out, kind, tmp_path):
    """One line (no traceback) saying what failed and how to retry, with the traceback in a log."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in ("ONNX export failed", kind, f"tfsft export {out}", str(tmp_path / "logs")):
        assert fragment in errors[0], errors[0]
    log = Path(errors[0].rsplit("full traceback in ", 1)[1])
    assert "Traceback (most recent call last)" in log.read_text() and kind in log.read_text()


def assert_complete_without_bundle(out, tmp_path):
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert "eval_accuracy" in json.loads((out / "metrics.json").read_text())
    assert not (out / "onnx").exists() and not list(tmp_path.glob(".run.*"))


def test_a_failed_or_killed_export_never_costs_the_finished_run(tiny_checkpoint, sst2_slices, tmp_path):
    """One training, then four exports of it: failing inside the ONNX optimizer (at the end of
    training), SIGKILLed (rerun of the same command), failing inside the int8 quantizer
    (scripts/export.py), and the same command again, which finishes the export. The run's own
    files never change."""
    out = tmp_path / "run"
    args = export_args(tiny_checkpoint, sst2_slices, out)

    failed = script_with_fault("optimizer", "finetune.py", args, tmp_path)
    assert_export_failure(failed, out, "RuntimeError", tmp_path)
    assert f"the run was saved to {out}" in failed.stderr
    assert_complete_without_bundle(out, tmp_path)
    assert not list(out.glob(".onnx.*"))
    before = snapshot(out)

    killed = script_with_fault("sigkill", "finetune.py", args, tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "finishing its ONNX export" in killed.stderr
    assert_complete_without_bundle(out, tmp_path)
    assert list(out.glob(".onnx.*.partial")), "the kill should have hit a half-built bundle"
    assert snapshot(out) == before

    quantizer = script_with_fault("quantizer", "export.py", [str(out)], tmp_path)
    assert_export_failure(quantizer, out, "MemoryError", tmp_path)
    assert_complete_without_bundle(out, tmp_path)
    assert not list(out.glob(".onnx.*.partial"))
    assert snapshot(out) == before

    rerun = run_script("finetune.py", *args, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "finishing its ONNX export" in rerun.stderr
    bundle = json.loads((out / "onnx" / "bundle.json").read_text())
    assert set(bundle["files"]) == {"fused", "int8"}
    assert (out / "onnx" / "model.int8.onnx").is_file()
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".run.*"))


def test_config_json_records_the_detected_columns(tiny_checkpoint, tmp_path, monkeypatch):
    """Training and export are stubbed: this checks what the run's config.json says, and that
    rerunning the same command (columns still auto-detected) finishes a failed export."""
    from tfsft import artifacts, pipeline
    from tfsft.errors import ExportFailed

    def trained(config, *args, **kwargs):
        partial = next(a for a in args if isinstance(a, Path) and a.name.endswith(".partial"))
        artifacts.write_json(partial / artifacts.METRICS_FILE, {"eval_accuracy": 0.5})
        return {"eval_accuracy": 0.5}, None

    def export_fails(*args, **kwargs):
        raise RuntimeError("stubbed export")

    monkeypatch.setattr(pipeline, "_train_and_save", trained)
    monkeypatch.setattr(pipeline, "_export_trained", export_fails)
    rows = [[f"what is item {i}?", f"item {i} is a thing.", str(i % 2)] for i in range(12)]
    train = write_csv(tmp_path / "train.csv", ["question", "sentence", "label"], rows)
    dev = write_csv(tmp_path / "dev.csv", ["question", "sentence", "label"], rows[:4])
    out = tmp_path / "run"
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(train), validation_file=str(dev), output_dir=str(out),
    ))
    with pytest.raises(ExportFailed):
        finetune(config, verbose=0)
    saved = json.loads((out / "config.json").read_text())["data"]
    assert (saved["text_column"], saved["text_pair_column"], saved["label_column"]) == ("question", "sentence", "label")
    assert pipeline.awaits_export(config, out)
