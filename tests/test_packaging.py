"""The install declares what the code imports: every module imports in this environment, and
every third-party package tfsft or its scripts import is a declared requirement (not merely
present on the machine that runs the tests). The base install (no `[train]` extra) predicts and
serves a bundle without TensorFlow or any other training package."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata
import json
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import tfsft
from conftest import ROOT

IMPORT_TO_DISTRIBUTION = {"sklearn": "scikit-learn", "yaml": "pyyaml", "huggingface_hub": "huggingface-hub"}
"""Import names whose distribution is named otherwise (for packages this environment lacks)."""


def declared_requirements() -> dict[str, set[str]]:
    """{distribution name (normalised): {"install_requires" or the extra's name}} from setup.cfg."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    sections = {"install_requires": parser["options"]["install_requires"]}
    sections.update(parser["options.extras_require"])
    declared: dict[str, set[str]] = {}
    for where, text in sections.items():
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            if line:
                name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]
                declared.setdefault(normalise(name), set()).add(where)
    return declared


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports() -> dict[str, list[str]]:
    """{top-level import name: [files importing it]} over tfsft/ and scripts/."""
    found: dict[str, list[str]] = {}
    for path in sorted([*(ROOT / "tfsft").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "tfsft":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_tfsft_module_imports():
    names = [m.name for m in pkgutil.walk_packages(tfsft.__path__, "tfsft.")]
    assert {"tfsft.cli", "tfsft.pipeline", "tfsft.export", "tfsft.inference", "tfsft.serving"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_every_third_party_import_is_a_declared_requirement():
    declared = declared_requirements()
    installed = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in third_party_imports().items():
        distributions = {normalise(d) for d in installed.get(module, [])} or {
            normalise(IMPORT_TO_DISTRIBUTION.get(module, module))}
        if not distributions & set(declared):
            undeclared[module] = files
    assert not undeclared, f"imported but not declared in setup.cfg: {undeclared}"


def test_requirements_a_dependency_needs_without_declaring_it_are_declared():
    """onnxruntime's transformer optimizer (the fused export) needs sympy, which onnxruntime
    1.32 does not require: without it the export of a finished training crashed on a fresh machine."""
    assert "train" in declared_requirements().get("sympy", set())
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # noqa: F401 - imports sympy


@pytest.mark.parametrize(
    "distribution", sorted(d for d, where in declared_requirements().items() if where & {"install_requires", "train"})
)
def test_declared_runtime_requirements_are_installed(distribution):
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        if distribution == "uvloop" and sys.platform == "win32":
            pytest.skip("uvloop is not installed on Windows")
        raise


# --------------------------------------------------------------------------- the base install


def test_base_requirements_hold_no_training_package():
    from conftest import TRAINING_ONLY_PACKAGES

    declared = declared_requirements()
    base = {name for name, where in declared.items() if "install_requires" in where}
    training = {normalise(IMPORT_TO_DISTRIBUTION.get(m, m)) for m in TRAINING_ONLY_PACKAGES} | {"tf-keras", "pyyaml"}
    assert not base & training, base & training
    assert {"onnxruntime", "tokenizers", "numpy", "starlette", "uvicorn"} <= base
    assert {"tensorflow", "tf-keras", "transformers", "tf2onnx", "onnx"} <= {n for n, w in declared.items() if "train" in w}
    assert "tfsft[train]" in _extra_lines("test")


def _extra_lines(extra: str) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    return [line.strip() for line in parser["options.extras_require"][extra].splitlines() if line.strip()]


def test_training_command_without_the_training_extras_names_the_install_line(tmp_path):
    from conftest import env_without_training_packages
    from test_cli import tfsft_command

    result = tfsft_command("finetune", "--max_train_samples", "8", env=env_without_training_packages(tmp_path / "site"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "`tfsft finetune` needs the training extras" in result.stderr
    assert 'pip install "tfsft[train]"' in result.stderr and "tensorflow" in result.stderr


def test_predict_and_serve_run_without_any_training_package(finished_tiny_run, tmp_path):
    """`tfsft predict` and `tfsft serve` with every [train]-only package made unimportable."""
    import httpx

    from conftest import env_without_training_packages
    from test_cli import tfsft_command
    from test_serving import start_server, stop_server
    from tfsft.inference import Predictor

    bundle = finished_tiny_run / "onnx"
    env = env_without_training_packages(tmp_path / "site")
    texts = ["a gorgeous, witty film", "tedious and far too long"]
    expected = [p.to_dict() for p in Predictor(bundle).predict(texts)]

    predicted = tfsft_command(
        "predict", str(bundle), "--input", "-", env=env, stdin="".join(json.dumps({"text": t}) + "\n" for t in texts)
    )
    assert predicted.returncode == 0, predicted.stderr
    assert [json.loads(line) for line in predicted.stdout.splitlines()] == expected

    base, process = start_server(
        [str(bundle), "--precision", "auto"], command=[sys.executable, "-m", "tfsft", "serve"], env=env
    )
    try:
        response = httpx.post(f"{base}/predict", json={"texts": texts}, timeout=30)
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
        assert [p["label"] for p in served] == [p["label"] for p in expected]
    finally:
        stderr = stop_server(process)
    assert "Traceback" not in stderr, stderr[-2000:]


@pytest.mark.slow
def test_base_install_in_a_fresh_virtualenv_serves_a_bundle(finished_tiny_run, tmp_path):
    """`pip install .` (no extras) into a new virtualenv: no TensorFlow there, and `tfsft serve` answers."""
    import httpx

    from test_serving import start_server, stop_server
    from tfsft.inference import Predictor

    texts = ["a gorgeous, witty film", "tedious and far too long"]
    expected = [p.to_dict() for p in Predictor(finished_tiny_run / "onnx").predict(texts)]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, tfsft_script = venv / "bin" / "python", venv / "bin" / "tfsft"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=600, env=env,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    absent = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print([m for m in ('tensorflow', 'transformers', 'tf2onnx', "
         "'onnx', 'sklearn', 'scipy', 'sympy') if u.find_spec(m)])"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr

    refused = subprocess.run([str(tfsft_script), "finetune"], capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 2 and 'pip install "tfsft[train]"' in refused.stderr, refused.stderr

    base, process = start_server(
        [str(finished_tiny_run / "onnx"), "--precision", "fp32"], command=[str(tfsft_script), "serve"], env=env,
        cwd=tmp_path,
    )
    try:
        response = httpx.post(f"{base}/predict", json={"texts": texts}, timeout=30)
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
        assert [p["label"] for p in served] == [p["label"] for p in expected]
        for got, want in zip(served, expected):
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
    finally:
        stop_server(process)
