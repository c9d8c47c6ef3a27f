"""GUARD's full option set (issue 23): each combine rule or edit against hand-computed numbers, and every option
end to end on the tiny model — batched, with identities that pin the plumbing (an option set to its neutral value
gives exactly the default's images)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from guard_train.attention.processor import (
    CrossAttnState,
    GuardAttnProcessor,
    SpikeEdit,
)
from guard_train.guidance.base import ParamError
from guard_train.guidance.engine import GuidanceEngine
from guard_train.guidance.strategies import get_strategy
from guard_train.guidance.strategies.guard import (
    PRESETS,
    Guard,
    attraction_fade,
    edit_strength,
    gate_weights,
    repulsion_weight,
    select_heads,
    select_layers,
)

PROMPTS = ["a red circle on a cat photo", "a blue square and a green triangle on a coffee photo"]


def test_repulsion_and_attraction_schedules_hand_computed():
    r = math.sqrt(0.5)
    assert repulsion_weight(2.0, "cosine", 5, 10) == pytest.approx(2 * r)
    assert repulsion_weight(2.0, "sine", 5, 10) == pytest.approx(2 * r)
    assert repulsion_weight(2.0, "sine", 0, 10) == 0.0
    assert repulsion_weight(2.0, "linear", 5, 10) == pytest.approx(1.0)
    assert repulsion_weight(2.0, "none", 7, 10) == 2.0
    assert attraction_fade("none", 9, 10) == 1.0
    assert attraction_fade("linear", 2, 10) == pytest.approx(0.8)
    assert attraction_fade("cosine", 5, 10) == pytest.approx(r)
    assert attraction_fade("cos2", 5, 10) == pytest.approx(0.5)


def test_edit_window_and_fades_hand_computed():
    # T = 10, window [0.2, 0.8): steps 2..7, span 6
    assert edit_strength("constant", 0.2, 0.8, 1, 10) == 0.0
    assert edit_strength("constant", 0.2, 0.8, 8, 10) == 0.0
    assert edit_strength("constant", 0.2, 0.8, 2, 10) == 1.0
    assert edit_strength("linear_fadein", 0.2, 0.8, 2, 10) == 0.0
    assert edit_strength("linear_fadeout", 0.2, 0.8, 2, 10) == 1.0
    assert edit_strength("linear_fadein", 0.2, 0.8, 5, 10) == pytest.approx(0.5)
    assert edit_strength("cosine_fadein", 0.2, 0.8, 3, 10) == pytest.approx(0.5 * (1 - math.cos(math.pi / 6)))
    assert edit_strength("cosine_fadeout", 0.2, 0.8, 3, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))
    assert edit_strength("constant", 0.8, 0.2, 5, 10) == 1.0  # swapped bounds, as the authors' code


def _spiky_logits() -> torch.Tensor:
    """(B 1, H 2, N 2, T 4): in both heads token 3's max logit is 5 and tokens 1, 2 are 0 — z(3) = (5 − 5/3)/2.887
    = 1.15 > τ, z(1) = z(2) = −0.58; BOS (token 0, logit 9) is never a spike."""
    S = torch.zeros(1, 2, 2, 4)
    S[..., 0] = 9.0
    S[:, :, 0, 3] = 5.0
    S[:, :, 1, 3] = 1.0
    return S


def _edit(spike: SpikeEdit) -> torch.Tensor:
    proc = GuardAttnProcessor("L", CrossAttnState(spike=spike))
    return proc._edit(_spiky_logits())


def test_multiplicative_and_additive_spike_edits_and_the_head_mask():
    S = _spiky_logits()
    rows = torch.tensor([True])
    want = S.clone()
    want[..., 3] *= 0.3
    assert torch.equal(_edit(SpikeEdit(rows, tau=0.1, scale=0.3)), want)
    want = S.clone()
    want[..., 3] -= 2.0
    assert torch.equal(_edit(SpikeEdit(rows, tau=0.1, penalty=-2.0)), want)
    # only head 0 may fire: head 1 keeps its logits
    want = S.clone()
    want[:, 0, :, 3] -= 2.0
    got = _edit(SpikeEdit(rows, tau=0.1, penalty=-2.0, heads={"L": torch.tensor([[True, False]])}))
    assert torch.equal(got, want)
    # a threshold above every z-score: nothing changes
    assert torch.equal(_edit(SpikeEdit(rows, tau=2.0, scale=0.3)), S)


SD1_LAYERS = ([f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)]
              + ["mid_block.attentions.0.transformer_blocks.0.attn2"]
              + [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in (1, 2, 3) for a in range(3)])


def test_block_presets_are_the_authors_lists_on_sd1():
    # the authors' BLOCKS_* lists, written out for SD 1.x (names that do not exist in SD 1.x dropped)
    down_early = {l for l in SD1_LAYERS if l.startswith(("down_blocks.0.", "down_blocks.1."))}
    down_late = {l for l in SD1_LAYERS if l.startswith("down_blocks.2.")}
    mid = {"mid_block.attentions.0.transformer_blocks.0.attn2"}
    up_early = {l for l in SD1_LAYERS if l.startswith("up_blocks.1.")}
    up_late = {l for l in SD1_LAYERS if l.startswith(("up_blocks.2.", "up_blocks.3."))}
    assert select_layers(SD1_LAYERS, "early") == down_early | down_late | mid
    assert select_layers(SD1_LAYERS, "BLOCKS_EARLY") == down_early | down_late | mid
    assert select_layers(SD1_LAYERS, "semantic") == down_late | mid | up_early
    assert select_layers(SD1_LAYERS, "detail") == down_early | up_late
    assert select_layers(SD1_LAYERS, "middetail") == mid | down_early | up_late
    assert select_layers(SD1_LAYERS, "late") == mid | up_early | up_late
    assert select_layers(SD1_LAYERS, "all") == set(SD1_LAYERS)
    assert select_layers(SD1_LAYERS, "up") == up_early | up_late
    assert set(PRESETS) >= {"early", "all", "down", "mid", "up"}
    # explicit: a block prefix, a full name and an execution-order index
    got = select_layers(SD1_LAYERS, "mid_block, up_blocks.1.attentions.1, 0")
    assert got == mid | {"up_blocks.1.attentions.1.transformer_blocks.0.attn2", SD1_LAYERS[0]}
    with pytest.raises(ParamError, match="names no cross-attention layer"):
        select_layers(SD1_LAYERS, "up_blocks.0")
    with pytest.raises(ParamError, match="out of range"):
        select_layers(SD1_LAYERS, "99")


def test_gating_weights_hand_computed():
    cos = torch.tensor([[0.95, 0.7, 0.4], [0.5, 0.8, 0.0]])
    real = torch.tensor([[True, True, True], [True, True, False]])  # prompt 1 has two neighbours
    w, g = gate_weights(cos, real, "none", 0.9, 0.5, False, True)
    assert torch.equal(w, real.float()) and torch.equal(g, torch.ones(2))
    w, g = gate_weights(cos, real, "hard", 0.9, 0.5, False, True)
    assert torch.equal(w, torch.tensor([[1.0, 0, 0], [0, 0, 0]]))  # prompt 1: none kept → no attraction
    w, g = gate_weights(cos, real, "soft", 0.9, 0.5, False, True)
    want = torch.tensor([[1.0, math.exp(-0.16), math.exp(-1.0)], [math.exp(-0.64), math.exp(-0.04), 0.0]])
    assert torch.allclose(w, want) and torch.equal(g, torch.ones(2))
    w, g = gate_weights(cos, real, "soft", 0.9, 0.5, False, False)  # one gain from the nearest neighbour
    assert torch.equal(w, real.float()) and torch.allclose(g, torch.tensor([1.0, math.exp(-0.04)]))
    w, g = gate_weights(cos, real, "soft", 0.9, 0.5, True, True)  # nearest only
    assert torch.equal(w, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    assert torch.allclose(g, torch.tensor([1.0, math.exp(-0.04)]))


def test_neighbour_combine_hand_computed():
    s = Guard(orthogonalize=False, repulsion_scale=2.0, repulsion_schedule="none", guidance_scale=4.0)
    s.neighbours = [None, None]
    s.nb_weight, s.nb_gain = torch.tensor([[1.0, 0.5]]), torch.tensor([0.5])
    u = torch.full((1, 1, 1, 2), 1.0)
    a, b, c = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 4.0]), torch.tensor([2.0, 2.0])
    eps = {"uncond": u, "pos0": u + a.view(1, 1, 1, 2), "pos1": u + b.view(1, 1, 1, 2), "neg": u + c.view(1, 1, 1, 2)}
    ctx = SimpleNamespace(steps=10, prompt_index=[0])
    out = s.combine(eps, 3, 0, ctx)
    vp = (a + 0.5 * b) / 1.5  # weighted mean of the neighbour directions
    want = 1.0 + 4.0 * 0.5 * vp - 2.0 * c
    assert torch.allclose(out.view(2), want)
    s.nb_weight = torch.zeros(1, 2)  # hard gating kept none: attraction vanishes
    assert torch.allclose(s.combine(eps, 3, 0, ctx).view(2), 1.0 - 2.0 * c)


def test_head_selection_hand_computed():
    scores = {"A": torch.tensor([[0.1, 0.5, 0.3]]), "B": torch.tensor([[0.9, 0.2]])}
    got = select_heads(scores, 3.0, 2.0, 0.0)  # global top 2: B0 and A1
    assert got["A"].tolist() == [[False, True, False]] and got["B"].tolist() == [[True, False]]
    got = select_heads(scores, 1.0, 0.0, 0.0)  # per block, fraction 1: every head above the minimum
    assert got["A"].all() and got["B"].all()
    got = select_heads(scores, 0.5, 0.0, 0.0)  # per block, half: max(1, int(H/2)) heads
    assert got["A"].tolist() == [[False, True, False]] and got["B"].tolist() == [[True, False]]
    got = select_heads(scores, 3.0, 2.0, 0.6)  # global top 2, but only scores above 0.6
    assert got["A"].tolist() == [[False, False, False]] and got["B"].tolist() == [[True, False]]
    got = select_heads(scores, 3.0, 0.5, 0.0)  # global fraction: int(5 · 0.5) = 2 heads
    assert int(got["A"].sum() + got["B"].sum()) == 2


def test_basin_hand_computed():
    """A_t = end-token mass of the attractive rows, mean over layers and rows; ref = its max over steps 0–4; in the
    basin while A_t / ref > β."""
    s = Guard(basin_beta=0.5)
    s.neighbours, s.basin_layers = None, {"down", "mid"}
    s._basin_ref, s._in_basin = torch.zeros(1), torch.ones(1, dtype=torch.bool)
    T = 5
    engine = SimpleNamespace(last_names=["uncond", "pos", "neg"])
    ctx = SimpleNamespace(rows=1, lengths=torch.tensor([3]), prompt_index=[0], state={"prompt_list": ["p"]},
                          engine=engine)
    flags = []
    for i, a in enumerate([0.4, 0.8, 0.6, 0.5, 0.3, 0.41, 0.39]):
        m = torch.zeros(3, T)
        m[1, 2] = a  # the pos row's end token (index L − 1 = 2)
        m[0, 2] = m[2, 2] = 9.0  # other branches' rows do not count
        engine.last_mass = {"down": m, "mid": m, "up": torch.full((3, T), 9.0)}
        s._basin_step(i, ctx)
        flags.append(bool(s._in_basin[0]))
    # ref = 0.8 after step 1; 0.3/0.8 < 0.5 leaves the basin, 0.41/0.8 > 0.5 re-enters it
    assert flags == [True, True, True, True, False, True, False]
    assert ctx.state["basin"][1] == pytest.approx([0.8])


def test_bad_guard_parameters_are_refused(tmp_path):
    with pytest.raises(ParamError, match="neighbors must be"):
        get_strategy("guard", neighbors=str(tmp_path / "nope.json"))
    with pytest.raises(ParamError, match="repulsion_schedule must be one of"):
        get_strategy("guard", repulsion_schedule="exp")
    with pytest.raises(ParamError, match="edit_end must be"):
        get_strategy("guard", edit_end="1.5")
    with pytest.raises(ParamError, match="gating must be"):
        get_strategy("guard", gating="medium")


@pytest.fixture(scope="module")
def engine(tiny_sd_dir):
    return GuidanceEngine.from_pretrained(str(tiny_sd_dir), max_batch=5)


def _gen(engine, **params):
    return engine.generate(PROMPTS, method="guard", num_images=1, steps=4, seed=2, **params)


@pytest.fixture(scope="module")
def default(engine):
    return _gen(engine)


def _same(a, b) -> bool:
    return torch.equal(a.latents, b.latents)


def test_neutral_settings_give_the_default(engine, default, tmp_path):
    # the prompt as its own single neighbour, read from a file: the neighbour path equals the default path
    f = tmp_path / "nb.json"
    f.write_text(json.dumps({p: [p] for p in PROMPTS}))
    assert _same(_gen(engine, neighbors=str(f)), default)
    # dynamic heads that select every head (per block, fraction 1) change nothing (up to float noise: their scout
    # steps capture per-head statistics, so every row takes the explicit path there, where the default keeps the
    # unedited rows on SDPA; and 1e-4 is also the bound the penalty-vs-off check below uses)
    heads = _gen(engine, dynamic_heads=True, scout_steps=2, heads_global=0.0, heads_per_block=1.0)
    assert torch.allclose(heads.latents, default.latents, atol=1e-4)
    # a basin threshold no step falls under keeps the repulsion on (float noise again: the basin captures the
    # end-token mass, so its layers compute every row explicitly)
    assert torch.allclose(_gen(engine, basin_beta=1e-9).latents, default.latents, atol=1e-4)
    # explicit preset names and the full window are the defaults
    assert _same(_gen(engine, blocks="BLOCKS_EARLY", edit_start=0.0, edit_end=1.0, edit_schedule="constant"), default)
    # an additive penalty of 0 is no edit, like spike_edit=off (explicit softmax there vs SDPA here: float noise)
    pen, off = _gen(engine, spike_edit="penalty", spike_penalty=0.0), _gen(engine, spike_edit="off")
    assert torch.allclose(pen.latents, off.latents, atol=1e-4)
    # leaving the basin at every step is no repulsion
    assert torch.allclose(_gen(engine, basin_beta=1e9).latents, _gen(engine, repulsion_scale=0.0).latents, atol=1e-4)


def test_every_option_changes_the_images(engine, default, tmp_path):
    f = tmp_path / "nb.json"
    f.write_text(json.dumps({PROMPTS[0]: ["a red circle on a dog photo", "a cat"], PROMPTS[1]: ["a blue square"]}))
    variants = {
        "sine": dict(repulsion_schedule="sine"), "cos2": dict(attraction_schedule="cos2"),
        "penalty": dict(spike_edit="penalty", spike_penalty=-3.0), "all": dict(blocks="all"),
        "window": dict(edit_start=0.2, edit_end=0.6, edit_schedule="cosine_fadeout"),
        "random_token": dict(neighbors="random_token", num_neighbors=2, gating="soft"),
        "file_hard": dict(neighbors=str(f), gating="hard", gating_threshold=0.5),
        "heads": dict(dynamic_heads=True, scout_steps=2, heads_global=2.0),
    }
    for name, kw in variants.items():
        r = _gen(engine, **kw)
        assert np.isfinite(r.latents.numpy()).all(), name
        assert not _same(r, default), name
    # heads restricted to 2 of the edited layers' heads: fewer spikes fire than with every head
    few = engine.generate(PROMPTS[:1], method="guard", steps=4, dynamic_heads=True, scout_steps=2, heads_global=2.0)
    every = engine.generate(PROMPTS[:1], method="guard", steps=4)
    assert few.records[0]["spikes_fired_mean"] < every.records[0]["spikes_fired_mean"]


def test_options_do_not_depend_on_batching(engine):
    kw = dict(neighbors="word_repeat", num_neighbors=2, gating="soft", dynamic_heads=True, scout_steps=2,
              heads_global=3.0, basin_beta=0.5, spike_edit="penalty", spike_penalty=-2.0)
    a = _gen(engine, **kw)
    engine.max_batch = 64
    try:
        b = _gen(engine, **kw)
    finally:
        engine.max_batch = 5
    assert torch.allclose(a.latents, b.latents, atol=1e-4)


def test_options_with_lora_on_the_v_model():
    from conftest import ROOT

    eng = GuidanceEngine.from_pretrained(str(ROOT / "models" / "tiny-sd-v"),
                                         lora=str(ROOT / "models" / "tiny-sd-v-memorized-lora"))
    r = eng.generate(PROMPTS, method="guard", num_images=2, steps=4, guidance_scale=3.0, blocks="semantic",
                     neighbors="random_number", gating="soft", dynamic_heads=True, scout_steps=2, basin_beta=0.5)
    assert np.isfinite(r.latents.numpy()).all() and r.images.shape[0] == 4


def test_docs_table_is_the_declared_parameters():
    from conftest import ROOT

    from guard_train.guidance import params_doc

    text = (ROOT / "docs" / "inference.md").read_text()
    start, end = text.index(params_doc.BEGIN), text.index(params_doc.END) + len(params_doc.END)
    assert text[start:end] == params_doc.markdown(), "regenerate: guard-train methods --markdown"
    for m in ("guard", "wen_opt", "ren", "jain_dynamic"):
        assert all(doc for _, _, _, _, doc, _ in params_doc.rows(m)), m  # every parameter says what it does


def test_cli_lists_methods_and_refuses_unknown_blocks(tiny_sd_dir, tmp_path):
    import subprocess

    from conftest import PY, ROOT

    r = subprocess.run([PY, "-m", "guard_train.cli", "methods"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "repulsion_schedule: str = cosine" in r.stdout
    r = subprocess.run([PY, "-m", "guard_train.cli", "generate", "--model", str(tiny_sd_dir), "--prompts", "x",
                        "--method", "guard", "--param", "blocks=up_blocks.9", "--steps", "2", "--num-images", "1",
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "names no cross-attention layer" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "generations.jsonl").exists()
