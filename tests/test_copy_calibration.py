"""The lab's copy calibration holds for SSCD: near-copies score high, new instances of a caption low."""

import numpy as np
import pytest

from guard_train.lab.calibration import calibration_table
from guard_train.lab.dataset import LabConfig, build_lab
from guard_train.metrics.embed import TiledPixel, get_embedder


def test_sscd_separates_copies_from_new_instances():
    lab = build_lab(LabConfig(num_instances=64, held_out=0))
    t = calibration_table(lab, get_embedder("sscd"))
    assert t["backend"].startswith("sscd")
    assert t["near_copy"]["p50"] > 0.6
    assert t["same_caption_new_instance"]["p50"] < 0.25
    assert t["near_vs_new_auroc"] > 0.95  # the table the lab is designed for (docs/lab.md)
    assert t["train_train_top2"]["share_above_0.5"] < 0.1
    assert 0.2 < t["lab_threshold"] < 0.8


def test_pixel_fallback_hand_computed():
    a = np.zeros((1, 8, 8, 3), np.uint8)
    b = a.copy()
    b[0, :2, :2] = 255  # one 2x2 tile fully different -> tile RMS 1.0 -> similarity 0
    c = a.copy()
    c[0, :2, :2, 0] = 255  # one channel of that tile -> RMS sqrt(1/3)
    s = TiledPixel().similarity(a, np.concatenate([a, b, c]))
    assert s[0, 0] == pytest.approx(1.0)
    assert s[0, 1] == pytest.approx(0.0)
    assert s[0, 2] == pytest.approx(1 - np.sqrt(1 / 3), abs=1e-6)


def test_sscd_backends_agree_on_copies_vs_non_copies():
    """The int8 SSCD and its distilled student both separate near-copies from new instances on the lab."""
    from guard_train.metrics.embed import get_embedder

    lab = build_lab(LabConfig(num_instances=32, held_out=0))
    a = calibration_table(lab, get_embedder("sscd"))
    b = calibration_table(lab, get_embedder("sscd-distilled"))
    for t in (a, b):
        assert t["near_vs_new_auroc"] > 0.9 and t["near_copy"]["p50"] > t["same_caption_new_instance"]["p50"] + 0.3
    assert a["backend"] != b["backend"]


def test_torchscript_backend_loads_and_preprocesses(tmp_path):
    """The TorchScript path (for the official SSCD files): a scripted stand-in checks loading, the SSCD authors'
    transform (short side to 288, no crop, ImageNet mean/std) and L2-normalised output. Not an SSCD model."""
    import torch

    from guard_train.metrics.embed import SSCDTorchScript

    class Probe(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x.mean(dim=(1, 2, 3)), torch.tensor(float(x.shape[-1])).expand(x.shape[0])], 1)

    torch.jit.save(torch.jit.script(Probe()), tmp_path / "probe.pt")
    e = SSCDTorchScript(str(tmp_path / "probe.pt"))
    out = e.embed(np.full((2, 64, 64, 3), 255, np.uint8))  # white: channel c becomes (1 - mean_c) / std_c
    white = np.mean([(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    want = np.array([white, 288.0]) / np.linalg.norm([white, 288.0])
    assert np.allclose(out, want, atol=1e-5) and "torchscript" in e.name


def test_clip_score_local_model_and_clear_error(tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from guard_train.lab.tiny_sd import clip_tokenizer
    from guard_train.metrics.clip_score import CLIPScoreError, CLIPScorer

    with pytest.raises(CLIPScoreError, match="not a local transformers CLIPModel directory"):
        CLIPScorer(str(tmp_path / "nope"))
    tok = clip_tokenizer(tmp_path / "tok")
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 49408, "projection_dim": 16},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 16},
                     projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()  # a tiny random CLIP: checks the plumbing, not semantics
    d = tmp_path / "clip"
    model.save_pretrained(d)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(d)
    s = CLIPScorer(str(d))
    imgs = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    got = s.score(imgs, ["a red circle", "a blue square"])
    inp = s.processor(text=["a red circle", "a blue square"], images=list(imgs), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inp)
    want = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1).numpy()
    assert np.allclose(got, want, atol=1e-5)
