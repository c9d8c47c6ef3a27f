"""The lab's copy calibration holds for SSCD: near-copies score high, new instances of a caption low."""

import numpy as np
import pytest

from guard_train.data.lab import LabConfig, build_lab
from guard_train.metrics.calibration import calibration_table
from guard_train.metrics.embed import TiledPixel, get_embedder


def test_sscd_separates_copies_from_new_instances():
    lab = build_lab(LabConfig(num_instances=64, held_out=0))
    t = calibration_table(lab, get_embedder("sscd"))
    assert t["backend"].startswith("sscd")
    assert t["near_copy"]["p50"] > 0.6
    assert t["same_caption_new_instance"]["p50"] < 0.25
    assert t["near_vs_new_auroc"] > 0.95  # the table the lab is designed for (docs/lab.md)
    assert t["train_train_top2"]["share_above_0.5"] < 0.1
    assert 0.2 < t["lab_threshold"] < 0.8


def test_pixel_fallback_hand_computed():
    a = np.zeros((1, 8, 8, 3), np.uint8)
    b = a.copy()
    b[0, :2, :2] = 255  # one 2x2 tile fully different -> tile RMS 1.0 -> similarity 0
    c = a.copy()
    c[0, :2, :2, 0] = 255  # one channel of that tile -> RMS sqrt(1/3)
    s = TiledPixel().similarity(a, np.concatenate([a, b, c]))
    assert s[0, 0] == pytest.approx(1.0)
    assert s[0, 1] == pytest.approx(0.0)
    assert s[0, 2] == pytest.approx(1 - np.sqrt(1 / 3), abs=1e-6)
