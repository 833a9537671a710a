"""Shared fixtures: a tiny BERT checkpoint (2 layers, hidden 32, the MiniLM vocab) and small
slices of the real data sets in ../shared/data."""

from __future__ import annotations

import csv
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def run_script(name: str, *args: str, timeout: int = 600, cwd: Path | None = None):
    """Run scripts/<name> in a fresh interpreter; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT,
    )


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data set not found: {path}")
    return path


def write_tsv_slice(source: Path, target: Path, rows: int, start: int = 0) -> Path:
    """Copy the header and `rows` data rows (from `start`) of an unquoted GLUE TSV."""
    with source.open(encoding="utf-8") as f:
        lines = f.read().splitlines()
    target.write_text("\n".join([lines[0], *lines[1 + start : 1 + start + rows]]) + "\n", encoding="utf-8")
    return target


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer, hidden-32 BERT saved as tf_model.h5 with the MiniLM tokenizer."""
    from transformers import BertConfig, TFBertModel

    from tfsft.modeling import embedded_checkpoint

    directory = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    model = TFBertModel(config)
    model(model.dummy_inputs)
    model.save_pretrained(str(directory))
    source = embedded_checkpoint()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def sst2_slices(tmp_path_factory) -> dict[str, Path]:
    """400 SST-2 training rows and 200 dev rows, as TSV files."""
    directory = tmp_path_factory.mktemp("sst2")
    return {
        "train": write_tsv_slice(shared_path("glue", "SST-2", "train.tsv"), directory / "train.tsv", 400),
        "dev": write_tsv_slice(shared_path("glue", "SST-2", "dev.tsv"), directory / "dev.tsv", 200),
    }


@pytest.fixture(scope="session")
def mrpc_slices(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("mrpc")
    return {
        "train": write_tsv_slice(shared_path("glue", "MRPC", "train.tsv"), directory / "train.tsv", 200),
        "test": write_tsv_slice(shared_path("glue", "MRPC", "test.tsv"), directory / "test.tsv", 100),
    }


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path
