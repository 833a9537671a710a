"""The stage monitor behind the export report's per-stage peak RSS: the sampler sees a stage's
own peak under an earlier, higher one; the kernel's high-water mark catches what no sample saw."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import time

import numpy as np
import pytest

from tfsft import memory

MB = 2**20

pytestmark = pytest.mark.skipif(memory.current_rss() is None, reason="needs /proc (Linux)")


def touched(megabytes: int) -> np.ndarray:
    """An array whose every page is resident, in a mapping of its own: unmapped when the array is
    freed, whatever the process's malloc keeps (tfsft's training processes keep freed heap memory)."""
    array = np.frombuffer(mmap.mmap(-1, megabytes * MB), dtype=np.float64)
    array[:] = 1.0
    return array


def test_a_stage_below_the_process_peak_gets_its_own_sampled_peak():
    """Once the process has been higher, only the sampler can see a stage's peak."""
    high = touched(300)
    del high
    memory.release_memory()
    with memory.StageMonitor() as monitor, monitor.activate():
        with memory.stage("allocates"):
            block = touched(150)
            time.sleep(0.2)
            del block
        with memory.stage("idle"):
            time.sleep(0.05)
    report = monitor.report()
    allocates, idle = report["allocates"], report["idle"]
    assert allocates["peak_rss_mb"] >= allocates["rss_before_mb"] + 140
    assert idle["peak_rss_mb"] < allocates["peak_rss_mb"] - 100
    assert allocates["seconds"] >= 0.2 and allocates["started_s"] < idle["started_s"]
    assert monitor.peak_rss / MB == pytest.approx(allocates["peak_rss_mb"], abs=0.1)


def test_a_new_process_peak_between_samples_is_taken_from_the_kernel():
    """A sampler that never wakes during the stage (a long interval stands in for a C call that
    holds the GIL) sees nothing; VmHWM, which rose inside the stage, has the exact peak."""
    script = (
        "import json, numpy as np\n"
        "from tfsft import memory\n"
        "with memory.StageMonitor(interval_s=60) as monitor, monitor.activate():\n"
        "    with memory.stage('spike'):\n"
        "        block = np.ones(200 * 2**20 // 8)\n"
        "        del block\n"
        "print(json.dumps(monitor.report()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    spike = json.loads(out.stdout)["spike"]
    assert spike["peak_rss_mb"] >= spike["rss_before_mb"] + 190
    assert spike["rss_after_mb"] < spike["peak_rss_mb"] - 150


def test_stages_nest_and_measure_nothing_without_a_monitor():
    with memory.stage("unmeasured") as record:
        assert record is None
    assert memory.active_monitor() is None
    with memory.StageMonitor() as monitor, monitor.activate():
        assert memory.active_monitor() is monitor
        with memory.stage("outer"):
            with memory.stage("outer/inner"):
                block = touched(50)
                time.sleep(0.05)
                del block
    assert memory.active_monitor() is None
    report = monitor.report()
    assert list(report) == ["outer", "outer/inner"]
    assert report["outer"]["peak_rss_mb"] >= report["outer/inner"]["peak_rss_mb"] >= report["outer/inner"]["rss_before_mb"] + 45
