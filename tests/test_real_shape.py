"""benchmarks/real_shape.py: the paired ratio (median over rounds of arm ÷ base in the same round) and the per-step
peak-memory probe of a CPU process."""

import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import real_shape as rs  # noqa: E402


def test_paired_ratio_is_the_median_of_per_round_ratios():
    times = {"cfg": [1.0, 2.0, 3.0], "guard": [1.2, 2.2, 3.6]}
    # per round 1.2, 1.1, 1.2 -> 1.2; the ratio of medians would say 2.2 / 2.0 = 1.1
    assert rs.paired_ratio(times, "cfg") == {"cfg": 1.0, "guard": 1.2}


def test_paired_ratio_cancels_a_drift_that_moves_both_halves():
    base = [1.0, 1.5, 3.0, 1.1, 2.0]  # a machine slowing down and recovering
    assert rs.paired_ratio({"a": [1.5 * x for x in base], "b": base}, "b")["a"] == pytest.approx(1.5)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_rss_mark_can_be_reset_below_an_earlier_peak():
    big = bytearray(256 * 2**20)  # touch 256 MiB so the mark sits above it
    for i in range(0, len(big), 4096):
        big[i] = 1
    before = rs._proc_status_gib("VmHWM")
    del big
    Path("/proc/self/clear_refs").write_text("5")
    assert rs._proc_status_gib("VmHWM") < before - 0.2  # the reset mark no longer carries the freed 256 MiB
