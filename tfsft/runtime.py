"""Import TensorFlow once, the way tfsft needs it: legacy Keras, and no start-up noise on CPU.

TensorFlow's native libraries print their start-up lines (oneDNN notices, missing CUDA drivers,
`failed call to cuInit`) straight to file descriptor 2 before its logging is configured, so
`TF_CPP_MIN_LOG_LEVEL` cannot hide them. They are caught at the descriptor while TensorFlow loads
and its devices are listed; the known lines are dropped (the CUDA ones only on a machine with no
NVIDIA driver, where they are expected) and everything else is passed on unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

STARTUP_NOISE = (
    re.compile(r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(r"oneDNN custom operations are on"),
    re.compile(r"This TensorFlow binary is optimized to use available CPU instructions"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
)
"""Informational lines every CPU start prints."""

NO_GPU_NOISE = (
    re.compile(r"Could not find cuda drivers on your machine"),
    re.compile(r"failed call to cuInit"),
    re.compile(r"Unable to register cu(DNN|FFT|BLAS) factory"),
)
"""Lines that only say there is no GPU; dropped only where no NVIDIA driver is installed."""

NVIDIA_DRIVER = Path("/proc/driver/nvidia")


def has_nvidia_driver() -> bool:
    return NVIDIA_DRIVER.exists()


@contextlib.contextmanager
def filtered_native_stderr(noise: Sequence[re.Pattern]) -> Iterator[None]:
    """Send fd 2 to a temporary file for the block, then re-emit its lines that match no pattern."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line for line in capture.read().decode("utf-8", errors="replace").splitlines(keepends=True)
                if not any(pattern.search(line) for pattern in noise)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


MALLOC_SETTINGS = {-4: 0, -1: 1 << 30, -2: 256 << 20}
"""glibc `mallopt` parameters: M_MMAP_MAX 0 (no block of its own mmap), M_TRIM_THRESHOLD 1 GiB
(keep freed memory at the heap's top), M_TOP_PAD 256 MiB (grow the heap in large steps)."""
USER_MALLOC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def glibc_function(name: str) -> Any:
    """The C library's function `name` (ctypes), or None off Linux or where the library lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the kernel.

    A training step allocates and frees tensors of tens of megabytes (the word embeddings' dense
    gradient, attention scores). glibc serves each block that size from its own mmap and unmaps it
    when freed, so every step faults in and zeroes that memory again: system time that rivals the
    step's compute on a VM or in a sandbox. TensorFlow's CPU guide suggests preloading tcmalloc or
    jemalloc; these settings get the reuse without a preloaded library, for some more resident
    memory. Skipped off glibc and where the user set glibc's malloc variables (MALLOC_*_,
    GLIBC_TUNABLES). Returns whether the settings were applied.
    """
    if any(name in os.environ for name in USER_MALLOC_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = glibc_function("mallopt")
    if mallopt is None:
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in MALLOC_SETTINGS.items())


def import_tensorflow():
    """The `tensorflow` module with tf-keras as `tf.keras`, imported quietly on machines without a
    GPU, in a process whose malloc reuses freed memory (`keep_freed_memory`)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    keep_freed_memory()
    noise = STARTUP_NOISE + (() if has_nvidia_driver() else NO_GPU_NOISE)
    with filtered_native_stderr(noise):
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf
