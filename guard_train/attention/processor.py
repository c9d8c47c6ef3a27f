"""One cross-attention processor for every method, at training and at inference time.

Installed on selected `attn2` layers (by module name or by execution order: down → mid → up, which is *not*
`named_modules()` order). What it does per call is read from a shared `CrossAttnState`:

* capture — per sample: token mass a[b,k] = mean over heads h and queries q of softmax(S)[b,h,q,k] (a 77-vector),
  its entropy H = −Σ_k a_k log a_k (Ren et al. 2024's statistic, natural log, all positions), and, for chosen
  layers, the head-averaged map [B, Q, 77] (Bright Ending's end-token maps) or per-head statistics (token mass per
  head and the query-mean entropy per head: GUARD's dynamic head selection).
* edit — on the pre-softmax logits S = q·kᵀ/√d, in this order:
  1. GUARD spike attenuation (Zhao et al. 2026, `_XAttnLogger`): for each (sample, head) row r of the selected
     batch rows, m[r,k] = max_q S[r,q,k]; μ_r, σ_r = mean and unbiased std of m over k ≥ 1 (BOS excluded); spike
     where z = (m − μ)/(σ + 1e−6) > τ and k ≥ 1 (optionally only in chosen heads); the whole logit column of a
     spike is multiplied by s, or — the additive variant — has p added.
  2. per-token logit scale S[b,:,:,k] ×= c[b,k] (Ren et al.'s BOS ×1.25 on conditional rows).
  3. token mask: S[b,:,:,k] = −∞ where keep[b,k] is False (Ren et al.'s padding mask).
When the state asks nothing of a layer, the processor calls diffusers' `AttnProcessor2_0` (SDPA), so instrumented
but idle layers cost nothing and match the default exactly. Mask and logit-scale edits alone also stay on SDPA
(scaling logit column k equals scaling key k); only captures and GUARD's spike statistic compute attention
explicitly — and a spike edit alone does so for its own rows only: the batch's other rows (GUARD's unconditional
and untouched-prompt rows) stay on SDPA, so at SD's 64×64 latents no attention matrix is materialised for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

_NAME = re.compile(r"^(down_blocks|mid_block|up_blocks)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2")


def exec_order(names: Iterable[str]) -> list[str]:
    """attn2 layer names sorted in the order a UNet forward visits them (down, mid, up)."""
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def key(n: str):
        m = _NAME.match(n)
        if not m:
            raise ValueError(f"not a UNet cross-attention layer name: {n}")
        return rank[m.group(1)], int(m.group(2) or 0), int(m.group(3)), int(m.group(4))

    return sorted(names, key=key)


def cross_attention_layers(unet) -> list[str]:
    """Names (without '.processor') of all attn2 layers, in execution order."""
    return exec_order(n.removesuffix(".processor") for n in unet.attn_processors if ".attn2." in n)


@dataclass
class SpikeEdit:
    rows: torch.Tensor  # (B,) bool: batch rows the attenuation applies to (e.g. GUARD's positive slice)
    tau: float = 0.1
    scale: float = 0.3  # multiplicative edit: a spike's logit column × scale
    penalty: Optional[float] = None  # additive edit instead: a spike's logit column + penalty
    heads: Optional[dict[str, torch.Tensor]] = None  # layer -> (B, H) bool: heads where spikes may fire


@dataclass
class CrossAttnState:
    """Shared by all installed processors of one UNet; set before a forward, read after."""

    capture: set[str] = field(default_factory=set)  # layers whose token mass / entropy to record
    capture_maps: set[str] = field(default_factory=set)  # layers whose full [B, Q, T] maps to record
    edit_layers: Optional[set[str]] = None  # layers that apply the edits below (None = every installed layer)
    token_mask: Optional[torch.Tensor] = None  # (B, T) bool keep-mask
    token_logit_scale: Optional[torch.Tensor] = None  # (B, T) float
    spike: Optional[SpikeEdit] = None
    capture_heads: set[str] = field(default_factory=set)  # layers whose per-head mass / entropy to record
    keep_grad: bool = False  # keep captures in the autograd graph (e.g. an entropy loss); else detached
    # outputs (cleared by reset())
    mass: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T)
    entropy: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B,)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B, Q, T)
    spikes_fired: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (rows,) spike count per row
    head_mass: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, T) mean over queries
    head_entropy: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H) query-mean entropy

    def reset(self) -> None:
        self.mass, self.entropy, self.maps, self.spikes_fired = {}, {}, {}, {}
        self.head_mass, self.head_entropy = {}, {}

    def captures(self, layer: str) -> bool:
        return layer in self.capture or layer in self.capture_maps or layer in self.capture_heads

    def edits(self, layer: str) -> bool:
        has = self.token_mask is not None or self.token_logit_scale is not None or self.spike is not None
        return has and (self.edit_layers is None or layer in self.edit_layers)

    def active(self, layer: str) -> bool:
        return self.captures(layer) or self.edits(layer)


def token_entropy(p: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """H(p) = −Σ_k p_k log p_k over the last dim (natural log); 0·log 0 = 0."""
    return -(p * torch.log(p.clamp_min(eps))).sum(-1)


def spike_mask(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """GUARD's statistical mechanism. logits (R, Q, T) → (R, T) bool spikes (BOS never)."""
    m = logits.amax(dim=1)  # (R, T): per token, max over queries
    rest = m[:, 1:]
    mu, sd = rest.mean(-1, keepdim=True), rest.std(-1, keepdim=True)  # unbiased, positions 1..T-1
    z = (m - mu) / (sd + 1e-6)
    out = z > tau
    out[:, 0] = False
    return out


class GuardAttnProcessor:
    """See module docstring. One instance per layer; all share `state`."""

    def __init__(self, name: str, state: CrossAttnState):
        self.name, self.state = name, state
        self.sdpa = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        st = self.state
        if not st.active(self.name):
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        B, N, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        H = attn.heads
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(ctx), attn.to_v(ctx)
        d = k.shape[-1] // H
        q, k, v = (x.view(B, -1, H, d).transpose(1, 2) for x in (q, k, v))  # (B, H, *, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if not (st.captures(self.name) or st.spike is not None):
            out = self._sdpa_edits(attn, q, k, v, attention_mask)  # mask / logit scale only: stay on SDPA
        elif self._spike_rows_only(attention_mask):
            out = self._split(attn, q, k, v)
        else:
            out = self._explicit(attn, q, k, v, attention_mask, B)
        out = out.transpose(1, 2).reshape(B, N, H * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _sdpa_edits(self, attn, q, k, v, attention_mask):
        """Exact SDPA form of the token edits: scaling logit column k by c[b,k] is scaling key k by c[b,k]
        (q·(c k) = c (q·k)); the keep-mask is SDPA's boolean mask. No attention matrix is materialised."""
        import torch.nn.functional as F

        st = self.state
        B = q.shape[0]
        if st.edits(self.name) and st.token_logit_scale is not None:
            k = k * st.token_logit_scale.to(k)[:, None, :, None]
        mask = None
        if st.edits(self.name) and st.token_mask is not None:
            mask = st.token_mask.to(q.device)[:, None, None, :]
        if attention_mask is not None:
            am = attn.prepare_attention_mask(attention_mask, k.shape[2], B).view(B, attn.heads, -1, k.shape[2])
            mask = am if mask is None else am.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)

    def _spike_rows_only(self, attention_mask) -> bool:
        """The only work here is the spike edit on some rows: nothing captured, no mask, no other edit."""
        st = self.state
        return (st.spike is not None and st.edits(self.name) and not st.captures(self.name)
                and attention_mask is None and st.token_mask is None and st.token_logit_scale is None)

    def _split(self, attn, q, k, v):
        """Explicit attention with the spike edit on the spike rows; SDPA (untouched, as in plain CFG) on the rest."""
        import torch.nn.functional as F

        rows = self.state.spike.rows.to(q.device)
        if not bool(rows.any()):
            return F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        S = (q[rows] @ k[rows].transpose(-1, -2)).float() * attn.scale  # (R, H, N, T)
        edited = (self._spike_edit(S, rows).softmax(-1).to(v.dtype) @ v[rows])
        if bool(rows.all()):
            return edited
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=v.dtype, device=v.device)
        out[rows] = edited
        out[~rows] = F.scaled_dot_product_attention(q[~rows], k[~rows], v[~rows], scale=attn.scale)
        return out

    def _explicit(self, attn, q, k, v, attention_mask, B):
        S = (q @ k.transpose(-1, -2)).float() * attn.scale  # (B, H, N, T)
        if attention_mask is not None:
            S = S + attn.prepare_attention_mask(attention_mask, k.shape[2], B).view(
                B, attn.heads, -1, k.shape[2]).float()
        if self.state.edits(self.name):
            S = self._edit(S)
        P = S.softmax(-1)
        self._capture(P)
        return P.to(v.dtype) @ v

    def _edit(self, S: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.spike is not None and bool(st.spike.rows.any()):
            rows = st.spike.rows.to(S.device)
            S = S.clone()
            S[rows] = self._spike_edit(S[rows], rows)
        if st.token_logit_scale is not None:
            S = S * st.token_logit_scale.to(S)[:, None, None, :]
        if st.token_mask is not None:
            S = S.masked_fill(~st.token_mask.to(S.device)[:, None, None, :], float("-inf"))
        return S

    def _spike_edit(self, sub: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """GUARD's attenuation on the logits (R, H, N, T) of the spike rows (`rows`: their (B,) mask)."""
        st = self.state
        R, H, N, T = sub.shape
        flat = sub.reshape(-1, N, T)  # ((R·H), N, T): one statistic per (sample, head), as GUARD
        spikes = spike_mask(flat, st.spike.tau)
        heads = (st.spike.heads or {}).get(self.name)
        if heads is not None:  # dynamic head selection: spikes only in the chosen heads
            spikes = spikes & heads.to(sub.device)[rows].reshape(-1, 1)
        st.spikes_fired[self.name] = spikes.view(-1, H, T).sum(-1).float().mean(-1).detach()
        if st.spike.penalty is not None:
            edited = flat + spikes[:, None, :].to(flat.dtype) * st.spike.penalty
        else:
            s = torch.tensor(st.spike.scale, dtype=flat.dtype, device=flat.device)
            edited = flat * torch.where(spikes, s, 1.0)[:, None, :]
        return edited.view(R, H, N, T)

    def _capture(self, P: torch.Tensor) -> None:
        st = self.state
        keep = (lambda x: x) if st.keep_grad else (lambda x: x.detach())
        if self.name in st.capture:
            mass = keep(P.mean(dim=(1, 2)))  # (B, T)
            st.mass[self.name] = mass
            st.entropy[self.name] = token_entropy(mass)
        if self.name in st.capture_maps:
            st.maps[self.name] = keep(P.mean(dim=1))  # (B, N, T)
        if self.name in st.capture_heads:
            st.head_mass[self.name] = keep(P.mean(dim=2))  # (B, H, T)
            st.head_entropy[self.name] = keep(token_entropy(P).mean(dim=2))  # (B, H)


def install(unet, layers: Iterable[str | int] | str = "all", state: Optional[CrossAttnState] = None) -> CrossAttnState:
    """Put a GuardAttnProcessor on the chosen attn2 layers (names, or indices in execution order, or "all");
    every other attention layer keeps (or gets back) diffusers' default processor. Returns the shared state."""
    state = state or CrossAttnState()
    order = cross_attention_layers(unet)
    if layers == "all":
        chosen = set(order)
    else:
        chosen = set()
        for x in layers:
            if isinstance(x, int):
                if not -len(order) <= x < len(order):
                    raise ValueError(f"cross-attention layer index {x} out of range: this UNet has {len(order)}")
                chosen.add(order[x])
            elif x in order:
                chosen.add(x)
            else:
                raise ValueError(f"{x!r} is not a cross-attention layer of this UNet; layers: {order}")
    # set_attn_processor pops entries from the dict it is given: build it fresh, from a copy of the keys.
    procs = {}
    for full in list(unet.attn_processors.keys()):
        layer = full.removesuffix(".processor")
        procs[full] = GuardAttnProcessor(layer, state) if layer in chosen else AttnProcessor2_0()
    unet.set_attn_processor(procs)
    return state


def uninstall(unet) -> None:
    unet.set_attn_processor(AttnProcessor2_0())


def end_token_mask(maps: dict[str, torch.Tensor], rows: slice, lengths: torch.Tensor, latent_hw: tuple[int, int]):
    """Bright Ending's end-token mask: the layers' head-averaged maps (B, Q, T) of the given rows at token L−1,
    averaged over layers → (R, 1, h, w)."""
    ms = []
    for a in maps.values():
        a = a[rows]
        ms.append(a[torch.arange(a.shape[0]), :, lengths - 1])
    m = torch.stack(ms).mean(0)
    return m.view(-1, 1, *latent_hw)
