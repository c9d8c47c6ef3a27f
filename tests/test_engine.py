import math

import numpy as np
import pytest
import torch
from conftest import ROOT

from guard_train.attention.processor import end_token_mask
from guard_train.guidance.base import ParamError
from guard_train.guidance.engine import GuidanceEngine
from guard_train.guidance.strategies import get_strategy
from guard_train.guidance.strategies.guard import Guard, orthogonalize
from guard_train.guidance.strategies.jain import JainDynamic, first_local_minimum

PROMPTS = ["a red circle on a cat photo", "a blue square and a green triangle on a coffee photo"]


@pytest.fixture(scope="module")
def engine(tiny_sd_dir):
    return GuidanceEngine.from_pretrained(str(tiny_sd_dir))


def test_cfg_reproduces_stable_diffusion_pipeline(engine):
    res = engine.generate(PROMPTS, method="cfg", num_images=2, seed=3, steps=5)
    ref = []
    for k, p in enumerate(PROMPTS):
        g = torch.Generator().manual_seed(3 + k)
        out = engine.pipe(p, num_images_per_prompt=2, num_inference_steps=5, guidance_scale=7.5, generator=g,
                          output_type="np").images
        ref.append((out * 255).round().astype(np.uint8))
    assert np.abs(res.images.astype(int) - np.concatenate(ref).astype(int)).max() <= 1


def test_guard_without_attenuation_or_repulsion_is_cfg(engine):
    cfg = engine.generate(PROMPTS, method="cfg", num_images=1, steps=4)
    g = engine.generate(PROMPTS, method="guard", num_images=1, steps=4, spike_scale=1.0, repulsion_scale=0.0,
                        orthogonalize=False)
    assert np.abs(cfg.images.astype(int) - g.images.astype(int)).max() <= 1
    ga = engine.generate(PROMPTS, method="guard_attn", num_images=1, steps=4, spike_scale=1.0)
    assert np.abs(cfg.images.astype(int) - ga.images.astype(int)).max() <= 1
    real = engine.generate(PROMPTS, method="guard", num_images=1, steps=4)
    assert np.abs(cfg.images.astype(int) - real.images.astype(int)).max() > 1
    assert real.records[0]["spikes_fired_mean"] > 0


def test_batching_does_not_change_outputs(engine):
    a = engine.generate(PROMPTS, method="guard", num_images=2, steps=3)
    engine.max_batch = 3
    try:
        b = engine.generate(PROMPTS, method="guard", num_images=2, steps=3)
    finally:
        engine.max_batch = 64
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


def test_guard_combine_hand_computed():
    u = torch.zeros(2, 1, 1, 2)
    vn = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 1, 2)
    vp = torch.tensor([[1.0, 0.1], [0.0, 1.0]]).view(2, 1, 1, 2)  # row 0: cos 0.995 > 0.9; row 1: cos 0
    o = orthogonalize(vp, vn, 0.9, 2.0)
    assert torch.allclose(o.view(2, 2), torch.tensor([[0.0, 0.1], [0.0, 1.0]]), atol=1e-6)
    big = orthogonalize(torch.tensor([[5.0, 0.1]]).view(1, 1, 1, 2), torch.tensor([[1.0, 0]]).view(1, 1, 1, 2),
                        0.9, 2.0)
    assert torch.allclose(big.view(2), torch.tensor([3.0, 0.1]))  # coefficient clipped to 2
    s = Guard()
    assert s.repulsion(0, 50) == pytest.approx(2.0) and s.repulsion(25, 50) == pytest.approx(2 * math.cos(math.pi / 4))
    ctx = type("C", (), {"steps": 50})()
    eps = {"uncond": u, "pos": vp, "neg": vn}
    want = 7.5 * orthogonalize(vp, vn, 0.9, 2.0) - 2.0 * vn
    assert torch.allclose(s.combine(eps, 0, 999, ctx), want)


def test_jain_transitions():
    d = torch.tensor([[5.0, 4.0, 3.0, 3.5, 2.0, 1.0], [5.0, 3.0, 4.0, 2.0, 3.0, 1.0], [1, 2, 3, 4, 5, 6.0]])
    assert first_local_minimum(d).tolist() == [2, 3, 5]  # row 1: first min at index 1 -> take the second
    s = JainDynamic()
    ctx = type("C", (), {"rows": 1, "state": {}})()
    s.prepare(ctx)
    ws = []
    for i, dj in enumerate([5.0, 4.0, 3.0, 3.5, 2.0]):
        c = torch.full((1, 1), dj)
        out = s.combine({"uncond": torch.zeros(1, 1), "cond": c}, i, 999 - i, ctx)
        ws.append(float(out) / dj)
    assert ws == pytest.approx([1.0, 1.0, 1.0, 7.5, 7.5])  # minimum at j=2 detected at j=3
    st = get_strategy("jain_static")
    u, c = torch.zeros(1, 1), torch.ones(1, 1)
    assert float(st.combine({"uncond": u, "cond": c}, 0, 700, None)) == 0.0
    assert float(st.combine({"uncond": u, "cond": c}, 0, 500, None)) == 7.5
    og = get_strategy("opposite_static")
    assert float(og.combine({"uncond": u, "cond": c}, 0, 800, None)) == -2.0


def test_ren_edits(engine):
    s = get_strategy("ren")
    cond, lengths = engine.encode(PROMPTS)
    ctx = type("C", (), {"cond": cond, "uncond": cond, "lengths": lengths, "rows": 2})()
    b = s.branches(0, 999, ctx)
    L = lengths.tolist()
    assert L[0] == len(engine.tokenizer(PROMPTS[0]).input_ids)
    for r in range(2):
        assert b["uncond"].edit.token_mask[r].tolist() == [k < L[r] for k in range(77)]
        assert b["cond"].edit.token_mask[r].tolist() == [k < L[r] for k in range(77)]
        assert b["cond"].edit.token_logit_scale[r, 0] == 1.25 and b["cond"].edit.token_logit_scale[r, 1:].eq(1).all()
    assert b["uncond"].edit.token_logit_scale is None


def test_wen_opt_reduces_loss_and_freezes_bos(engine):
    base = engine.generate(PROMPTS[:1], method="cfg", num_images=2, steps=3)
    r = engine.generate(PROMPTS[:1], method="wen_opt", num_images=2, steps=3, target_loss=0.01, max_iters=4)
    assert r.records[0]["opt_iterations"] == 4
    assert r.records[0]["opt_loss"] < base.records[0]["magnitude_first_step"] * math.sqrt(2)  # ‖·‖ over 2 images
    assert np.abs(r.images.astype(int) - base.images.astype(int)).max() > 0
    zero = engine.generate(PROMPTS[:1], method="wen_opt", num_images=2, steps=3, target_loss=1e9)
    assert zero.records[0]["opt_iterations"] == 0
    assert np.abs(zero.images.astype(int) - base.images.astype(int)).max() <= 1


def test_end_token_mask_hand_built():
    maps = {"a": torch.zeros(4, 4, 77), "b": torch.zeros(4, 4, 77)}
    maps["a"][2, :, 5] = 1.0  # row 2 (first cond row when R=2), token L-1 = 5
    maps["b"][2, :, 5] = 0.5
    m = end_token_mask(maps, slice(2, 4), torch.tensor([6, 3]), (2, 2))
    assert m.shape == (2, 1, 2, 2) and torch.allclose(m[0], torch.full((1, 2, 2), 0.75)) and m[1].abs().sum() == 0


def test_param_validation():
    with pytest.raises(ParamError, match="unknown parameter"):
        get_strategy("guard", spike_treshold=0.2)
    with pytest.raises(ParamError, match="unknown method"):
        get_strategy("nope")
    s = get_strategy("guard", spike_threshold="0.2", orthogonalize="false")  # CLI strings are cast
    assert s.p.spike_threshold == 0.2 and s.p.orthogonalize is False


def test_every_method_runs_and_records(engine):
    from guard_train.guidance.strategies import METHODS

    for m in METHODS:
        r = engine.generate(PROMPTS[:1], method=m, num_images=1, steps=2, seed=1)
        assert r.images.shape == (1, 64, 64, 3) and r.records[0]["method"] == m and r.records[0]["seed"] == 1


def _save_random_lora(unet, targets, out) -> None:
    """Add a LoRA with random (non-trivial) B matrices to `unet` and save it in diffusers format to `out`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet)))


def test_lora_engine(tiny_sd_dir, tmp_path):
    eng = GuidanceEngine.from_pretrained(str(tiny_sd_dir))
    base = eng.generate(PROMPTS[:1], steps=2)
    _save_random_lora(eng.unet, ["to_k", "to_v"], tmp_path)
    mem = eng.generate(PROMPTS[:1], steps=2)
    loaded = GuidanceEngine.from_pretrained(str(tiny_sd_dir), lora=str(tmp_path)).generate(PROMPTS[:1], steps=2)
    assert np.abs(loaded.images.astype(int) - mem.images.astype(int)).max() <= 1
    assert np.abs(loaded.images.astype(int) - base.images.astype(int)).max() > 1


def test_generate_cli(tiny_sd_dir, tmp_path):
    import json
    import subprocess

    from conftest import PY, ROOT

    r = subprocess.run([PY, "-m", "guard_train.cli", "generate", "--model", str(tiny_sd_dir), "--prompts",
                        PROMPTS[0], "--method", "guard", "--param", "repulsion_scale=1.5", "--num-images", "2",
                        "--steps", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(l) for l in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and recs[0]["params"]["repulsion_scale"] == 1.5 and (tmp_path / recs[1]["file"]).exists()
    bad = subprocess.run([PY, "-m", "guard_train.cli", "generate", "--model", str(tiny_sd_dir), "--prompts", "x",
                          "--method", "guard", "--param", "tau=1", "--out", str(tmp_path / "b")], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert bad.returncode == 2 and "unknown parameter(s) ['tau']" in bad.stderr and not (tmp_path / "b").exists()


def test_ren_mask_positions_sd2_tokenizer_pads_with_zero(engine, tmp_path):
    """SD 2.x's OpenCLIP tokenizer pads with id 0 ("!") instead of EOS: L (BOS..first EOS) must not change."""
    from transformers import CLIPTokenizer

    from guard_train.lab.tiny_sd import clip_bpe_files

    d = clip_bpe_files(tmp_path)
    sd2 = CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"), model_max_length=77, pad_token="!")
    ids = sd2(PROMPTS[0], padding="max_length", max_length=77).input_ids
    assert ids[-1] == 0 and sd2.pad_token_id == 0
    sd1_len = engine.encode(PROMPTS)[1]
    orig = engine.tokenizer
    engine.tokenizer = sd2
    try:
        _, sd2_len = engine.encode(PROMPTS)
        b = get_strategy("ren").branches(0, 999, type("C", (), {"cond": torch.zeros(2, 77, 4),
                                                               "uncond": torch.zeros(2, 77, 4),
                                                               "lengths": sd2_len, "rows": 2})())
    finally:
        engine.tokenizer = orig
    assert sd2_len.tolist() == sd1_len.tolist()
    first_pad = ids.index(0)
    assert b["cond"].edit.token_mask[0].tolist() == [k < first_pad for k in range(77)]  # padding masked, EOS kept


def test_lora_through_engine_equals_fused_lora(tiny_sd_dir, tmp_path):
    src = GuidanceEngine.from_pretrained(str(tiny_sd_dir))
    _save_random_lora(src.unet, ["to_q", "to_k", "to_v", "to_out.0"], tmp_path)
    eng = GuidanceEngine.from_pretrained(str(tiny_sd_dir), lora=str(tmp_path))
    a = eng.generate(PROMPTS, method="guard", steps=3)
    eng.pipe.fuse_lora()
    eng.pipe.unload_lora_weights()  # weights merged, adapter layers gone
    assert not any("lora" in n for n, _ in eng.unet.named_parameters())
    b = eng.generate(PROMPTS, method="guard", steps=3)
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


def test_two_pass_methods_reuse_the_initial_noise(engine, monkeypatch):
    seen = []
    real = GuidanceEngine.run

    def spy(self, ctx, strategy, latents=None, progress=False, **kw):
        seen.append((strategy.name, (ctx.latents0 if latents is None else latents).clone()))
        return real(self, ctx, strategy, latents, progress, **kw)

    monkeypatch.setattr(GuidanceEngine, "run", spy)
    for m, probe in (("opposite_dynamic", "probe"), ("be_opt", "be_baseline")):
        seen.clear()
        engine.generate(PROMPTS, method=m, num_images=2, steps=3, seed=4)
        assert [s for s, _ in seen] == [probe, m]
        assert torch.equal(seen[0][1], seen[1][1])
        ref = engine._context(["x"] * 4, [0, 0, 1, 1], PROMPTS, 2, 4, 3, None, None).latents0
        assert torch.equal(seen[0][1], ref)  # the same per-prompt seeded noise as a plain generation


def test_outputs_do_not_depend_on_batch_companions(engine):
    """Each prompt's images depend only on its own seed: what lets prompts be split across processes."""
    for m in ("cfg", "gni", "random_token", "guard"):
        both = engine.generate(PROMPTS, method=m, num_images=2, steps=3, seeds=[11, 22])
        alone = engine.generate(PROMPTS[1:], method=m, num_images=2, steps=3, seeds=[22])
        assert np.abs(both.images[2:].astype(int) - alone.images.astype(int)).max() <= 1, m


def test_prepasses_stop_early_and_record_nothing(engine):
    """run(stop=k) is the first k steps of the full loop; record=False leaves the detection statistics alone, so a
    two-pass method records exactly one magnitude per step of its own generation (not its probe's)."""
    from guard_train.guidance.strategies.cfg import CFG

    ctx = engine._context(PROMPTS, [0, 1], PROMPTS, 1, [5, 6], 4, None, None)
    part = engine.run(ctx, CFG(), stop=2, record=False)
    assert ctx.stats["magnitude"] == []
    rest = engine.run(ctx, CFG(), stop=2)
    assert torch.allclose(part, rest) and len(ctx.stats["magnitude"]) == 2
    full = engine.run(ctx, CFG())
    assert len(ctx.stats["magnitude"]) == 2 + 4 and not torch.allclose(part, full)
    for m in ("opposite_dynamic", "be_opt"):
        res = engine.generate(PROMPTS, method=m, num_images=1, steps=3, seed=4)
        assert res.stats["magnitude"].shape == (2, 3), m


def test_summary_generation_equals_diffusers_pipeline_call():
    """The end-of-run summary generates through the engine (the one generation path); on a DDIM pipeline it is
    bit-identical to diffusers' own call with the same per-caption generators and the same batch. Batching several
    captions into one UNet call may move a pixel by one level on CPUs whose kernels round by batch size (seen with
    AVX-512), never more."""
    from guard_train.data.images import to_uint8
    from guard_train.metrics.memorization import generate
    from guard_train.models.loading import load_pipeline

    pipe = load_pipeline(str(ROOT / "models" / "tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    caps = ["a red circle on a cat photo", "a blue square on a coffee photo"]
    ref = np.concatenate([to_uint8(pipe(c, num_images_per_prompt=2, num_inference_steps=5, guidance_scale=5.0,
                                        generator=torch.Generator().manual_seed(7 + k), height=64, width=64,
                                        output_type="pt").images * 2 - 1) for k, c in enumerate(caps)])
    one_by_one = np.concatenate([generate(pipe, [c], 2, 5, 5.0, 7 + k) for k, c in enumerate(caps)])
    assert np.array_equal(one_by_one, ref)
    batched = generate(pipe, caps, 2, 5, 5.0, 7).astype(int)
    assert np.abs(batched - ref).max() <= 1 and (batched != ref).mean() < 1e-3
