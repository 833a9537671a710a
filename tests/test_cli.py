"""No traceback reaches a CLI user: library errors and flag errors are one line, unexpected
exceptions become `error: <stage> failed: <Type>: <message>` with the traceback in a log file."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import run_script
from tfsft.cli import ArgumentParser, positive_int, run_cli
from tfsft.errors import ConfigError, ExportFailed, stage


def run_main(main, argv, monkeypatch, capsys, tmp_path):
    """run_cli(main) with sys.argv = argv; returns (exit code, stderr lines)."""
    monkeypatch.setenv("TFSFT_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def log_path(line: str) -> Path:
    match = re.search(r"full traceback in (\S+)$", line)
    assert match, line
    return Path(match.group(1))


def test_unexpected_error_is_one_line_naming_the_stage_with_the_traceback_in_a_log(monkeypatch, capsys, tmp_path):
    def main():
        with stage("training"), stage("export"):
            raise RuntimeError("optimizer exploded\nsecond line")

    code, lines = run_main(main, ["finetune.py"], monkeypatch, capsys, tmp_path)
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: export failed: RuntimeError: optimizer exploded second line; full traceback in ")
    log = log_path(lines[0])
    assert log.parent == tmp_path / "logs" and log.name.startswith("finetune-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: optimizer exploded" in text


def test_unexpected_error_outside_any_stage_is_named_after_the_script(monkeypatch, capsys, tmp_path):
    code, lines = run_main(lambda: {}["missing"], ["predict.py", "x"], monkeypatch, capsys, tmp_path)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("error: predict failed: KeyError: 'missing'; full traceback in ")


def test_debug_prints_the_traceback_instead(monkeypatch, capsys, tmp_path):
    def main():
        raise ValueError("bad thing")

    code, lines = run_main(main, ["evaluate.py", "--debug"], monkeypatch, capsys, tmp_path)
    assert code == 1
    assert "Traceback (most recent call last):" in lines
    assert lines[-1] == "error: evaluate failed: ValueError: bad thing"
    assert not (tmp_path / "logs").exists()


def test_a_tfsft_error_is_one_line_without_a_log(monkeypatch, capsys, tmp_path):
    def main():
        raise ConfigError("Invalid value for --x:\nexpected y. Received: x=1")

    code, lines = run_main(main, ["finetune.py"], monkeypatch, capsys, tmp_path)
    assert (code, lines) == (2, ["error: Invalid value for --x: expected y. Received: x=1"])
    assert not (tmp_path / "logs").exists()


def test_a_tfsft_error_caused_by_an_unexpected_one_logs_the_cause(monkeypatch, capsys, tmp_path):
    def main():
        try:
            raise OSError("disk on fire")
        except OSError as error:
            raise ExportFailed("the run was saved but its ONNX export failed") from error

    code, lines = run_main(main, ["finetune.py"], monkeypatch, capsys, tmp_path)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("error: the run was saved but its ONNX export failed; full traceback in ")
    assert "OSError: disk on fire" in log_path(lines[0]).read_text()


def test_flag_errors_are_one_line(capsys):
    parser = ArgumentParser(prog="predict.py")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--batch_size", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: argument --batch_size: expected a positive integer. Received: '0' (see predict.py --help)"
    ]


BAD_VALUES = {
    "finetune_learning_rate": ("finetune.py", ["--learning_rate", "fast"], "learning_rate"),
    "finetune_max_seq_length": ("finetune.py", ["--max_seq_length", "0"], "max_seq_length"),
    "finetune_unknown_flag": ("finetune.py", ["--nonsense", "1"], "--nonsense"),
    "evaluate_batch_size": ("evaluate.py", ["RUN", "--file", "x.tsv", "--batch_size", "0"], "--batch_size"),
    "evaluate_missing_run": ("evaluate.py", ["no/such/run", "--file", "x.tsv"], "no/such/run"),
    "export_missing_run": ("export.py", ["no/such/run"], "no/such/run"),
    "predict_batch_size": ("predict.py", ["BUNDLE", "--input", "x.jsonl", "--batch_size", "0"], "--batch_size"),
    "predict_num_threads": ("predict.py", ["BUNDLE", "--input", "x.jsonl", "--num_threads", "-1"], "--num_threads"),
    "predict_missing_bundle": ("predict.py", ["no/such/bundle", "--input", "x.jsonl"], "no/such/bundle"),
    "serve_port": ("serve.py", ["BUNDLE", "--port", "70000"], "--port"),
    "serve_max_texts": ("serve.py", ["BUNDLE", "--max_texts", "0"], "--max_texts"),
    "serve_max_wait_ms": ("serve.py", ["BUNDLE", "--max_wait_ms", "-5"], "--max_wait_ms"),
    "benchmark_max_train_samples": ("benchmark.py", ["--max_train_samples", "0"], "--max_train_samples"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_every_script_turns_a_bad_value_into_one_line(case, tmp_path):
    script, args, fragment = BAD_VALUES[case]
    result = run_script(script, *args, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]


def test_predictor_refuses_a_bad_batch_size_with_a_config_error(tmp_path):
    from tfsft.inference import Predictor

    with pytest.raises(ConfigError, match="batch_size"):
        Predictor(tmp_path, batch_size=0)


# ------------------------------------------------------------------------------- the tfsft command


def tfsft_command(*args: str, env: dict | None = None, timeout: int = 120, stdin: str | None = None):
    """`python -m tfsft ARGS` (what the `tfsft` console script runs) in a fresh interpreter."""
    import subprocess

    from conftest import ROOT

    return subprocess.run(
        [sys.executable, "-m", "tfsft", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
        input=stdin,
    )


def test_tfsft_help_lists_every_command_in_pipeline_order():
    from tfsft.commands import COMMANDS

    result = tfsft_command("--help")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^  (\w+) ", result.stdout, re.M)
    assert listed == list(COMMANDS) == ["finetune", "evaluate", "export", "predict", "serve"]


def test_tfsft_without_a_command_or_with_an_unknown_one_exits_2():
    bare = tfsft_command()
    assert bare.returncode == 2 and "usage: tfsft COMMAND" in bare.stderr
    unknown = tfsft_command("train")
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines() == [
        "error: unknown command 'train'; expected one of finetune, evaluate, export, predict, serve (see tfsft --help)"
    ]


@pytest.mark.parametrize("name", ["finetune", "evaluate", "export", "predict", "serve"])
def test_each_script_is_an_alias_of_its_command(name):
    script = run_script(f"{name}.py", "--help", timeout=60)
    command = tfsft_command(name, "--help", timeout=60)
    assert script.returncode == command.returncode == 0, (script.stderr, command.stderr)
    assert command.stdout.startswith(f"usage: tfsft {name} ")
    # The same parser: identical help once the program name is swapped (and usage lines re-wrapped).
    assert " ".join(script.stdout.replace(f"{name}.py", f"tfsft {name}").split()) == " ".join(command.stdout.split())


def test_a_command_error_is_one_line_and_exit_2(tmp_path):
    result = tfsft_command("export", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: Run directory not found: {tmp_path / 'missing'}"]
