"""The install declares what the code imports: every module imports in this environment, and
every third-party package tfsft or its scripts import is a declared requirement (not merely
present on the machine that runs the tests)."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata
import pkgutil
import re
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
    assert "install_requires" in declared_requirements().get("sympy", set())
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # noqa: F401 - imports sympy


@pytest.mark.parametrize("distribution", sorted(d for d, where in declared_requirements().items() if "install_requires" in where))
def test_declared_runtime_requirements_are_installed(distribution):
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        if distribution == "uvloop" and sys.platform == "win32":
            pytest.skip("uvloop is not installed on Windows")
        raise
