"""ε / v / sample parameterisations: formulas by hand, against diffusers' scheduler, and where methods use them."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from guard_train.lab.tiny_sd import SD_SCHEDULER
from guard_train.models.prediction import epsilon_difference, first_epsilon_step, prediction_type, to_epsilon, to_x0


def _sched(kind: str) -> DDIMScheduler:
    return DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": kind})


def test_conversions_match_hand_computed_values():
    # ᾱ = 0.64 → a = 0.8, s = 0.6; x₀ = 1, ε = 2 → x_t = 0.8 + 1.2 = 2.0, v = a·ε − s·x₀ = 1.6 − 0.6 = 1.0
    sched = SimpleNamespace(alphas_cumprod=torch.tensor([0.64]), config=SimpleNamespace(prediction_type="v_prediction"))
    x_t, t = torch.tensor([2.0]), 0
    assert to_epsilon(sched, torch.tensor([1.0]), x_t, t).item() == pytest.approx(2.0)
    assert to_x0(sched, torch.tensor([1.0]), x_t, t).item() == pytest.approx(1.0)
    assert epsilon_difference(sched, torch.tensor([1.5]), torch.tensor([1.0]), t).item() == pytest.approx(0.4)  # a·Δv
    sched.config.prediction_type = "sample"
    assert to_epsilon(sched, torch.tensor([1.0]), x_t, t).item() == pytest.approx(2.0)  # (2 − 0.8) / 0.6
    assert epsilon_difference(sched, torch.tensor([1.5]), torch.tensor([1.0]), t).item() == pytest.approx(
        -0.5 * 0.8 / 0.6)
    sched.config.prediction_type = "epsilon"
    assert to_x0(sched, torch.tensor([2.0]), x_t, t).item() == pytest.approx(1.0)  # (2 − 0.6·2) / 0.8
    out = torch.tensor([0.3])
    assert to_epsilon(sched, out, x_t, t) is out and torch.equal(epsilon_difference(sched, out, out * 0, t), out)
    sched.config.prediction_type = "flow"
    with pytest.raises(ValueError, match="prediction_type 'flow' is not supported"):
        prediction_type(sched)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_x0_matches_diffusers_ddim_step(kind):
    sched = _sched(kind)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps[[0, 5, 9]]:
        ref = sched.step(out, t, x).pred_original_sample
        assert torch.allclose(to_x0(sched, out, x, t), ref, atol=1e-5)
        eps = to_epsilon(sched, out, x, t)  # and ε, x̂₀ are consistent with x_t = a·x̂₀ + s·ε
        ab = sched.alphas_cumprod[t]
        assert torch.allclose(ab.sqrt() * ref + (1 - ab).sqrt() * eps, x, atol=1e-4)


def test_per_sample_timesteps_broadcast():
    sched = _sched("v_prediction")
    t = torch.tensor([10, 900])
    d = epsilon_difference(sched, torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2), t)
    assert torch.allclose(d[:, 0, 0, 0], sched.alphas_cumprod[t].sqrt())


class _Oracle(torch.nn.Module):
    """A perfect denoiser for known clean latents: returns the exact ε or v target for x_t."""

    def __init__(self, z: torch.Tensor, sched):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))  # the probe reads the UNet's dtype from its parameters
        self.z, self.sched = z, sched

    def forward(self, zt, t, emb):
        ab = self.sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (zt - ab.sqrt() * self.z) / (1 - ab).sqrt()
        out = eps if self.sched.config.prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * self.z
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_one_step_probe_of_a_perfect_denoiser_returns_the_image(tiny_sd_dir, kind):
    """On a v-prediction model the probe used to treat v as ε; a perfect v-denoiser must give back the image."""
    from guard_train.data.images import to_model, to_uint8
    from guard_train.lab.dataset import pretrain_stream
    from guard_train.metrics.memorization import one_step_probe
    from guard_train.models.loading import load_pipeline

    pipe = load_pipeline(str(tiny_sd_dir))
    from itertools import islice

    imgs = np.stack([np.asarray(im) for im, _ in islice(pretrain_stream(3), 4)])
    sf = pipe.vae.config.scaling_factor
    with torch.no_grad():
        z = pipe.vae.encode(to_model(list(imgs))).latent_dist.mode() * sf
        recon = to_uint8(pipe.vae.decode(z / sf).sample)
    sched = _sched(kind)
    fake = SimpleNamespace(vae=pipe.vae, unet=_Oracle(z, sched), scheduler=sched, tokenizer=pipe.tokenizer,
                           text_encoder=pipe.text_encoder, device=pipe.device)
    got = one_step_probe(fake, imgs, ["a caption"] * 4, t=500)
    assert np.abs(got.astype(int) - recon.astype(int)).max() <= 1


def test_wen_magnitude_and_optimisation_loss_are_in_epsilon_units(tiny_sd_dir):
    """Same UNet, same x_T, only the scheduler's prediction_type differs: the v-model's ε-difference is a_t·Δv."""
    from guard_train.guidance.engine import GuidanceEngine

    eng = GuidanceEngine.from_pretrained(str(tiny_sd_dir))
    prompts = ["a red circle on a cat photo", "a blue square on a coffee photo"]
    base = eng.generate(prompts, method="cfg", num_images=1, steps=2).records
    wen = eng.generate(prompts, method="wen_opt", num_images=1, steps=2, max_iters=1, target_loss=0.0).records
    eng.scheduler = _sched("v_prediction")
    eng.scheduler.set_timesteps(2)
    a = float(eng.scheduler.alphas_cumprod[eng.scheduler.timesteps[0]].sqrt())
    v = eng.generate(prompts, method="cfg", num_images=1, steps=2).records
    wen_v = eng.generate(prompts, method="wen_opt", num_images=1, steps=2, max_iters=1, target_loss=0.0).records
    for r0, r1 in zip(base, v):
        assert r1["magnitude_first_step"] == pytest.approx(a * r0["magnitude_first_step"], rel=1e-4)
    for r0, r1 in zip(wen, wen_v):
        assert r1["opt_loss"] == pytest.approx(a * r0["opt_loss"], rel=1e-4)
    assert a < 0.6  # (2 steps: first t = 501) far from 1, so a missing conversion (ratio 1) fails the checks above


def _zero_snr_v() -> DDIMScheduler:
    return DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                            "timestep_spacing": "trailing"})


def test_first_epsilon_step_skips_only_the_zero_snr_step():
    z = _zero_snr_v()
    z.set_timesteps(3)
    assert z.timesteps.tolist() == [999, 666, 332] and float(z.alphas_cumprod[999]) == 0.0
    assert first_epsilon_step(z, z.timesteps) == 1  # ε = x_T at ᾱ = 0: ε_c − ε_u ≡ 0 there
    for kind in ("epsilon", "v_prediction"):  # SD's own schedules: ᾱ_T > 0, the papers' step 0
        s = _sched(kind)
        s.set_timesteps(3)
        assert first_epsilon_step(s, s.timesteps) == 0
    with pytest.raises(ValueError, match="no sampling step has"):
        first_epsilon_step(z, z.timesteps[:1])


def test_zero_terminal_snr_magnitude_and_wen_opt_read_the_first_informative_step(tiny_sd_dir):
    """On a zero-SNR v-model the first step's ε-difference is 0 for every prompt (a first-step score would tie all
    prompts, Wen's optimisation would stop at once): both must read step 1 instead, and agree with each other."""
    from guard_train.guidance.engine import GuidanceEngine

    eng = GuidanceEngine.from_pretrained(str(tiny_sd_dir))
    prompts = ["a red circle on a cat photo", "a blue square on a coffee photo"]
    for sched, k in ((_sched("v_prediction"), 0), (_zero_snr_v(), 1)):
        eng.scheduler = sched
        cfg = eng.generate(prompts, method="cfg", num_images=1, steps=3)
        assert cfg.stats["magnitude"].shape == (2, 3 - k)  # the undefined step is not recorded
        wen = eng.generate(prompts, method="wen_opt", num_images=1, steps=3, max_iters=1, target_loss=0.0).records
        for c, w in zip(cfg.records, wen):
            assert c["magnitude_first_step"] > 0.01
            assert w["opt_step"] == k and w["opt_iterations"] == 1
            # the optimiser's first loss (1 image: ‖ε_c − ε_u‖ at x_k) is the engine's first recorded magnitude
            assert w["opt_loss"] == pytest.approx(c["magnitude_first_step"], rel=1e-4)
