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
RUN_LABELS = ("0", "1")


def run_script(name: str, *args: str, timeout: int = 600, cwd: Path | None = None, env: dict | None = None):
    """Run scripts/<name> in a fresh interpreter; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env,
    )


def env_without_tensorflow(directory: Path) -> dict:
    """An environment whose `import tensorflow` fails loudly: a stand-in package first on the path."""
    package = directory / "tensorflow"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('raise RuntimeError("TensorFlow was imported")\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))}


TRAINING_ONLY_PACKAGES = (
    "tensorflow", "tf_keras", "keras", "tensorboard", "transformers", "tf2onnx", "onnx", "sklearn", "scipy",
    "seqeval", "matplotlib", "yaml", "safetensors", "huggingface_hub", "sympy", "datasets",
)
"""What the `[train]` extra installs (import names): the base install must work without any of them."""

BLOCKING_SITECUSTOMIZE = """
import importlib.abc, sys

BLOCKED = frozenset({blocked!r})


class _TrainingPackagesAbsent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: base install)", name=name)
        return None


sys.meta_path.insert(0, _TrainingPackagesAbsent())
"""


def env_without_training_packages(directory: Path) -> dict:
    """An environment where every [train]-only package is absent, as on a base install (a
    sitecustomize first on the path makes their imports fail as if they were not installed)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(BLOCKING_SITECUSTOMIZE.format(blocked=sorted(TRAINING_ONLY_PACKAGES)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))}


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


@pytest.fixture(scope="session", autouse=True)
def temp_files_under_basetemp(tmp_path_factory):
    """The suite's temporary files, and those of every process it starts, go under pytest's
    basetemp (which pytest prunes), not the machine's temp directory: TensorFlow's AutoGraph writes
    a module per converted function there and deletes it only at a clean exit, which the processes
    the suite kills never reach."""
    import tempfile

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        patch.setattr(tempfile, "tempdir", None)
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded, randomly initialised 2-layer, hidden-32 BERT saved as tf_model.h5 with the MiniLM
    tokenizer (seeded: the same weights in every session and test process)."""
    from tfsft.modeling import embedded_checkpoint, tf

    from transformers import BertConfig, TFBertModel

    tf.keras.utils.set_random_seed(0)

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


def write_conll_slice(source, target, sentences: int):
    """The first `sentences` sentences of a CoNLL file (the -DOCSTART- lines kept, as in the file)."""
    out, seen = [], 0
    for line in source.read_text(encoding="utf-8").splitlines():
        out.append(line)
        if not line.strip() and out[-2:-1] and out[-2].strip() and not out[-2].startswith("-DOCSTART-"):
            seen += 1
            if seen == sentences:
                break
    target.write_text("\n".join(out) + "\n", encoding="utf-8")
    return target


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_run(directory: Path, checkpoint: Path, dev: Path, quantize: bool = True, **flags):
    """A run directory with config.json and model/ (a tiny classifier), as `finetune` leaves it
    before exporting; returns (model, run_dir, validation examples, label ids). `flags`: more
    run settings (pooling, metric_for_best_model, ...).

    Export, inference and serving tests build their bundles from it, without paying for training.
    """
    from tfsft import artifacts
    from tfsft.config import RunConfig
    from tfsft.data import LabelMap, read_examples
    from tfsft.modeling import build_classifier, load_tokenizer, save_pretrained, tf

    tf.keras.utils.set_random_seed(0)  # the head's draw must not depend on which tests ran before
    run_dir = directory / "run"
    run_dir.mkdir(parents=True)
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(checkpoint), train_file=str(dev), validation_file=str(dev),
        max_seq_length=64, output_dir=str(run_dir), quantize_int8=quantize, **flags,
    ))
    artifacts.save_config(config, run_dir)
    label_map = LabelMap(RUN_LABELS)
    model, _ = build_classifier(checkpoint, label_map, pooling=config.model.pooling)
    # A random head gives near-tied logits; widen the margins so label comparisons are meaningful.
    model.classifier.kernel.assign(model.classifier.kernel * 30.0)
    save_pretrained(model, load_tokenizer(checkpoint), run_dir / artifacts.MODEL_DIR)
    examples = read_examples(str(dev), config.data)
    return model, run_dir, examples, label_map.encode(examples)


def tiny_bundle(directory: Path, checkpoint: Path, dev: Path) -> Path:
    """The ONNX bundle of `make_run`'s tiny classifier, checked on 24 dev rows."""
    from tfsft import artifacts
    from tfsft.export import export_bundle

    model, run_dir, examples, labels = make_run(directory, checkpoint, dev)
    export_bundle(model, run_dir, validation_data=(examples.subset(range(24)), labels[:24]))
    return run_dir / artifacts.ONNX_DIR


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory, tiny_checkpoint, sst2_slices) -> Path:
    """A finished `finetune` run of the tiny BERT on the SST-2 slices, exported (`export=True`)."""
    from tfsft import RunConfig, finetune

    output_dir = tmp_path_factory.mktemp("finished") / "run"
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["train"]),
        validation_file=str(sst2_slices["dev"]), num_train_epochs=2, learning_rate=2e-3, warmup_ratio=0.0,
        per_device_train_batch_size=16, max_seq_length=64, output_dir=str(output_dir), export=True,
    ))
    return finetune(config, verbose=0).run_dir


MULTITASK_SETTINGS = dict(
    num_train_epochs=2, learning_rate=2e-3, warmup_ratio=0.0, per_device_train_batch_size=16, max_seq_length=64,
)


def multitask_tasks(directory: Path) -> dict:
    """Three tasks of the shared data sets, small: SST-2 sentences, STS-B pairs scored 0-5, CoNLL entities."""
    glue = SHARED_DATA / "glue"
    slices = {
        "sst2": (write_tsv_slice(shared_path("glue", "SST-2", "train.tsv"), directory / "sst2_train.tsv", 160),
                 write_tsv_slice(glue / "SST-2" / "dev.tsv", directory / "sst2_dev.tsv", 48)),
        "stsb": (write_tsv_slice(shared_path("glue", "STS-B", "train.tsv"), directory / "stsb_train.tsv", 96),
                 write_tsv_slice(glue / "STS-B" / "dev.tsv", directory / "stsb_dev.tsv", 40)),
        "conll": (write_conll_slice(shared_path("conll2003", "train.txt"), directory / "conll_train.txt", 80),
                  write_conll_slice(SHARED_DATA / "conll2003" / "dev.txt", directory / "conll_dev.txt", 32)),
    }
    return {
        "sentiment": {"task": "classification", "train_file": str(slices["sst2"][0]), "validation_file": str(slices["sst2"][1])},
        "similarity": {
            "task": "regression", "train_file": str(slices["stsb"][0]), "validation_file": str(slices["stsb"][1]),
            "text_column": "sentence1", "text_pair_column": "sentence2", "label_column": "score", "loss_weight": 2.0,
        },
        "entities": {"task": "ner", "train_file": str(slices["conll"][0]), "validation_file": str(slices["conll"][1])},
    }


@pytest.fixture(scope="session")
def multitask_run(tmp_path_factory, tiny_checkpoint) -> Path:
    """A finished multi-task run of the tiny BERT (sentiment, similarity, entities), not exported."""
    from tfsft import RunConfig, finetune

    directory = tmp_path_factory.mktemp("multitask")
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), tasks=multitask_tasks(directory), output_dir=str(directory / "run"),
        export=False, **MULTITASK_SETTINGS,
    ))
    return finetune(config, verbose=0).run_dir
