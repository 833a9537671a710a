"""The bad-input matrix at the CLI: each row a one-line error naming file/row/field, a non-zero
exit, and no half-written output (no run directory, no partial directory, an older run intact).

Input that can be checked without TensorFlow is refused before it is imported (each such row runs
with a stand-in `tensorflow` package that raises on import), and no error carries TensorFlow's
start-up noise.

Rows already covered elsewhere: missing file, missing column, empty text, unseen label, non-UTF-8
and ragged rows at the CLI in test_pipeline.py; corrupt/truncated ONNX and a bundle whose label
map does not match the model in test_inference.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, env_without_tensorflow, run_script, write_csv

GOOD_ROWS = [["a good movie", "pos"], ["a bad movie", "neg"]] * 16
TENSORFLOW_NOISE = ("oneDNN", "cuInit", "cuda", "absl::InitializeLog", "TensorFlow was imported")

# row name -> (file name, bytes of the training file, fragment the error line must contain)
DATA_ROWS = {
    "directory": (None, None, "is a directory"),
    "empty_file": ("train.csv", b"", "file is empty"),
    "header_only": ("train.csv", b"text,label\n", "header only"),
    "unterminated_quote": ("train.csv", b'text,label\ngood,pos\n"bad movie,neg\n', "row 3"),
    "whitespace_only_text": ("train.csv", b"text,label\ngood,pos\n \t ,neg\n", "row 3: empty text in column 'text'"),
    "whitespace_only_tsv": ("train.tsv", b"sentence\tlabel\ngood\t1\n   \t0\n", "row 3: empty text in column 'sentence'"),
    "blank_label": ("train.csv", b"text,label\ngood,pos\nbad,\n", "row 3: missing or blank label in column 'label'"),
    "nan_label": ("train.jsonl", b'{"text": "good", "label": 1}\n{"text": "bad", "label": NaN}\n', "row 2: missing or blank label"),
    "single_class": ("train.csv", b"text,label\ngood,pos\nfine,pos\n", "only one class"),
    "duplicated_header": ("train.csv", b"text,label,text\ngood,pos,x\n", "duplicated column name(s) ['text']"),
}


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    for noise in TENSORFLOW_NOISE:
        assert noise not in result.stderr, result.stderr[-3000:]
    return errors[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())


@pytest.mark.parametrize("row", sorted(DATA_ROWS))
def test_bad_training_file(tiny_checkpoint, tmp_path, row):
    name, content, fragment = DATA_ROWS[row]
    if name is None:
        train = tmp_path / "data_dir"
        train.mkdir()
    else:
        train = tmp_path / name
        train.write_bytes(content)
    out = tmp_path / "out"
    result = run_script(
        "finetune.py", "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(train),
        "--output_dir", str(out), "--no_export", timeout=120, env=env_without_tensorflow(tmp_path / "no_tf"),
    )
    assert_one_line_error(result, str(train), fragment)
    assert_nothing_written(out)


def broken_checkpoints(tiny_checkpoint: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """A few ways a --model_name_or_path can be wrong, each with its expected error fragment."""
    import shutil

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_checkpoint, root / name))

    no_config = copy("no_config")
    (no_config / "config.json").unlink()
    bad_config = copy("bad_config")
    (bad_config / "config.json").write_text("{not json")
    truncated = copy("truncated_weights")
    weights = (truncated / "tf_model.h5").read_bytes()
    (truncated / "tf_model.h5").write_bytes(weights[: len(weights) // 3])
    no_weights = copy("no_weights")
    (no_weights / "tf_model.h5").unlink()
    a_file = root / "model.bin"
    a_file.write_bytes(b"\0" * 16)
    return {
        "missing_dir": (root / "nope", "checkpoint directory not found"),
        "a_file": (a_file, "must be a directory"),
        "no_config": (no_config, "config.json missing"),
        "bad_config": (bad_config, "unreadable config.json"),
        "truncated_weights": (truncated, "cannot load weights"),
        "no_weights": (no_weights, "no TensorFlow-loadable weights"),
    }


@pytest.mark.parametrize("row", ["missing_dir", "a_file", "no_config", "bad_config", "truncated_weights", "no_weights"])
def test_wrong_or_corrupt_checkpoint(tiny_checkpoint, tmp_path, row):
    checkpoint, fragment = broken_checkpoints(tiny_checkpoint, tmp_path)[row]
    train = write_csv(tmp_path / "train.csv", ["text", "label"], GOOD_ROWS)
    out = tmp_path / "out"
    needs_tensorflow = row == "truncated_weights"  # only loading the weights finds them cut short
    result = run_script(
        "finetune.py", "--model_name_or_path", str(checkpoint), "--train_file", str(train),
        "--output_dir", str(out), "--no_export", timeout=120,
        env=None if needs_tensorflow else env_without_tensorflow(tmp_path / "no_tf"),
    )
    assert_one_line_error(result, str(checkpoint), fragment)
    assert_nothing_written(out)


def test_max_seq_length_beyond_the_position_embeddings_is_refused_before_tensorflow(tiny_checkpoint, tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], GOOD_ROWS)
    out = tmp_path / "out"
    limit = json.loads((tiny_checkpoint / "config.json").read_text())["max_position_embeddings"]
    result = run_script(
        "finetune.py", "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(train),
        "--output_dir", str(out), "--max_seq_length", str(limit + 1), timeout=120,
        env=env_without_tensorflow(tmp_path / "no_tf"),
    )
    assert_one_line_error(result, f"max_position_embeddings={limit}", f"max_seq_length={limit + 1}")
    assert_nothing_written(out)


def test_roberta_position_offset_lowers_the_usable_length(tmp_path):
    from tfsft.checkpoint import check_max_seq_length
    from tfsft.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 514}))
    check_max_seq_length(tmp_path, 512)
    with pytest.raises(ConfigError, match="at most 512"):
        check_max_seq_length(tmp_path, 513)


def fake_finished_run(directory: Path) -> dict[str, str]:
    directory.mkdir()
    files = {"metrics.json": '{"eval_accuracy": 0.5}', "config.json": "{}", "note.txt": "old run"}
    for name, text in files.items():
        (directory / name).write_text(text)
    return files


def test_one_megabyte_text_is_truncated_with_a_warning_and_overwrite_replaces_at_the_end(tiny_checkpoint, tmp_path):
    huge = " ".join(["wonderful"] * 110_000)  # ~1.1 MB in one field
    assert len(huge) > 1_000_000
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [[huge, "pos"], *GOOD_ROWS])
    out = tmp_path / "out"
    fake_finished_run(out)
    refused = run_script("finetune.py", "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(train), "--output_dir", str(out), timeout=120)
    assert_one_line_error(refused, str(out), "already holds a finished run", "--overwrite_output_dir")
    assert (out / "note.txt").read_text() == "old run"

    result = run_script(
        "finetune.py", "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(train), "--output_dir", str(out),
        "--max_seq_length", "32", "--no_export", "--overwrite_output_dir", timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.csv: 1 of 29 examples were longer than max_seq_length=32 tokens and were truncated" in result.stderr
    assert "eval_accuracy" in json.loads((out / "metrics.json").read_text())
    assert not (out / "note.txt").exists()
    assert not list(tmp_path.glob(".out.*"))


DISK_FULL_DRIVER = """
import errno, os, runpy, sys
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
from tfsft import artifacts

stage, script = sys.argv[1], sys.argv[2]


def disk_full(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


if stage == "model":
    from tfsft import modeling

    modeling.save_pretrained = lambda model, tokenizer, directory: disk_full(directory / "tf_model.h5")
else:
    write_json = artifacts.write_json
    artifacts.write_json = lambda path, data: disk_full(path) if str(path).endswith("metrics.json") else write_json(path, data)
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("stage", ["model", "metrics"])
def test_disk_full_while_saving_keeps_the_previous_run(tiny_checkpoint, tmp_path, stage):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], GOOD_ROWS)
    out = tmp_path / "out"
    old = fake_finished_run(out)
    args = [
        "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(train), "--output_dir", str(out),
        "--no_export", "--overwrite_output_dir",
    ]
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL_DRIVER, stage, str(ROOT / "scripts" / "finetune.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    line = assert_one_line_error(result, "No space left on device", "nothing was published", f"finished run already in {out} is unchanged")
    assert ".out.partial" in line
    assert {p.name: p.read_text() for p in out.iterdir()} == old
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("row", ["unseen_label", "missing_column", "missing_file"])
def test_evaluate_refuses_bad_data_before_tensorflow(finished_tiny_run, tmp_path, row):
    files = {
        "unseen_label": ("sentence\tlabel\na fine film\t1\na dull film\t7\n", "row 3"),
        "missing_column": ("text\tlabel\na fine film\t1\n", "sentence"),
        "missing_file": (None, "not found"),
    }
    content, fragment = files[row]
    data = tmp_path / "data.tsv"
    if content is not None:
        data.write_text(content)
    before = sorted(p.relative_to(finished_tiny_run) for p in finished_tiny_run.rglob("*"))
    result = run_script(
        "evaluate.py", str(finished_tiny_run), "--file", str(data), timeout=120,
        env=env_without_tensorflow(tmp_path / "no_tf"),
    )
    assert_one_line_error(result, str(data), fragment)
    assert sorted(p.relative_to(finished_tiny_run) for p in finished_tiny_run.rglob("*")) == before


def test_a_multiworker_run_refuses_bad_data_before_it_joins_the_cluster(tiny_checkpoint, tmp_path):
    """Every worker reads and checks its data before creating the strategy (which imports
    TensorFlow and waits for the other workers): a bad file fails at once instead of hanging."""
    train = tmp_path / "train.csv"
    train.write_bytes(DATA_ROWS["blank_label"][1])
    out = tmp_path / "out"
    cluster = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    env = dict(env_without_tensorflow(tmp_path / "no_tf"), TF_CONFIG=json.dumps(cluster))
    result = run_script(
        "finetune.py", "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(train),
        "--output_dir", str(out), "--strategy", "multiworker", "--no_export", timeout=120, env=env,
    )
    assert_one_line_error(result, str(train), "row 3: missing or blank label")
    assert_nothing_written(out)
