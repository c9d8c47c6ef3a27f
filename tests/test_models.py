import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import BASE, PY

from guard_train.lab.codec import PatchPCACodec


def test_codec_is_orthonormal_pca_and_roundtrips():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 16, 16, generator=g) * 2 - 1
    c = PatchPCACodec(latent_channels=48, sample_size=16).fit(x)  # full rank: exact reconstruction
    W = c.basis
    assert torch.allclose(W.T @ W, torch.eye(48), atol=1e-5)
    z = c.encode(x).latent_dist.sample()
    assert z.shape == (32, 48, 4, 4)
    assert torch.allclose(c.decode(z).sample, x, atol=1e-4)
    # z is exactly W^T (v - mu) of the 4x4 patch vectors
    v = torch.nn.functional.pixel_unshuffle(x, 4)[0, :, 1, 2]
    assert torch.allclose(z[0, :, 1, 2], W.T @ (v - c.mean), atol=1e-5)
    k8 = PatchPCACodec(latent_channels=8, sample_size=16).fit(x)
    err = (k8.decode(k8.encode(x).latent_dist.mode()).sample - x).pow(2).mean()
    assert 0 < err < x.var()  # lossy but better than nothing
    assert k8.config.scaling_factor == pytest.approx(1 / k8.encode(x).latent_dist.mode().std().item(), rel=1e-4)


def test_codec_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of the codec's patch size"):
        PatchPCACodec().encode(torch.zeros(1, 3, 10, 10))


@pytest.mark.skipif(not (BASE / "model_index.json").exists(), reason="committed base missing")
def test_committed_base_loads_offline_and_has_sd_layout():
    from guard_train.models.loading import load_pipeline

    pipe = load_pipeline(str(BASE))
    attn2 = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert len(attn2) == 11
    assert {n.split(".")[0] for n in attn2} == {"down_blocks", "mid_block", "up_blocks"}
    # CLIP's BPE with the vocabulary trimmed to the lab's tokens (tests/test_tiny_sd.py): the same tokens as CLIP's
    # full BPE, EOS = PAD as in SD 1.x
    tok = pipe.tokenizer
    assert tok.convert_ids_to_tokens(tok("a photo of an astronaut").input_ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "an</w>", "astronaut</w>", "<|endoftext|>"]
    assert tok.model_max_length == 77 and tok.pad_token_id == tok.eos_token_id == len(tok) - 1
    size = sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file())
    assert size <= 12 * 2**20
    assert all(not f.name.endswith((".bin", ".pt", ".pkl")) for f in BASE.rglob("*"))  # safetensors only
    info = json.loads((BASE / "build_info.json").read_text())
    assert info["total_steps"] > 0


@pytest.mark.skipif(not (BASE / "model_index.json").exists(), reason="committed base missing")
def test_plain_diffusers_from_pretrained_in_fresh_process():
    code = (
        "import guard_train.lab.codec\n"  # registers the codec's module for diffusers (docs/base-model.md)
        "from diffusers import StableDiffusionPipeline\n"
        f"p = StableDiffusionPipeline.from_pretrained({str(BASE)!r}, local_files_only=True)\n"
        "im = p('a red circle on a cat photo', num_inference_steps=2, output_type='np').images\n"
        "print(im.shape)\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(1, 64, 64, 3)" in r.stdout


@pytest.mark.skipif(not (BASE / "model_index.json").exists(), reason="committed base missing")
def test_codec_keeps_copies_detectable():
    """SSCD(reconstruction, original) on lab images: the ceiling any copy can reach through the codec."""
    from guard_train.lab.dataset import LabConfig, build_lab
    from guard_train.metrics.embed import get_embedder

    codec = PatchPCACodec.from_pretrained(str(BASE / "vae"))
    imgs = np.stack(build_lab(LabConfig(num_instances=32, held_out=0, dup_fraction=0)).images)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = codec.decode(codec.encode(x).latent_dist.mode()).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    e = get_embedder("sscd")
    sims = np.sum(e.embed(rec) * e.embed(imgs), 1)
    assert np.median(sims) >= 0.8


def test_lr_tail_matches_hand_computed_values():
    from guard_train.lab.pretrain import PretrainConfig, lr_at

    c = PretrainConfig(lr=1e-3, warmup=10, steps=30, decay_from=10, lr_min_ratio=0.1)
    assert lr_at(c, 0) == pytest.approx(1e-4)  # warm-up: (0 + 1) / 10
    assert lr_at(c, 10) == pytest.approx(1e-3)  # tail starts at the full lr
    assert lr_at(c, 20) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way: cos(pi/2) = 0
    assert lr_at(c, 30) == pytest.approx(1e-4)  # ends at lr * lr_min_ratio
    assert lr_at(PretrainConfig(lr=1e-3, warmup=10, steps=30), 25) == pytest.approx(1e-3)  # no tail by default


def test_min_snr_weights_match_hand_computed_values():
    from types import SimpleNamespace

    from guard_train.training.losses import snr_weights

    # a scheduler whose alphas_cumprod gives SNR = ab / (1 - ab) of 1, 4 and 100 at timesteps 0, 1, 2
    ab = torch.tensor([0.5, 0.8, 100 / 101])
    sched = SimpleNamespace(alphas_cumprod=ab, config=SimpleNamespace(prediction_type="epsilon"))
    t = torch.tensor([0, 1, 2])
    assert torch.allclose(snr_weights(sched, t, 5.0), torch.tensor([1.0, 1.0, 5 / 100]))  # min(SNR, 5) / SNR
    sched.config.prediction_type = "v_prediction"
    assert torch.allclose(snr_weights(sched, t, 5.0), torch.tensor([1 / 2, 4 / 5, 5 / 101]))  # min(SNR, 5) / (SNR+1)
    assert torch.equal(snr_weights(sched, t, 0.0), torch.ones(3))  # off


def test_v_equivalent_weights_match_hand_computed_values():
    from types import SimpleNamespace

    from guard_train.training.losses import v_weights

    # SNR = ᾱ / (1 − ᾱ) = 1, 4 and 1/99 → 1 + 1/SNR = 2, 1.25 and 100, the last one capped at 50
    sched = SimpleNamespace(alphas_cumprod=torch.tensor([0.5, 0.8, 0.01]),
                            config=SimpleNamespace(prediction_type="epsilon"))
    assert torch.allclose(v_weights(sched, torch.tensor([0, 1, 2]), 50.0), torch.tensor([2.0, 1.25, 50.0]))
    sched.config.prediction_type = "v_prediction"
    with pytest.raises(ValueError, match="already has this weight"):
        v_weights(sched, torch.tensor([0]), 50.0)


def test_build_base_exports_a_loadable_pipeline_and_resumes_its_state(tmp_path):
    from guard_train.lab.pretrain import PretrainConfig, build_base
    from guard_train.models.loading import load_pipeline

    cfg = dict(out=str(tmp_path / "m"), work=str(tmp_path / "w"), batch_size=2, codec_fit_images=64, save_every=2,
               sample_every=0)
    build_base(PretrainConfig(steps=2, **cfg))
    first = json.loads((tmp_path / "m" / "build_info.json").read_text())
    build_base(PretrainConfig(steps=4, decay_from=2, **cfg))  # continues the saved trainer state
    info = json.loads((tmp_path / "m" / "build_info.json").read_text())
    assert first["total_steps"] == 2 and info["total_steps"] == 4
    assert [s["steps"] for s in info["segments"]] == ["0-2", "2-4"]
    assert info["wall_s_total"] >= first["wall_s_total"]
    pipe = load_pipeline(str(tmp_path / "m"))
    assert pipe.unet.config.cross_attention_dim == 64 and not list((tmp_path / "w").glob("samples_*.png"))


def test_diffusion_target_and_loss_weights_by_hand():
    from diffusers import DDPMScheduler

    from guard_train.training.losses import diffusion_target, loss_weights

    eps = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise, t = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0), torch.tensor([0, 999])
    assert torch.equal(diffusion_target(eps, x0, noise, t), noise)
    v = DDPMScheduler.from_config(eps.config, prediction_type="v_prediction")
    ab = v.alphas_cumprod[t].view(2, 1, 1, 1)
    assert torch.allclose(diffusion_target(v, x0, noise, t), ab.sqrt() * -1.0 - (1 - ab).sqrt() * 2.0)
    with pytest.raises(ValueError, match="not trained here"):
        diffusion_target(DDPMScheduler.from_config(eps.config, prediction_type="sample"), x0, noise, t)
    snr = ab.view(2) / (1 - ab.view(2))
    assert torch.equal(loss_weights(eps, t), torch.ones(2))
    assert torch.allclose(loss_weights(eps, t, snr_gamma=5.0), torch.clamp(snr, max=5.0) / snr)
    assert torch.allclose(loss_weights(eps, t, v_weight_cap=100.0), torch.clamp(1 + 1 / snr, max=100.0))
    assert loss_weights(eps, t, v_weight_cap=100.0)[1] == 100.0  # 1 + 1/SNR(999) = 215 is capped
    with pytest.raises(ValueError, match="not both"):
        loss_weights(eps, t, snr_gamma=5.0, v_weight_cap=100.0)


def test_build_base_refuses_settings_that_cannot_work_together(tmp_path):
    from guard_train.cli import main
    from guard_train.lab.pretrain import PretrainConfig, check_config

    for bad, msg in [(dict(v_weight_cap=200.0), "--snr-gamma 0"),
                     (dict(v_weight_cap=200.0, snr_gamma=0, prediction_type="v_prediction"), "already carries"),
                     (dict(v_weight_cap=0.5, snr_gamma=0), ">= 1"),
                     (dict(zero_terminal_snr=True), "--prediction-type v_prediction"),
                     (dict(prediction_type="sample"), "'epsilon' or 'v_prediction'")]:
        with pytest.raises(ValueError, match=msg):
            check_config(PretrainConfig(**bad))
    out = tmp_path / "m"
    assert main(["build-base", "--out", str(out), "--work", str(tmp_path / "w"), "--v-weight-cap", "200"]) == 2
    assert not out.exists() and not (tmp_path / "w").exists()  # refused before anything is written
    assert main(["build-base", "--out", str(out), "--work", str(tmp_path / "w"), "--init-from", str(tmp_path)]) == 2
    assert not out.exists() and not (tmp_path / "w").exists()  # no model_index.json there: exit 2, nothing written
    check_config(PretrainConfig(v_weight_cap=200.0, snr_gamma=0))  # the valid combinations pass
    check_config(PretrainConfig(prediction_type="v_prediction", zero_terminal_snr=True))


def test_build_base_converts_to_v_prediction_with_zero_terminal_snr(tmp_path):
    from guard_train.lab.pretrain import PretrainConfig, build_base
    from guard_train.lab.tiny_sd import noise_scheduler

    cfg = dict(work=str(tmp_path / "w"), batch_size=2, codec_fit_images=64, save_every=2, sample_every=0)
    build_base(PretrainConfig(out=str(tmp_path / "eps"), steps=2, **cfg))
    build_base(PretrainConfig(out=str(tmp_path / "v"), steps=2, init_from=str(tmp_path / "eps"),
                              prediction_type="v_prediction", zero_terminal_snr=True, **cfg))
    sched = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"]
    assert sched["timestep_spacing"] == "trailing"
    assert noise_scheduler(tmp_path / "v").alphas_cumprod[-1].item() < 1e-6  # t = 999 is pure noise in training
    seg = json.loads((tmp_path / "v" / "build_info.json").read_text())["segments"]
    assert [s["prediction_type"] for s in seg] == ["epsilon", "v_prediction"] and seg[-1]["zero_terminal_snr"]
    # a v-weight on a model that is already v is found only after loading it: still exit 2, nothing written
    from guard_train.cli import main

    args = ["--out", str(tmp_path / "x"), "--work", str(tmp_path / "w2"), "--init-from", str(tmp_path / "v")]
    assert main(["build-base", *args, "--v-weight-cap", "200", "--snr-gamma", "0"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "w2").exists()
