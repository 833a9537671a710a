"""TensorFlow is imported without its start-up noise on a CPU machine, and nothing else is hidden."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from tfsft.runtime import has_nvidia_driver


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_filtered_native_stderr_drops_known_lines_and_passes_the_rest_in_order():
    result = run_python(
        "import os, sys\n"
        "from tfsft.runtime import STARTUP_NOISE, filtered_native_stderr\n"
        "with filtered_native_stderr(STARTUP_NOISE):\n"
        "    os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on. You may see...\\n')\n"
        "    os.write(2, b'E0000 something real went wrong\\n')\n"
        "    print('a python warning', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["E0000 something real went wrong", "a python warning", "after"]


def test_filtered_native_stderr_passes_lines_on_when_the_block_raises():
    result = run_python(
        "import os\n"
        "from tfsft.runtime import STARTUP_NOISE, filtered_native_stderr\n"
        "try:\n"
        "    with filtered_native_stderr(STARTUP_NOISE):\n"
        "        os.write(2, b'kept\\n')\n"
        "        raise ImportError('x')\n"
        "except ImportError:\n"
        "    pass\n"
    )
    assert result.stderr.splitlines() == ["kept"]


@pytest.mark.skipif(has_nvidia_driver(), reason="the CUDA lines are only dropped where no NVIDIA driver is installed")
def test_importing_tensorflow_on_a_cpu_machine_prints_nothing():
    result = run_python(
        "from tfsft.runtime import import_tensorflow\n"
        "tf = import_tensorflow()\n"
        "assert tf.keras.__name__.startswith('tf_keras'), tf.keras.__name__\n"
        "print(float(tf.reduce_sum(tf.constant([1.0, 2.0]))))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3.0"
    assert result.stderr == "", result.stderr
