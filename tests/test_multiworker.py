"""`--strategy multiworker`: two workers on loopback ports train one run, sharded by data.

Each process is a fresh interpreter (MultiWorkerMirroredStrategy must come before any other TF
op), bounded by a timeout and killed in a `finally`. A callback in each process records how
many training examples its model consumed per epoch (the local count of the accuracy metric),
so matching metrics cannot hide that every worker trained on the whole data set.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT, shared_path, write_tsv_slice
from tfsft import artifacts

TRAIN_ROWS = 64
EPOCHS = 2
GLOBAL_BATCH = 16
WORKER_TIMEOUT_S = 420
METRIC_TOLERANCE = 0.02
"""Largest accepted gap between the chief's and a single-process run's metrics (see the test)."""

WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    from tfsft import RunConfig, finetune
    from tfsft.modeling import tf

    class ExamplesSeen(tf.keras.callbacks.Callback):
        # Per epoch: [steps, examples this process's replicas trained on].
        def on_train_begin(self, logs=None):
            self.epochs = []

        def on_epoch_begin(self, epoch, logs=None):
            self.steps, self.examples = 0, 0

        def on_train_batch_end(self, batch, logs=None):
            accuracy = next(m for m in self.model.metrics if m.name == "accuracy")
            local = self.model.distribute_strategy.experimental_local_results(accuracy.count)
            self.steps += 1
            self.examples = int(sum(float(v.numpy()) for v in local))

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append([self.steps, self.examples])

    settings, report = json.loads(sys.argv[1]), sys.argv[2]
    import tfsft.training as training
    compile_model = training.compile_model

    def compile_and_fingerprint(model, *args, **kwargs):
        # Print each trained example's sum of token ids (padding is 0): which examples, not just how many.
        compile_model(model, *args, **kwargs)
        train_step = model.train_step

        def fingerprinting_step(data):
            tf.print(tf.reduce_sum(data[0]["input_ids"], axis=1), summarize=-1, output_stream="file://" + report + ".ids")
            return train_step(data)

        model.train_step = fingerprinting_step

    training.compile_model = compile_and_fingerprint
    seen = ExamplesSeen()
    result = finetune(RunConfig.from_flat(settings), callbacks=[seen], verbose=0)
    with open(report, "w") as f:
        json.dump({"metrics": result.metrics, "seen": seen.epochs}, f)
""")


def free_ports(count: int) -> list[int]:
    """Ports the OS picks on 127.0.0.1, all held open until chosen so they are distinct."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def fingerprints_per_epoch(path: Path, steps: int) -> list[list[int]]:
    """The printed per-example id sums, one line per step (per local replica), grouped by epoch."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    values = [[int(v) for v in line.strip("[] ").split()] for line in lines]
    return [sum(values[i * steps : (i + 1) * steps], []) for i in range(len(values) // steps)]


def start(settings: dict, report: Path, log: Path, env: dict) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(settings), str(report)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def test_two_workers_train_one_run_sharded_by_data(tiny_checkpoint, tmp_path):
    train = write_tsv_slice(shared_path("glue", "SST-2", "train.tsv"), tmp_path / "train.tsv", TRAIN_ROWS)
    dev = write_tsv_slice(shared_path("glue", "SST-2", "dev.tsv"), tmp_path / "dev.tsv", 64)
    common = dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(train), validation_file=str(dev),
        num_train_epochs=EPOCHS, learning_rate=2e-3, warmup_ratio=0.0, max_seq_length=64,
        seed=7, export=False,
    )
    worker_tmp = tmp_path / "worker_tmp"
    worker_tmp.mkdir()
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    out = tmp_path / "multi"
    runs = {
        # Same global batch: 8 per replica x 2 workers, and 16 on the single process.
        "single": (dict(common, strategy="default", per_device_train_batch_size=GLOBAL_BATCH,
                        per_device_eval_batch_size=GLOBAL_BATCH, output_dir=str(tmp_path / "single")), None),
        **{
            f"worker{i}": (dict(common, strategy="multiworker", per_device_train_batch_size=GLOBAL_BATCH // 2,
                                per_device_eval_batch_size=GLOBAL_BATCH // 2, output_dir=str(out)),
                           {"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(2)
        },
    }
    processes = {}
    try:
        for name, (settings, tf_config) in runs.items():
            env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
            env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(worker_tmp))
            if tf_config is not None:
                env["TF_CONFIG"] = json.dumps(tf_config)
            processes[name] = start(settings, tmp_path / f"{name}.json", tmp_path / f"{name}.log", env)
        for name, process in processes.items():
            code = process.wait(timeout=WORKER_TIMEOUT_S)
            assert code == 0, f"{name} exited {code}:\n{(tmp_path / f'{name}.log').read_text()[-4000:]}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    # Every example once per epoch across the workers, in the same number of steps as one process.
    steps = TRAIN_ROWS // GLOBAL_BATCH
    assert reports["single"]["seen"] == [[steps, TRAIN_ROWS]] * EPOCHS
    for epoch in range(EPOCHS):
        counts = [reports[f"worker{i}"]["seen"][epoch] for i in range(2)]
        assert [c[0] for c in counts] == [steps, steps]
        assert sum(c[1] for c in counts) == TRAIN_ROWS and min(c[1] for c in counts) > 0, counts

    # Which examples: per epoch, the workers' fingerprints together are exactly the single run's.
    fingerprints = {name: fingerprints_per_epoch(tmp_path / f"{name}.json.ids", steps) for name in runs}
    for epoch in range(EPOCHS):
        together = sorted(fingerprints["worker0"][epoch] + fingerprints["worker1"][epoch])
        assert together == sorted(fingerprints["single"][epoch]) and len(together) == TRAIN_ROWS

    # The chief (worker 0) published a complete run; worker 1 wrote nothing that was kept.
    assert artifacts.is_finished_run(out)
    for name in (artifacts.CONFIG_FILE, artifacts.METRICS_FILE, artifacts.REPORT_FILE, artifacts.HISTORY_FILE,
                 f"{artifacts.MODEL_DIR}/config.json", f"{artifacts.MODEL_DIR}/tf_model.h5"):
        assert (out / name).is_file(), name
    assert list((out / artifacts.LOGS_DIR).rglob("events.out.tfevents.*"))
    assert not (out / artifacts.BACKUP_DIR).exists() and not (out / artifacts.BEST_WEIGHTS).exists()
    assert not artifacts.partial_dir_for(out).exists()
    assert len(artifacts.read_json(out / artifacts.METRICS_FILE)) > 0
    assert len((out / artifacts.HISTORY_FILE).read_text().splitlines()) == EPOCHS + 1
    assert not any(worker_tmp.glob("tfsft-*")), list(worker_tmp.iterdir())
    assert reports["worker1"]["metrics"]["epochs"] == EPOCHS

    chief, single = reports["worker0"]["metrics"], reports["single"]["metrics"]
    assert chief["replicas"] == 2 and single["replicas"] == 1
    assert chief["eval_samples"] == single["eval_samples"] == 64
    gaps = {key: abs(chief[key] - single[key]) for key in ("eval_accuracy", "eval_loss", "train_loss_last_epoch")}
    print(f"chief vs single-process gaps: {gaps}; examples per epoch: {[reports[n]['seen'] for n in runs]}")
    assert max(gaps.values()) <= METRIC_TOLERANCE, gaps


def test_a_rerun_after_a_crash_is_refused_by_every_worker_before_the_strategy(tiny_checkpoint, tmp_path):
    """A killed multiworker run leaves the chief's backup beside --output_dir; the other workers'
    state was in scratch dirs that are gone. Rerun, the chief would resume from its epoch and the
    others start at 0, and the cluster would hang. Each worker refuses instead, with one line, before
    it creates the strategy: started alone, neither waits for the other."""
    train = write_tsv_slice(shared_path("glue", "SST-2", "train.tsv"), tmp_path / "train.tsv", 32)
    out = tmp_path / "multi"
    partial = artifacts.partial_dir_for(out)
    (partial / artifacts.BACKUP_DIR / "chief").mkdir(parents=True)
    (partial / artifacts.BACKUP_DIR / "chief" / "checkpoint").write_text("what the killed chief saved\n")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    args = ["--model_name_or_path", str(tiny_checkpoint), "--train_file", str(train), "--max_seq_length", "32",
            "--num_train_epochs", "2", "--strategy", "multiworker", "--output_dir", str(out), "--no_export"]
    for index in (1, 0):
        env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
        env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune.py"), *args],
                                capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        assert result.returncode == 2, (index, result.stderr[-3000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cannot resume" in errors[0] and str(partial) in errors[0], result.stderr[-3000:]
    assert (partial / artifacts.BACKUP_DIR / "chief" / "checkpoint").read_text() == "what the killed chief saved\n"
    assert not out.exists()
