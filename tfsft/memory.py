"""Peak resident memory (RSS) and seconds of the named stages of a job, for the export report.

`getrusage` only knows the peak of the whole process, so a stage's own peak is measured in two
ways at once:

- a sampling thread reads the current RSS (`/proc/self/statm`) every few milliseconds and keeps
  the highest value seen while each open stage runs;
- the kernel's exact high-water mark (`VmHWM` in `/proc/self/status`) is read at the start and
  end of every stage: when it rose, the process reached its highest RSS so far inside the
  stage, and that exact value is the stage's peak.

The second covers what the first can miss: a spike shorter than the interval, or one inside a
C call that holds the GIL (the sampler cannot run then). A stage below the process's earlier
peak is sampled only. The high-water mark is only read, never reset (`/proc/self/clear_refs`
would reset it, and with it the peak that `/usr/bin/time` or a parent's `wait4` reports).
Where /proc is missing (not Linux), the lifetime peak of `getrusage` stands in for VmHWM and
nothing is sampled.

`stage(name)` measures under the monitor that `StageMonitor.activate` made current, and does
nothing without one, so library code can name its stages without being handed a monitor.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import gc
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from tfsft.runtime import glibc_function

SAMPLE_INTERVAL_S = 0.005
MB = 2**20

_CURRENT: contextvars.ContextVar[Optional["StageMonitor"]] = contextvars.ContextVar("tfsft_stage_monitor", default=None)


def current_rss() -> Optional[int]:
    """Resident bytes of this process now (None where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def high_water_mark() -> int:
    """Highest resident bytes of this process so far: VmHWM, else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_memory() -> None:
    """Collect garbage (the tf2onnx and ONNX graphs hold reference cycles) and hand freed heap
    pages back to the OS (glibc keeps large freed blocks otherwise), so that the next stage starts
    from what is really alive."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Any:
    trim = glibc_function("malloc_trim")
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


@dataclass
class StageRecord:
    name: str
    started: float = 0.0
    """Seconds from the monitor's start (stages are reported sorted by name in JSON; this orders them)."""
    seconds: float = 0.0
    rss_before: int = 0
    peak_rss: int = 0
    rss_after: int = 0

    def to_dict(self) -> dict[str, float]:
        return {
            "started_s": round(self.started, 3),
            "seconds": round(self.seconds, 3),
            "rss_before_mb": round(self.rss_before / MB, 1),
            "peak_rss_mb": round(self.peak_rss / MB, 1),
            "rss_after_mb": round(self.rss_after / MB, 1),
        }


class StageMonitor:
    """Measures named stages (`with monitor.stage("convert"): ...`); stages may nest.

    Use as a context manager: the sampling thread runs between `__enter__` and `__exit__`.
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.records: list[StageRecord] = []
        self._open: list[StageRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._sampling = current_rss() is not None
        self._created = time.perf_counter()

    def __enter__(self) -> "StageMonitor":
        if self._sampling:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="tfsft-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._observe(current_rss())

    def _observe(self, rss: Optional[int]) -> None:
        if rss is None:
            return
        with self._lock:
            for record in self._open:
                record.peak_rss = max(record.peak_rss, rss)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        """Measure the block as stage `name` (recorded in the order stages start)."""
        start = time.perf_counter()
        record = StageRecord(name, started=start - self._created)
        record.rss_before = record.peak_rss = current_rss() or 0
        hwm_before = high_water_mark()
        with self._lock:
            self.records.append(record)
            self._open.append(record)
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - start
            self._observe(current_rss())
            hwm_after = high_water_mark()
            with self._lock:
                self._open.remove(record)
                if hwm_after > hwm_before:  # the process's highest RSS so far was reached in this stage
                    record.peak_rss = max(record.peak_rss, hwm_after)
            record.rss_after = current_rss() or 0

    @contextlib.contextmanager
    def activate(self) -> Iterator["StageMonitor"]:
        """Make this the monitor that the module-level `stage` measures under, for the block."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    def report(self) -> dict[str, dict[str, float]]:
        """{stage: {seconds, peak_rss_mb, rss_after_mb}} in the order the stages started."""
        return {record.name: record.to_dict() for record in self.records}

    @property
    def peak_rss(self) -> int:
        return max((record.peak_rss for record in self.records), default=0)


def active_monitor() -> Optional[StageMonitor]:
    """The monitor `StageMonitor.activate` made current, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def stage(name: str) -> Iterator[Optional[StageRecord]]:
    """`StageMonitor.stage(name)` of the active monitor; a plain block without one."""
    monitor = _CURRENT.get()
    if monitor is None:
        yield None
        return
    with monitor.stage(name) as record:
        yield record
