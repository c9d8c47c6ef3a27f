"""The committed memorizing model — `models/tiny-sd-v-memorized-lora` on its base `models/tiny-sd-v` — really copies:
from pure noise, its duplicated training captions come back as SSCD copies of their own training images and its unique
ones do not; GUARD, at the same guidance, removes those copies. Copy protocol: the standard rule — top-1 SSCD over every
training row (planted near-copies included) > 0.5; an own copy's best match among the caption's own rows > 0.5. Same
prompts, seeds and sampler as `benchmarks/sampler_copy_probe.py` (docs/base-model.md, "What makes it copy from noise"):
8 duplicated + 8 unique training captions × 4 images, DDIM 25 steps (trailing, first t = 999), guidance 3, seed 0.
Minutes on 2 CPU cores: CI's slow step."""

import numpy as np
import pytest
from conftest import ROOT

LORA = ROOT / "models" / "tiny-sd-v-memorized-lora"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe():
    from guard_train.eval.evaluate import Reference
    from guard_train.guidance.engine import GuidanceEngine
    from guard_train.lab.dataset import build_lab, read_lab_config
    from guard_train.metrics.copy import own_similarity
    from guard_train.metrics.embed import SSCDOnnx, get_embedder

    lab = build_lab(read_lab_config(LORA))
    keys = sorted(lab.originals)
    dup = sorted({it.instance for it in lab.items if it.is_dup})
    uniq = [k for k in keys if k not in dup][: len(dup)]
    caption = {it.instance: it.caption for it in lab.items if it.copy_kind == "original"}
    ref = Reference(np.stack(lab.images), [it.instance for it in lab.items])  # every training row
    embedders = {"bilinear": get_embedder("sscd"), "bicubic": SSCDOnnx(kernel="bicubic")}
    e_train = {k: e.embed(ref.images) for k, e in embedders.items()}
    eng = GuidanceEngine.from_pretrained(str(ROOT / "models" / "tiny-sd-v"), lora=str(LORA))
    owner = np.repeat(np.array(dup + uniq), 4)
    n = 4 * len(dup)

    def copies(method: str, **params) -> dict[str, tuple[int, int]]:
        """Per resize kernel: (own copies among the duplicated captions' 32 images, copies among the unique
        captions' 32)."""
        res = eng.generate([caption[k] for k in dup + uniq], method=method, num_images=4, steps=25, seed=0,
                           guidance_scale=3.0, **params)
        out = {}
        for kernel, emb in embedders.items():
            sims = emb.embed(res.images) @ e_train[kernel].T
            own = own_similarity(sims, owner, ref.keys) > 0.5
            out[kernel] = int(own[:n].sum()), int((sims.max(1)[n:] > 0.5).sum())
            print(f"{method} ({kernel}): own copies of duplicated captions {out[kernel][0]}/{n}, "
                  f"unique captions' copies {out[kernel][1]}/{n}")
        return out

    return copies


@pytest.fixture(scope="module")
def counts(probe):
    return {m: probe(m) for m in ("cfg", "guard")}


def test_the_committed_memorizing_lora_copies_its_duplicates_from_noise(counts):
    dup_own, unique_any = counts["cfg"]["bilinear"]
    # the independent check of this pair found 21 of 32 by the standard rule and 0 unique copies; the bound
    # asks for a majority of copies (the regime every figure relies on), not a fitted count
    assert dup_own >= 16 and unique_any == 0, (dup_own, unique_any)


def test_guard_removes_the_copies_cfg_makes(counts):
    """At its default repulsion (λ_rep 2, set beside w₊ 7.5) GUARD removes them, but at w₊ 3 by leaving the caption:
    lab alignment 0.05 vs CFG's 0.57 (docs/inference.md) — this pins the copy count, it is not a free win."""
    from guard_train.metrics.copy import wilson

    dup_own, unique_any = counts["guard"]["bilinear"]
    # its unrelated images may land near some training row (measured 1 of 32 unique-caption images): it must not
    # copy beyond CFG's own unique-caption rate's Wilson interval
    assert dup_own <= 1 and unique_any / 32 <= wilson(counts["cfg"]["bilinear"][1], 32)[1], (dup_own, unique_any)


def test_the_resize_kernel_moves_no_verdict(counts):
    """SSCD's input transform is fixed (bilinear, the SSCD authors' Resize); bicubic instead must not change a
    conclusion: CFG vs GUARD keeps its interval verdict, and for each method the two kernels' Wilson 95 % intervals
    overlap (the statistic's own uncertainty at n = 32, not a tolerance fitted to a run). Measured: CFG 22/32
    bilinear vs 16/32 bicubic — generated copies score near the threshold, so single counts move; verdicts do not."""
    from guard_train.lab.bench import interval_effect
    from guard_train.metrics.copy import wilson

    def pooled(k: int) -> dict:
        return {"rate": k / n, "ci95": wilson(k, n), "k": k, "n": n}

    n = 32
    verdicts = {kern: interval_effect(pooled(counts["guard"][kern][0]), pooled(counts["cfg"][kern][0]))
                for kern in ("bilinear", "bicubic")}
    assert verdicts["bilinear"] == verdicts["bicubic"] == "lower (helps)", verdicts
    for m in ("cfg", "guard"):
        (lo_a, hi_a), (lo_b, hi_b) = wilson(counts[m]["bilinear"][0], n), wilson(counts[m]["bicubic"][0], n)
        assert lo_a <= hi_b and lo_b <= hi_a, (m, counts[m])
