import numpy as np
import pytest
import torch

from guard_train.metrics.embed import Embedder
from guard_train.metrics.memorization import Probe, one_step_probe, score


class _Id(Embedder):
    name = "identity-test"

    def embed(self, images):
        e = images.reshape(len(images), -1).astype(np.float32)
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_one_step_probe_matches_hand_formula(tiny_sd_dir):
    from guard_train.models.loading import load_pipeline

    pipe = load_pipeline(str(tiny_sd_dir))
    img = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    caps = ["a red circle on a cat photo", "a blue square on a coffee photo"]
    got = one_step_probe(pipe, img, caps, t=200, seed=3)
    # by hand: x_t = sqrt(abar) z + sqrt(1-abar) n ; x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
    abar = pipe.scheduler.alphas_cumprod[200].item()
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1
    sf = pipe.vae.config.scaling_factor
    z = pipe.vae.encode(x).latent_dist.mode() * sf
    n = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    xt = abar**0.5 * z + (1 - abar) ** 0.5 * n
    ids = pipe.tokenizer(caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        eps = pipe.unet(xt, torch.tensor([200, 200]), pipe.text_encoder(ids)[0]).sample
        x0 = pipe.vae.decode(((xt - (1 - abar) ** 0.5 * eps) / abar**0.5) / sf).sample
    want = ((x0.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_score_groups_copy_rate_and_own_nn():
    rng = np.random.default_rng(0)
    train = (rng.random((4, 8, 8, 3)) * 255).astype(np.uint8)
    probes = [Probe("duplicated", "a", train[0], 10), Probe("unique", "b", train[1], 11)]
    rows = [
        {"i": 0, "x0": train[0], "gen": np.stack([train[0], train[2]])},  # a copy of its own image + a copy of key 12
        {"i": 1, "x0": 255 - train[1], "gen": np.stack([(rng.random((8, 8, 3)) * 255).astype(np.uint8)])},
    ]
    out = score(rows, probes, train, [10, 11, 12, 13], _Id(), threshold=0.99)
    d, u = out["groups"]["duplicated"], out["groups"]["unique"]
    assert d["probe_median"] == pytest.approx(1.0, abs=1e-6) and d["probe_above_threshold"] == 1.0
    assert d["copy_rate"] == 1.0 and d["nn_is_own"] == 0.5 and d["own_copy_rate"] == 0.5
    assert u["copy_rate"] == 0.0 and u["probe_above_threshold"] == 0.0
    assert out["backend"] == "identity-test"


def test_score_counts_near_copy_rows_of_the_reference():
    """The standard rule: a generation that reproduces a near-copy row (not the original) is a copy of its own
    instance; the reference set is every row."""
    rng = np.random.default_rng(1)
    train = (rng.random((3, 8, 8, 3)) * 255).astype(np.uint8)  # rows: key 10 original, key 10 near copy, key 11
    probes = [Probe("duplicated", "a", train[0], 10)]
    rows = [{"i": 0, "x0": train[0], "gen": np.stack([train[1], train[2]])}]
    out = score(rows, probes, train, [10, 10, 11], _Id(), threshold=0.99)
    d = out["groups"]["duplicated"]
    assert d["copies"] == 2 and d["own_copies"] == 1 and d["own_copy_rate"] == 0.5 and d["nn_is_own"] == 0.5
