"""How much leaked: image similarity of reconstructions (PSNR, SSIM) and membership-inference
quality (ROC AUC, TPR at a fixed low FPR). Images are (N, H, W) or (N, H*W) arrays in [0, 1]."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 100.0    # dB: an exact reconstruction (MSE 0) counts as 100 dB, so means stay finite


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) for data range 1."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else -10.0 * math.log10(mse)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: np.ndarray, b: np.ndarray, side: int | None = None) -> float:
    """Mean SSIM (Wang et al. 2004; K1 = 0.01, K2 = 0.03, data range 1) with a 7x7 Gaussian window
    (sigma 1.5). The maps are reflect-padded rather than cropped: an 8x8 digit would otherwise
    leave only 2x2 window positions. One image pair, flat or 2-D."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 1:
        side = side or int(round(math.sqrt(a.size)))
        a, b = a.reshape(side, side), b.reshape(side, side)
    x, y = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
    w = _gaussian_window()
    pad = w.shape[-1] // 2

    def blur(t):
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), w)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def best_match(targets: np.ndarray, candidates: np.ndarray) -> dict:
    """For each target image, the candidate reconstruction closest to it (highest PSNR), and the
    mean PSNR / SSIM of those best matches. Taking the best candidate per target measures what an
    attacker *could* get; it is the usual (pessimistic for the defender) way to score attacks that
    output several guesses."""
    targets = np.asarray(targets, np.float64).reshape(len(targets), -1)
    candidates = np.clip(np.asarray(candidates, np.float64).reshape(len(candidates), -1), 0.0, 1.0)
    if len(candidates) == 0:
        candidates = np.full((1, targets.shape[1]), 0.5)
    best = []
    for t in targets:
        scores = [psnr(c, t) for c in candidates]
        k = int(np.argmax(scores))
        best.append((scores[k], ssim(candidates[k], t), k))
    return {"psnr": float(np.mean([p for p, _, _ in best])), "ssim": float(np.mean([s for _, s, _ in best])),
            "per_target_psnr": [p for p, _, _ in best], "matches": [k for _, _, k in best]}


def roc_auc(member_scores, nonmember_scores) -> float:
    """Area under the ROC curve (higher score = "member"), ties counted half (Mann-Whitney U)."""
    m, n = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    allv = np.concatenate([m, n])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):       # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float = 0.01) -> float:
    """True-positive rate at the strictest threshold whose false-positive rate on the non-members
    is at most `fpr` (the threshold is calibrated on the non-member scores of the same run)."""
    m, n = np.asarray(member_scores, np.float64), np.sort(np.asarray(nonmember_scores, np.float64))[::-1]
    allowed = int(math.floor(fpr * len(n)))
    threshold = n[allowed] if allowed < len(n) else -np.inf
    return float(np.mean(m > threshold))
