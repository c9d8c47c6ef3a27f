"""The strategy interface: what a mitigation method tells the denoising loop.

A strategy names the UNet *branches* it needs at each step (e.g. "uncond", "cond", GUARD's "pos"), how each
branch's rows are conditioned (embeddings, attention edits), and how to combine the branch predictions into the
ε̂ the scheduler steps with. `prepare` may rewrite prompts/embeddings or run probe passes before the loop.
Hyper-parameters are dataclass fields of `Params`; unknown names are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from guard_train.guidance.engine import GenContext


@dataclass
class AttnEdit:
    """Attention edits for one branch's rows (see attention/processor.py). Tensors are per row (R, T)."""

    token_mask: Optional[torch.Tensor] = None
    token_logit_scale: Optional[torch.Tensor] = None
    spike: Optional[tuple[float, float]] = None  # (tau, scale)


@dataclass
class Branch:
    embeds: torch.Tensor  # (R, T, D)
    edit: Optional[AttnEdit] = None


class ParamError(ValueError):
    pass


class Strategy:
    name = "?"

    @dataclass
    class Params:
        guidance_scale: float = 7.5

    edit_layers: Optional[set[str]] = None  # layers where branch edits apply (None = every cross-attn layer)
    capture_maps: set[str] = set()  # layers whose attention maps the strategy needs recorded

    def __init__(self, **params: Any):
        known = {f.name: f for f in fields(self.Params)}
        bad = [k for k in params if k not in known]
        if bad:
            raise ParamError(f"unknown parameter(s) {bad} for method {self.name!r}; "
                             f"valid: {sorted(known)}")
        self.p = self.Params(**{k: _cast(known[k], v) for k, v in params.items()})

    def prepare(self, ctx: "GenContext") -> None:
        """Before the loop: may edit ctx.cond / ctx.uncond embeddings or run probe passes."""

    def branches(self, i: int, t: int, ctx: "GenContext") -> dict[str, Branch]:
        return {"uncond": Branch(ctx.uncond), "cond": Branch(ctx.cond)}

    def combine(self, eps: dict[str, torch.Tensor], i: int, t: int, ctx: "GenContext") -> torch.Tensor:
        raise NotImplementedError

    def needs_attention(self) -> bool:
        return bool(self.capture_maps)


def _cast(f, v):
    """CLI values arrive as strings: cast to the field's type."""
    if not isinstance(v, str):
        return v
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "bool" in typ:
        if v.lower() not in ("true", "false", "1", "0"):
            raise ParamError(f"parameter {f.name} expects true/false, got {v!r}")
        return v.lower() in ("true", "1")
    if "int" in typ:
        return int(v)
    if "float" in typ:
        return float(v)
    return v


def cfg_combine(u: torch.Tensor, c: torch.Tensor, w) -> torch.Tensor:
    """ε̂ = ε_u + w (ε_c − ε_u); w a scalar or a per-row tensor."""
    if torch.is_tensor(w):
        w = w.view(-1, *([1] * (u.ndim - 1))).to(u)
    return u + w * (c - u)
