import numpy as np
import pytest
import torch

from guard_train.metrics.copy import (
    dataset_similarity,
    diversity,
    localized_similarity,
    masked_images,
    per_prompt_similarity,
    top_k,
    train_background,
)


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_dataset_similarity_hand_computed():
    train = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    gen = _unit([[1, 0, 0], [1, 1, 0], [0, 0.2, 1], [-1, 0, 0]])
    # top-1: 1, cos45 = .7071, 1/sqrt(1.04) = .9806, 0
    r = dataset_similarity(gen, train, 0.75)
    s = np.array([1.0, 0.70710677, 0.98058068, 0.0])
    assert r["mean"] == pytest.approx(s.mean(), abs=1e-6)
    assert r["p95"] == pytest.approx(np.percentile(s, 95), abs=1e-6)
    assert r["copy_rate"] == 0.5
    _, idx = top_k(gen, train, 1)
    assert idx[:, 0].tolist()[:3] == [0, 0, 2]


def test_train_background_excludes_self():
    train = _unit([[1, 0], [0.8, 0.6], [0, 1]])
    r = train_background(train, 0.9)
    # nearest others: 0->1: .8 ; 1->0: .8 (vs .6) ; 2->1: .6
    assert r["mean"] == pytest.approx((0.8 + 0.8 + 0.6) / 3, abs=1e-6)
    assert r["share_above_threshold"] == 0.0


def test_per_prompt_max_over_gt_mean_over_gens():
    g = [_unit([[1, 0], [0, 1]])]
    gt = [_unit([[1, 0], [0.6, 0.8]])]
    # gen 0: max(1, .6) = 1; gen 1: max(0, .8) = .8 -> mean .9
    assert per_prompt_similarity(g, gt)[0] == pytest.approx(0.9)


def test_diversity():
    assert diversity([_unit([[1, 0], [1, 0]]), _unit([[1, 0], [0, 1]])]).tolist() == pytest.approx([0.0, 1.0])
    assert np.isnan(diversity([_unit([[1, 0]])])[0])


def test_masked_images_and_ls():
    img = np.full((1, 4, 4, 3), 200, np.uint8)
    m = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]]]])  # right half bright
    out = masked_images(img, m)
    assert out[0, :, -1].min() == 200 and out[0, :, 0].max() < 100

    class Flat:
        name = "flat"

        def embed(self, x):
            v = x.reshape(len(x), -1).astype(np.float32) + 1e-3
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    rng = np.random.default_rng(0)
    gen = (rng.random((1, 8, 8, 3)) * 255).astype(np.uint8)
    gt = gen.copy()
    gt[:, :, :2] = 0  # differs only where the upsampled mask is exactly 0 (bilinear blends columns 2-5)
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 1] = 1.0
    ls = localized_similarity(Flat(), gen, mask, [gt])
    glob = float((Flat().embed(gen) @ Flat().embed(gt).T)[0, 0])
    assert ls[0] == pytest.approx(1.0, abs=1e-6) and glob < 0.95  # LS sees the memorized region only


def test_wilson_interval_hand_computed():
    from guard_train.metrics.copy import wilson

    # k = 7, n = 32, z = 1.959964: centre (k + z²/2) / (n + z²), half-width z √(k(n−k)/n + z²/4) / (n + z²)
    z, k, n = 1.959963984540054, 7, 32
    c = (k + z * z / 2) / (n + z * z)
    h = z * np.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    assert wilson(k, n) == pytest.approx((c - h, c + h), abs=1e-9)
    lo, hi = wilson(0, 32)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z * z / (32 + z * z), abs=1e-9)
    assert np.isnan(wilson(0, 0)[0])


def test_copy_rates_counts_every_row_and_own_rows():
    from guard_train.metrics.copy import copy_rates

    top1 = np.array([0.9, 0.6, 0.4, 0.51])
    own = np.array([0.9, 0.3, 0.4, np.nan])  # gen 1's top-1 is another instance's row; gen 3 has no own image
    r = copy_rates(top1, own, 0.5)
    assert (r["copies"], r["n_images"], r["copy_rate"]) == (3, 4, 0.75)
    assert (r["own_copies"], r["own_copy_rate"]) == (1, 1 / 3)
    assert r["top1_p95"] == pytest.approx(np.percentile(top1, 95))
    assert r["copy_rate_ci95"][0] < 0.75 < r["copy_rate_ci95"][1]


def test_own_similarity_takes_the_best_of_the_prompts_own_rows():
    from guard_train.eval.evaluate import Reference
    from guard_train.metrics.copy import own_similarity

    ref = Reference(np.zeros((4, 2, 2, 3), np.uint8), keys=[10, 10, 11, 12])  # instance 10: original + a near copy
    sims = np.array([[0.2, 0.7, 0.9, 0.1],   # owner 10: best own row 0.7 (row 2, 0.9, is instance 11's)
                     [0.3, 0.1, 0.2, 0.6],   # owner 12
                     [0.9, 0.9, 0.9, 0.9]])  # no owner
    got = own_similarity(sims, np.array([10, 12, -1]), ref.keys)
    assert got[:2].tolist() == [0.7, 0.6] and np.isnan(got[2])
    with pytest.raises(ValueError, match="owner 99"):
        own_similarity(sims[:1], np.array([99]), ref.keys)
