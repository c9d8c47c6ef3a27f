import math

import numpy as np
import pytest
import torch

from guard_train.metrics.detection import pad_entropy, scores_from_stats, summarize


def test_summary_on_synthetic_scores():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.05])
    r = summarize(s, labels)
    # pairs (pos > neg): 0.9,0.8,0.7 beat all 4 negs (12); 0.2 beats 0.1, 0.05 (2) -> 14/16
    assert r["auroc"] == pytest.approx(14 / 16)
    assert r["best_accuracy"] == pytest.approx(7 / 8)  # threshold between 0.6 and 0.7 -> 3 TP + 4 TN
    assert r["tpr@10%fpr"] == pytest.approx(0.75)  # closest FPR to 10 %: 0 (TPR .75) vs .25 -> 0
    perfect = summarize(np.array([2.0, 1.0]), np.array([1, 0]))
    assert perfect["auroc"] == 1.0 and perfect["tpr@1%fpr"] == 1.0


def test_pad_entropy_hand_computed():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    # L = 3: positions k >= 2 -> only p2 = .25 contributes: -.25 log .25
    assert pad_entropy(p, torch.tensor([3])).item() == pytest.approx(-0.25 * math.log(0.25))


def test_scores_from_stats_hand_built():
    steps, layers, R, T = 12, 4, 4, 6
    mass = torch.full((steps, layers, R, T), 1 / T)
    mass[:, :, :2] = torch.tensor([0.5, 0.5, 0, 0, 0, 0])  # prompt 0 (2 images): low entropy
    mag = torch.arange(R * steps, dtype=torch.float).view(R, steps)
    diff = torch.ones(steps, R, 2, 2, 2)
    end_mask = torch.ones(R, 1, 2, 2) * 0.5
    st = {"magnitude": mag, "mass": mass, "lengths": torch.tensor([3, 3, 3, 3]), "diff": diff, "end_mask": end_mask}
    s = scores_from_stats(st, images_per_prompt=2)
    assert s["wen_first"].tolist() == [(0 + 12) / 2, (24 + 36) / 2]
    assert s["wen_all"][0] == pytest.approx(mag[:2].mean().item())
    assert s["ren_E"].tolist() == pytest.approx([math.log(2), math.log(6)])
    # D for uniform rows: H = ln 6; pad term 0 (same every step)
    assert s["ren_D"][1] == pytest.approx(math.log(6))
    # LD: ‖0.5·1 over 8 entries‖ / mean(0.5) = sqrt(8·0.25)/0.5 = 2·sqrt(2)
    assert s["be_LD"].tolist() == pytest.approx([2 * math.sqrt(2)] * 2)


def test_detect_end_to_end_on_tiny_model(tiny_sd_dir):
    from guard_train.eval.evaluate import detection_scores
    from guard_train.guidance.engine import GuidanceEngine
    from guard_train.metrics.detection import SCORES

    eng = GuidanceEngine.from_pretrained(str(tiny_sd_dir))
    scores, per_prompt_s = detection_scores(eng, ["a red circle on a cat photo", "a blue square"], 2, steps=12)
    assert set(scores) == set(SCORES) and all(v.shape == (2,) and np.isfinite(v).all() for v in scores.values())
    assert per_prompt_s > 0
    # the same numbers as scoring one direct recording generation of both prompts (seed + prompt index)
    both = eng.generate(["a red circle on a cat photo", "a blue square"], num_images=2, steps=12,
                        record=("attention", "diff", "end_maps"))
    direct = scores_from_stats(both.stats, 2)
    assert all(np.allclose(scores[k], direct[k], rtol=1e-4, atol=1e-6) for k in SCORES)
    plain = eng.generate(["a red circle on a cat photo"], num_images=2, steps=12)
    rec = eng.generate(["a red circle on a cat photo"], num_images=2, steps=12,
                       record=("attention", "diff", "end_maps"))
    assert np.abs(plain.images.astype(int) - rec.images.astype(int)).max() <= 1  # recording changes nothing
    assert rec.stats["mass"].shape[:2] == (12, len(eng.layers))
