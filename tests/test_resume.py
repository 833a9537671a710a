"""Resume after a crash: SIGKILL mid-epoch, the same command again, the same result as no crash.

The kill is made deterministic by a driver that runs the real `scripts/finetune.py` with one
extra user callback (the supported `finetune(config, callbacks=...)` API) that signals its own
process at a chosen batch of a chosen epoch.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_script
from tfsft import RunConfig, finetune

DRIVER = """
import os, runpy, signal, sys
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
from tfsft import pipeline
from tfsft.modeling import tf

epoch_at, batch_at, signum, script = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
# What a user's Ctrl-C meets, whatever this process inherited: a parent that blocked or ignored
# SIGINT (a worker that spawned a resource tracker, say) leaves it blocked or ignored here too.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)


class SignalSelf(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == epoch_at and batch == batch_at:
            signal.raise_signal(signum)  # to this thread (the main one): os.kill may land on another


run = pipeline.finetune
pipeline.finetune = lambda config, callbacks=None, verbose=1: run(config, callbacks=[SignalSelf()], verbose=verbose)
sys.argv = [script, *sys.argv[5:]]
runpy.run_path(script, run_name="__main__")
"""

COMPARED = ("eval_accuracy", "eval_loss", "eval_f1_macro", "eval_mcc", "train_loss_first_epoch", "train_loss_last_epoch", "epochs")


def run_with_signal(epoch: int, batch: int, signum: int, args: list[str], timeout: int = 300):
    """Run scripts/finetune.py ARGS, signalling itself after `batch` of `epoch` (0-based)."""
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(epoch), str(batch), str(int(signum)), str(ROOT / "scripts" / "finetune.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def cli_args(tiny_checkpoint, sst2_slices, out: Path, epochs: int = 3, **extra: str) -> list[str]:
    args = {
        "model_name_or_path": str(tiny_checkpoint), "train_file": str(sst2_slices["train"]),
        "validation_file": str(sst2_slices["dev"]), "num_train_epochs": str(epochs), "learning_rate": "2e-3",
        "warmup_ratio": "0", "per_device_train_batch_size": "16", "output_dir": str(out), **extra,
    }
    return [part for key, value in args.items() for part in (f"--{key}", value)] + ["--no_export"]


def tensorboard_steps(directory: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [event.step for event in EventAccumulator(str(directory)).Reload().Tensors(tag)]


def test_sigkill_mid_epoch_then_same_command_resumes_and_matches_uninterrupted(tiny_checkpoint, sst2_slices, tmp_path):
    args = cli_args(tiny_checkpoint, sst2_slices, tmp_path / "ref")
    flat = {args[i][2:]: args[i + 1] for i in range(0, len(args) - 1, 2)}
    reference = finetune(RunConfig.from_flat({**flat, "export": False}), verbose=0)

    out = tmp_path / "run"
    partial = tmp_path / ".run.partial"
    killed = run_with_signal(1, 20, signal.SIGKILL, cli_args(tiny_checkpoint, sst2_slices, out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists() and (partial / "backup").is_dir()
    assert len((partial / "history.csv").read_text().splitlines()) == 2  # header + epoch 1

    resumed = run_script("finetune.py", *cli_args(tiny_checkpoint, sst2_slices, out), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2 from the backup of epoch 1" in resumed.stderr
    assert "Epoch 1/3" not in resumed.stdout and "Epoch 2/3" in resumed.stdout
    assert not partial.exists()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_resumed"] == 1 and reference.metrics["epochs_resumed"] == 0
    for key in COMPARED:
        assert metrics[key] == reference.metrics[key], key
    assert (out / "history.csv").read_text() == (tmp_path / "ref" / "history.csv").read_text()
    assert not (out / "backup").exists() and not (out / "best_weights.h5").exists()

    assert tensorboard_steps(out / "logs" / "train", "epoch_loss") == [0, 1, 2]
    assert tensorboard_steps(out / "logs" / "validation", "epoch_accuracy") == [0, 1, 2]
    steps = tensorboard_steps(out / "logs" / "steps", "learning_rate")
    assert steps == sorted(set(steps)) == [20, 40, 60]


def test_ctrl_c_exits_with_resume_hint_and_keeps_the_partial_run(tiny_checkpoint, sst2_slices, tmp_path):
    out = tmp_path / "run"
    args = cli_args(tiny_checkpoint, sst2_slices, out, epochs=2, max_train_samples="160")
    result = run_with_signal(1, 3, signal.SIGINT, args)
    assert result.returncode == 130, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "resume" in errors[0] and f"--output_dir {out}" in errors[0]
    assert "Traceback" not in result.stderr
    partial = tmp_path / ".run.partial"
    assert not out.exists() and (partial / "backup").is_dir() and (partial / "config.json").is_file()


def test_ctrl_c_before_the_first_backup_keeps_nothing(tiny_checkpoint, sst2_slices, tmp_path):
    out = tmp_path / "run"
    result = run_with_signal(0, 2, signal.SIGINT, cli_args(tiny_checkpoint, sst2_slices, out, epochs=2, max_train_samples="160"))
    assert result.returncode == 130, result.stderr[-3000:]
    assert "nothing was kept" in result.stderr
    assert not out.exists() and not (tmp_path / ".run.partial").exists()


def test_resumed_run_with_gradient_accumulation_matches_uninterrupted(tiny_checkpoint, sst2_slices, tmp_path):
    """Killed after batch 21 of epoch 2 (an accumulated, not yet applied step): the resumed run
    replays epoch 2 from its start and ends as the uninterrupted one; 25 batches an epoch in
    pairs are 13 optimizer steps, logged once each."""
    extra = {"gradient_accumulation_steps": "2", "logging_steps": "13", "warmup_steps": "3"}
    args = cli_args(tiny_checkpoint, sst2_slices, tmp_path / "ref", **extra)
    flat = {args[i][2:]: args[i + 1] for i in range(0, len(args) - 1, 2)}
    reference = finetune(RunConfig.from_flat({**flat, "export": False}), verbose=0)

    out = tmp_path / "run"
    killed = run_with_signal(1, 20, signal.SIGKILL, cli_args(tiny_checkpoint, sst2_slices, out, **extra))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_script("finetune.py", *cli_args(tiny_checkpoint, sst2_slices, out, **extra), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2 from the backup of epoch 1" in resumed.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_resumed"] == 1
    for key in COMPARED:
        assert metrics[key] == reference.metrics[key], key
    assert tensorboard_steps(out / "logs" / "steps", "learning_rate") == [13, 26, 39]
    assert tensorboard_steps(tmp_path / "ref" / "logs" / "steps", "learning_rate") == [13, 26, 39]
