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


MMAPPED_BYTES_AFTER_A_100MB_BLOCK = (
    "import ctypes, os\n"
    "from tfsft.runtime import keep_freed_memory\n"
    "applied = keep_freed_memory() if os.environ.get('KEEP') else False\n"
    "class Info(ctypes.Structure):\n"
    "    _fields_ = [(name, ctypes.c_size_t) for name in\n"
    "                'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]\n"
    "libc = ctypes.CDLL('libc.so.6')\n"
    "libc.mallinfo2.restype = Info\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "block = libc.malloc(100 << 20)\n"
    "print(applied, libc.mallinfo2().hblkhd)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_serves_large_blocks_from_the_heap_unless_the_user_set_malloc():
    import os

    def mmapped(**env) -> tuple[str, bool]:
        """(whether the settings applied, whether the 100 MB block is among the mmapped bytes)"""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
        result = subprocess.run([sys.executable, "-c", MMAPPED_BYTES_AFTER_A_100MB_BLOCK], capture_output=True,
                                text=True, timeout=60, cwd=ROOT, env=environment)
        assert result.returncode == 0, result.stderr
        applied, size = result.stdout.split()
        return applied, int(size) >= 100 << 20

    assert mmapped() == ("False", True)  # glibc's default: a block this size is its own mmap
    assert mmapped(KEEP="1") == ("True", False)
    assert mmapped(KEEP="1", MALLOC_MMAP_MAX_="65536") == ("False", True)  # the user's setting wins
