"""The engine's sampler: DDIM (η 0) by default whatever the directory ships, `model` keeps the directory's own;
latents in and out; η and its refusal on schedulers without one."""

import json
import shutil

import numpy as np
import pytest
import torch

from guard_train.guidance.base import ParamError
from guard_train.guidance.engine import GuidanceEngine
from guard_train.models.loading import load_pipeline


@pytest.fixture(scope="module")
def pndm_dir(tiny_sd_dir, tmp_path_factory):
    """The tiny SD with a PNDM scheduler config, as SD 1.4/1.5 directories ship (skip_prk_steps, steps_offset 1)."""
    from diffusers import PNDMScheduler

    d = tmp_path_factory.mktemp("pndm") / "model"
    shutil.copytree(tiny_sd_dir, d)
    sched = PNDMScheduler.from_config(load_pipeline(str(tiny_sd_dir)).scheduler.config, skip_prk_steps=True,
                                      steps_offset=1)
    sched.save_pretrained(d / "scheduler")
    index = json.loads((d / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (d / "model_index.json").write_text(json.dumps(index))
    return d


def test_a_pndm_directory_runs_ddim_by_default(pndm_dir, tiny_sd_dir):
    pipe = load_pipeline(str(pndm_dir))
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    eng = GuidanceEngine(pipe)
    assert type(eng.scheduler).__name__ == "DDIMScheduler" and eng.eta == 0.0
    assert pipe.scheduler is not eng.scheduler  # the pipe's own is left as it is
    assert eng.scheduler.config.steps_offset == 1  # the directory's schedule settings are kept
    assert type(GuidanceEngine(pipe, scheduler="model").scheduler).__name__ == "PNDMScheduler"
    # the default is exactly DDIM built from the directory's config, and it is not the directory's PNDM
    from diffusers import DDIMScheduler

    prompt, kw = ["a red circle on a cat photo"], dict(method="cfg", num_images=2, steps=4, seed=1)
    a = eng.generate(prompt, **kw).images
    ref_pipe = load_pipeline(str(pndm_dir))
    ref_pipe.scheduler = DDIMScheduler.from_config(ref_pipe.scheduler.config)
    assert np.array_equal(a, GuidanceEngine(ref_pipe, scheduler="model").generate(prompt, **kw).images)
    assert not np.array_equal(a, GuidanceEngine(pipe, scheduler="model").generate(prompt, **kw).images)


def test_latents_in_and_out(tiny_sd_dir):
    eng = GuidanceEngine(load_pipeline(str(tiny_sd_dir)))
    res = eng.generate(["a blue square on a coffee photo", "a red circle"], method="cfg", num_images=2, steps=3,
                       seed=5)
    assert res.initial_latents.shape == res.latents.shape == (4, eng.unet.config.in_channels, 16, 16)
    again = eng.generate(["a blue square on a coffee photo", "a red circle"], method="cfg", num_images=2, steps=3,
                         seed=99, latents=res.initial_latents)
    assert np.array_equal(again.images, res.images) and torch.equal(again.latents, res.latents)
    assert np.array_equal(eng.decode(res.latents.to(eng.device)), res.images)
    with pytest.raises(ValueError, match="latents must have shape"):
        eng.generate(["a red circle"], num_images=2, steps=2, latents=res.initial_latents)


def test_eta(tiny_sd_dir):
    pipe = load_pipeline(str(tiny_sd_dir))
    kw = dict(method="cfg", num_images=2, steps=3, seed=2)
    det = GuidanceEngine(pipe).generate(["a red circle"], **kw).images
    s1 = GuidanceEngine(pipe, eta=1.0).generate(["a red circle"], **kw).images
    s2 = GuidanceEngine(pipe, eta=1.0).generate(["a red circle"], **kw).images
    assert np.array_equal(s1, s2) and not np.array_equal(s1, det)  # stochastic, but seeded
    with pytest.raises(ParamError, match="DDIM only"):
        GuidanceEngine(pipe, scheduler="euler", eta=0.5)
    with pytest.raises(ParamError, match=r"\[0, 1\]"):
        GuidanceEngine(pipe, eta=1.5)
    with pytest.raises(ParamError, match="not one of"):
        GuidanceEngine(pipe, scheduler="plms")


@pytest.mark.parametrize("name", ["dpm++", "euler", "euler_a", "unipc", "pndm"])
def test_every_scheduler_runs_a_method(tiny_sd_dir, name):
    eng = GuidanceEngine(load_pipeline(str(tiny_sd_dir)), scheduler=name)
    res = eng.generate(["a red circle on a cat photo"], method="guard", num_images=1, steps=3, seed=0)
    assert res.images.shape == (1, 64, 64, 3) and np.isfinite(res.latents.numpy()).all()


def test_sampler_flags_are_checked_before_any_work(tmp_path):
    from guard_train.cli import main
    from guard_train.guidance.schedulers import check_sampler

    check_sampler("ddim", 0.5)
    check_sampler("model", 0.0)
    with pytest.raises(ParamError, match="DDIM only"):
        check_sampler("euler", 0.5)
    out = tmp_path / "gen"
    assert main(["generate", "--prompts", "a red circle", "--scheduler", "euler", "--eta", "0.5",
                 "--out", str(out)]) == 2
    assert not out.exists()
