"""The strategy interface: what a mitigation method tells the denoising loop.

A strategy names the UNet *branches* it needs at each step (e.g. "uncond", "cond", GUARD's "pos"), how each
branch's rows are conditioned (embeddings, attention edits), and how to combine the branch predictions into the
ε̂ the scheduler steps with. `prepare` may rewrite prompts/embeddings or run probe passes before the loop.
Hyper-parameters are dataclass fields of `Params`, each with its valid range (`ranged`, config/params.py); unknown
names, unparsable and out-of-range values are rejected before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from guard_train.config.params import ParamValueError, check_value, field_range, parse, ranged, type_hints


@dataclass
class Spike:
    """GUARD's spike edit for one branch: z-score threshold tau; a spike's logit column × scale, or + penalty when
    penalty is set; heads: layer -> (R, H) bool, the heads where spikes may fire (None: every head)."""

    tau: float
    scale: float = 1.0
    penalty: Optional[float] = None
    heads: Optional[dict[str, torch.Tensor]] = None


@dataclass
class AttnEdit:
    """Attention edits for one branch's rows (see attention/processor.py). Tensors are per row (R, T)."""

    token_mask: Optional[torch.Tensor] = None
    token_logit_scale: Optional[torch.Tensor] = None
    spike: Optional[Spike] = None


@dataclass
class Branch:
    embeds: torch.Tensor  # (R, T, D)
    edit: Optional[AttnEdit] = None


class ParamError(ValueError):
    """A bad method name or hyper-parameter (exit 2 in the CLI)."""


@dataclass
class GenContext:
    engine: Any  # the GuidanceEngine running this generation
    prompts: list[str]  # one per row (prompt repeated per image)
    prompt_index: list[int]  # per row
    cond: torch.Tensor  # (R, T, D)
    uncond: torch.Tensor
    lengths: torch.Tensor  # (R,) unpadded token count (BOS..first EOS) — "L" in the papers' notation
    latents0: torch.Tensor
    timesteps: torch.Tensor
    steps: int
    state: dict[str, Any] = field(default_factory=dict)  # strategy scratch space
    stats: dict[str, list] = field(default_factory=lambda: {"magnitude": []})

    @property
    def rows(self) -> int:
        return len(self.prompts)


class Strategy:
    name = "?"

    @dataclass
    class Params:
        guidance_scale: float = ranged(7.5, doc="CFG weight w")  # every float parameter must be finite

    edit_layers: Optional[set[str]] = None  # layers where branch edits apply (None = every cross-attn layer)
    capture_maps: set[str] = set()  # layers whose attention maps the strategy needs recorded
    capture_mass: set[str] = set()  # layers whose per-row token mass the strategy reads (engine.last_mass)
    capture_heads: set[str] = set()  # layers whose per-head statistics it reads (engine.last_heads)
    own_branch: str = "cond"  # the prompt's own unedited conditional branch: its ‖ε_c − ε_u‖ is the recorded magnitude

    def __init__(self, **params: Any):
        known = {f.name: f for f in fields(self.Params)}
        bad = [k for k in params if k not in known]
        if bad:
            raise ParamError(f"unknown parameter(s) {bad} for method {self.name!r}; "
                             f"valid: {sorted(known)}")
        self.p = self.Params(**{k: _cast(self.Params, known[k], v) for k, v in params.items()})

    def prepare(self, ctx: "GenContext") -> None:
        """Before the loop: may edit ctx.cond / ctx.uncond embeddings or run probe passes."""

    def branches(self, i: int, t: int, ctx: "GenContext") -> dict[str, Branch]:
        return {"uncond": Branch(ctx.uncond), "cond": Branch(ctx.cond)}

    def combine(self, eps: dict[str, torch.Tensor], i: int, t: int, ctx: "GenContext") -> torch.Tensor:
        raise NotImplementedError

    def needs_attention(self) -> bool:
        return bool(self.capture_maps or self.capture_mass or self.capture_heads)


def _cast(params_cls: type, f, v):
    """CLI values arrive as strings: parse as the field's type; any value is checked against its declared range
    (a NaN guidance scale would otherwise draw a black image and write NaN into the JSON)."""
    try:
        if isinstance(v, str):
            return parse(f.name, v, type_hints(params_cls)[f.name], field_range(f))
        check_value(f.name, v, field_range(f))
        return v
    except ParamValueError as e:
        raise ParamError(f"parameter {e}") from None


def cfg_combine(u: torch.Tensor, c: torch.Tensor, w) -> torch.Tensor:
    """ε̂ = ε_u + w (ε_c − ε_u); w a scalar or a per-row tensor."""
    if torch.is_tensor(w):
        w = w.view(-1, *([1] * (u.ndim - 1))).to(u)
    return u + w * (c - u)


METHODS: dict[str, type[Strategy]] = {}  # name -> strategy class, in registration order (strategies/__init__.py)


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy a method of the engine, the CLI, config validation and the docs table."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls
