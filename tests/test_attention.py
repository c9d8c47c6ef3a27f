import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from guard_train.attention.processor import SpikeEdit, cross_attention_layers, install, spike_mask, token_entropy

SD1_LIKE = dict(block_out_channels=(32, 64), attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))  # 8 heads everywhere
SD2_LIKE = dict(block_out_channels=(64, 128), attention_head_dim=(1, 2), use_linear_projection=True,
                cross_attention_dim=64, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))  # head dim 64


def _unet(cfg, lora=False):
    torch.manual_seed(0)
    u = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, **cfg).eval()
    if lora:
        from peft import LoraConfig

        u.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        with torch.no_grad():
            for n, p in u.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)  # make the adapter non-trivial
    return u


def _inputs(u, b=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.tensor([10, 700][:b]),
            torch.randn(b, 77, u.config.cross_attention_dim, generator=g))


def test_exec_order_matches_forward_order():
    u = _unet(SD1_LIKE)
    seen = []
    for name, mod in u.named_modules():
        if name.endswith("attn2"):
            mod.register_forward_pre_hook(lambda m, a, n=name: seen.append(n))
    with torch.no_grad():
        u(*_inputs(u))
    assert cross_attention_layers(u) == seen
    assert [n for n, _ in u.named_modules() if n.endswith("attn2")] != seen  # registration order differs (mid last)


@pytest.mark.parametrize("cfg", [SD1_LIKE, SD2_LIKE], ids=["sd1-like", "sd2-like"])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_matches_default_processor(cfg, lora):
    u = _unet(cfg, lora)
    x = _inputs(u)
    with torch.no_grad():
        ref = u(*x).sample
        st = install(u, "all")
        idle = u(*x).sample  # installed but asked nothing: SDPA fast path
        st.capture = set(cross_attention_layers(u))  # explicit path everywhere
        explicit = u(*x).sample
    assert torch.allclose(idle, ref, atol=1e-5)
    assert torch.allclose(explicit, ref, atol=1e-5)
    assert set(st.entropy) == st.capture and all(e.shape == (2,) for e in st.entropy.values())
    for m in st.mass.values():
        assert torch.allclose(m.sum(-1), torch.ones(2), atol=1e-5)


def test_entropy_hand_computed():
    p = torch.zeros(2, 77)
    p[0, :2] = 0.5
    p[1] = 1 / 77
    assert torch.allclose(token_entropy(p), torch.tensor([math.log(2), math.log(77)]), atol=1e-6)


def test_spike_mask_hand_computed():
    # one row, 2 queries, 5 tokens; max over queries m = [9, 1, 1, 4, 1]; over k>=1: mean 1.75, unbiased sd 1.5
    S = torch.tensor([[[9.0, 1, 0, 4, 1], [0, 0, 1, 2, 0]]])
    z3 = (4 - 1.75) / (1.5 + 1e-6)  # 1.5 -> spike for tau < 1.5; others z = -0.5
    assert spike_mask(S, tau=0.1).tolist() == [[False, False, False, True, False]]  # BOS never a spike
    assert spike_mask(S, tau=z3 + 0.01).tolist() == [[False] * 5]
    assert spike_mask(S, tau=-0.6).tolist() == [[False, True, True, True, True]]


def test_edits_mask_scale_and_spike_rows():
    u = _unet(SD1_LIKE)
    x = _inputs(u)
    layers = cross_attention_layers(u)
    st = install(u, "all")
    st.capture = set(layers)
    with torch.no_grad():
        base = u(*x).sample
        # logit scale 0 -> uniform attention over the 77 tokens -> entropy ln 77
        st.token_logit_scale = torch.zeros(2, 77)
        u(*x)
        assert all(torch.allclose(e, torch.full((2,), math.log(77)), atol=1e-5) for e in st.entropy.values())
        st.token_logit_scale = None
        # mask: only tokens 0..4 kept -> the rest get exactly zero mass
        keep = torch.zeros(2, 77, dtype=torch.bool)
        keep[:, :5] = True
        st.token_mask = keep
        u(*x)
        assert all(m[:, 5:].abs().max() == 0 for m in st.mass.values())
        st.token_mask = None
        # spike attenuation on row 1 only: row 0's prediction is untouched, row 1's changes
        st.spike = SpikeEdit(rows=torch.tensor([False, True]), tau=0.1, scale=0.3)
        out = u(*x).sample
    assert torch.allclose(out[0], base[0], atol=1e-5)
    assert not torch.allclose(out[1], base[1], atol=1e-4)
    assert all(f.shape == (1,) and f.item() > 0 for f in st.spikes_fired.values())


def test_layer_selection_by_index_and_name():
    u = _unet(SD1_LIKE)
    order = cross_attention_layers(u)
    install(u, [0, order[-1]])
    procs = u.attn_processors
    chosen = {n for n, p in procs.items() if not isinstance(p, AttnProcessor2_0)}
    assert chosen == {order[0] + ".processor", order[-1] + ".processor"}
    assert all(".attn1." not in n for n in chosen)
    with pytest.raises(ValueError, match="out of range"):
        install(u, [99])
    with pytest.raises(ValueError, match="not a cross-attention layer"):
        install(u, ["down_blocks.0.attentions.0.transformer_blocks.0.attn1"])


def test_captures_can_carry_gradients_into_lora():
    u = _unet(SD1_LIKE, lora=True)
    layer = cross_attention_layers(u)[1]
    st = install(u, [layer])
    st.capture, st.keep_grad = {layer}, True
    u(*_inputs(u))
    st.entropy[layer].sum().backward()
    grads = [p.grad for n, p in u.named_parameters() if "lora" in n and "attn2" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_sdpa_edit_path_equals_explicit_path():
    """Mask + logit-scale edits run on SDPA (keys scaled) when nothing is captured: same output as explicit."""
    u = _unet(SD2_LIKE, lora=True)
    x = _inputs(u)
    layers = cross_attention_layers(u)
    st = install(u, "all")
    keep = torch.ones(2, 77, dtype=torch.bool)
    keep[:, 9:] = False
    scale = torch.ones(2, 77)
    scale[1, 0] = 1.25
    st.token_mask, st.token_logit_scale = keep, scale
    with torch.no_grad():
        fast = u(*x).sample
        st.capture = set(layers)  # forces the explicit path
        slow = u(*x).sample
        st.token_mask = st.token_logit_scale = None
        plain = u(*x).sample
    assert torch.allclose(fast, slow, atol=1e-5)
    assert not torch.allclose(fast, plain, atol=1e-4)


@pytest.mark.parametrize("rows", [[False, True, False], [True, True, True], [False, False, False]])
def test_spike_split_path_equals_explicit_path(rows):
    """A spike edit alone computes explicit attention for its rows only; the other rows stay on SDPA and equal the
    default processor's. Same output and spike counts as the all-explicit path (forced here by a capture)."""
    u = _unet(SD2_LIKE, lora=True)
    x = _inputs(u, 2)
    x = tuple(torch.cat([t, t[:1]]) for t in x)  # 3 rows
    layers = cross_attention_layers(u)
    with torch.no_grad():
        default = u(*x).sample
        st = install(u, layers[:2])
        st.spike = SpikeEdit(rows=torch.tensor(rows), tau=0.1, scale=0.3)
        split = u(*x).sample
        fired = {k: v.clone() for k, v in st.spikes_fired.items()}
        st.capture = set(layers[:2])  # forces the explicit path on every row
        explicit = u(*x).sample
    assert torch.allclose(split, explicit, atol=1e-5)
    assert fired.keys() == st.spikes_fired.keys() and all(torch.equal(fired[k], st.spikes_fired[k]) for k in fired)
    keep = ~torch.tensor(rows)
    assert torch.allclose(split[keep], default[keep], atol=1e-6)
    if any(rows):
        assert not torch.allclose(split[~keep], default[~keep], atol=1e-4)
