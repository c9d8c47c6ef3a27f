import numpy as np
import pytest
import torch

from guard_train.metrics.copy import (dataset_similarity, diversity, localized_similarity, masked_images,
                                      per_prompt_similarity, top_k, train_background)


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
