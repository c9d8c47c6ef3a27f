"""The one conversion between uint8 images (N, H, W, 3) and model tensors (N, 3, H, W) in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch


def to_model(images) -> torch.Tensor:
    """uint8 NHWC (array or list of arrays) → float NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images) if isinstance(images, list) else images)) \
        .permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] (clamped) → uint8 NHWC."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
