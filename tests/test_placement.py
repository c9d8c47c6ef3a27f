"""Where the engine runs: --device / --dtype on generate / detect / eval, and the pipeline moved there. CUDA itself
cannot run here; what can is checked: the choice of device, the refusals (exit 2, naming the fix), and a bf16
generation that follows the fp32 one."""

import subprocess

import numpy as np
import pytest
import torch
from conftest import PY, ROOT

from guard_train.guidance.engine import GuidanceEngine
from guard_train.models.loading import ModelLoadError, placement

MODEL = str(ROOT / "models" / "tiny-sd")


def test_placement_rules():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert placement("auto", "fp32") == (torch.device(want), torch.float32)
    assert placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ModelLoadError, match="fp16 needs a CUDA device"):
        placement("cpu", "fp16")
    with pytest.raises(ModelLoadError, match="dtype 'fp8'"):
        placement("cpu", "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            placement("cuda", "fp32")


def test_engine_in_bf16_follows_fp32():
    """Same seeds in bf16: every weight and the final latents are bf16, and the bf16 CFG latents stay much closer to
    the fp32 ones than another seed's fp32 latents are (bf16 rounding, not a different sample). GUARD, whose spike
    rule compares attention values with a threshold, runs in bf16 too."""
    prompts = ["a red circle on a cat photo", "a blue square on a coffee photo"]
    fp32 = GuidanceEngine.from_pretrained(MODEL)
    ref = fp32.generate(prompts, steps=6, num_images=1).latents.float()
    other = fp32.generate(prompts, steps=6, num_images=1, seed=100).latents.float()
    eng = GuidanceEngine.from_pretrained(MODEL, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in eng.unet.parameters()} == {torch.bfloat16}
    res = eng.generate(prompts, steps=6, num_images=1)
    assert res.latents.dtype == torch.bfloat16 and res.images.dtype == np.uint8
    assert (res.latents.float() - ref).norm() < 0.5 * (other - ref).norm()
    g = eng.generate(prompts, method="guard", steps=6, num_images=1)
    assert g.latents.dtype == torch.bfloat16 and torch.isfinite(g.latents.float()).all()


@pytest.mark.parametrize("flags, message", [(["--dtype", "fp16"], "fp16 needs a CUDA device"),
                                            (["--device", "cuda"], "no CUDA device")])
def test_generate_refuses_a_placement_it_cannot_have(tmp_path, flags, message):
    if torch.cuda.is_available() and "--device" in flags:
        pytest.skip("this machine has CUDA")
    r = subprocess.run([PY, "-m", "guard_train.cli", "generate", "--model", MODEL, "--prompts", "a red circle",
                        "--out", str(tmp_path / "g"), "--steps", "2", *flags], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
