"""Memorization detection scores from one CFG generation per prompt (higher = more likely memorized).

* Wen et al. (ICLR 2024, notebook): m_t = ‖ε_c − ε_u‖₂ per image; score = mean over the chosen steps and the
  prompt's generations. Variants: first step, first 10 steps, all steps.
* Ren et al. (ECCV 2024, `detect.py`):
    E = H( ā_{t0, l} )  — entropy at the first step of exec-layer `ren_layer` (default 3, i.e.
        down_blocks.1.attentions.1), ā = token mass averaged over heads and queries;
    D = mean_{last 10 steps} H(ā_t) + [ mean_{last 10} H_pad(ā_t) − H_pad(ā_{t0}) ], ā_t averaged over all
        cross-attention layers, H_pad = −Σ_{k ≥ L−1} p_k log p_k (first EOS and padding, not renormalised).
* Bright Ending LD (Chen et al., ICLR 2025): LD_t = ‖(ε_c − ε_u) ⊙ m‖₂ / mean(m), m the end-token mask of the
  last step (same generation), averaged over steps and generations.
The scores come from the statistics one recording generation leaves (`scores_from_stats`); the generation itself is
the evaluator's (`eval.evaluate.detection_scores`), the same path every measurement takes.
Summaries (`summarize`): AUROC, TPR at the ROC point whose FPR is closest to 1/3/5/10 % (Ren's script), best
accuracy over thresholds — scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch

from guard_train.attention.processor import token_entropy

SCORES = ("wen_first", "wen_first10", "wen_all", "ren_E", "ren_D", "be_LD")


def pad_entropy(p: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """−Σ_{k ≥ L−1} p_k log p_k per row; p (R, T), L (R,)."""
    keep = torch.arange(p.shape[-1])[None, :] >= (L[:, None] - 1)
    return -(p * torch.log(p.clamp_min(1e-12)) * keep).sum(-1)


def scores_from_stats(stats: dict, images_per_prompt: int, ren_layer: int = 3) -> dict[str, np.ndarray]:
    """Per-prompt scores from GuidanceEngine.generate(..., record=("attention", "diff", "end_maps")) stats."""
    n = images_per_prompt
    def per_prompt(v):
        return v.view(-1, n).mean(1).numpy()  # rows are prompt-major

    mag = stats["magnitude"]  # (R, steps)
    out = {"wen_first": per_prompt(mag[:, :1].mean(1)), "wen_first10": per_prompt(mag[:, :10].mean(1)),
           "wen_all": per_prompt(mag.mean(1))}
    if "mass" in stats:
        mass = stats["mass"]  # (steps, layers, R, T)
        out["ren_E"] = per_prompt(token_entropy(mass[0, ren_layer]))
        abar = mass.mean(1)  # (steps, R, T): averaged over layers
        L = stats["lengths"]
        last = abar[-10:]
        H = token_entropy(last).mean(0)
        Hpad = torch.stack([pad_entropy(a, L) for a in last]).mean(0) - pad_entropy(abar[0], L)
        out["ren_D"] = per_prompt(H + Hpad)
    if "diff" in stats and "end_mask" in stats:
        m = stats["end_mask"]  # (R, 1, h, w)
        d = stats["diff"]  # (steps, R, C, h, w)
        ld = (d * m[None]).flatten(2).norm(dim=2) / m.flatten(1).mean(1).clamp_min(1e-12)[None]
        out["be_LD"] = per_prompt(ld.mean(0))
    return out


def summarize(scores: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(labels).astype(int)
    fpr, tpr, thr = roc_curve(labels, scores)
    out = {"auroc": float(roc_auc_score(labels, scores))}
    for f in (0.01, 0.03, 0.05, 0.10):
        gap = np.abs(fpr - f)
        out[f"tpr@{int(f * 100)}%fpr"] = float(tpr[gap == gap.min()].max())  # ties: the best TPR at that FPR
    pos, neg = labels.sum(), (1 - labels).sum()
    out["best_accuracy"] = float(max((tp * pos + (1 - fp) * neg) / len(labels) for fp, tp in zip(fpr, tpr)))
    return out
