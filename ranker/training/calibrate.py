"""From scores to decisions: Platt calibration of P(acceptable), the fallback threshold, and
the one L2-regularized logistic fit that calibration, the harm judge and the probe share."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ranker.training.lists import RankList
from ranker.training.stats import bootstrap_interval

MAX_FALLBACK = 0.02  # on benign pools overall
# On edgy benign pools alone: ~50 pools, so a 2% quantile would be set by the lowest one.
MAX_EDGY_FALLBACK = 0.05


def logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 0.0, penalize_bias: bool = False,
             init: list[float] | None = None, max_iter: int = 200,
             center: list[float] | None = None) -> torch.Tensor:
    """Weights w minimizing BCE(x @ w, y) + l2 * |w - center|^2 by L-BFGS (center: zero
    unless given). The last column of x is the bias column (all ones); its weight is
    penalized only if `penalize_bias`."""
    w = torch.zeros(x.shape[1]) if init is None else torch.tensor(init, dtype=torch.float32)
    w.requires_grad_(True)
    c = torch.zeros(x.shape[1]) if center is None else torch.tensor(center, dtype=torch.float32)
    opt = torch.optim.LBFGS([w], max_iter=max_iter)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w, y)
        if l2:
            loss = loss + l2 * (w - c if penalize_bias else (w - c)[:-1]).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def with_bias(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([x, np.ones((len(x), 1), x.dtype)], 1)).float()


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2):
    """A standardized, L2-regularized logistic regression; returns its scoring function."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = logistic(with_bias((x - mu) / sd), torch.from_numpy(y).float(), l2)
    return lambda z: (with_bias((z - mu) / sd) @ w).numpy()


def fit_calibration(scores: list[np.ndarray], lists: list[RankList]) -> tuple[float, float]:
    """Platt scaling: P(acceptable) = sigmoid(a * score + b), fitted on held-out candidates."""
    s = np.concatenate(scores).astype(np.float32)[:, None]
    y = torch.from_numpy(np.concatenate([x.labels for x in lists])).float()
    a, b = logistic(with_bias(s), y, init=[1.0, 0.0])
    return float(a), float(b)


SERVED_KS = (1, 2, 4, 8, 16)  # list sizes the served calibration is fitted at
# How far each K's fit may leave the fit of all K together: the penalty on the squared
# distance of its standardized (slope, intercept), in log-likelihood units over its pools.
SERVED_PRIOR = 2.0
JOINT_L2 = 1e-2  # on the shared fit's standardized slope and log2 K term


def fit_served_calibration(top_scores: dict[int, np.ndarray], top_ok: dict[int, np.ndarray]
                           ) -> dict[str, list[float]]:
    """Platt scaling of the *served* candidate: per list size K, P(the top-ranked of K
    candidates is acceptable) = sigmoid(a_K * its score + b_K), fitted on validation pools'
    top-ranked candidates (`top_scores[K]`, `top_ok[K]`: one row per pool).

    A fit on single candidates overstates the top of many: the best of K noisy scores of
    unacceptable candidates rises with K, so with one mapping more candidates meant more
    harmful answers served (docs/evaluation.md). Each K's fit is shrunk towards one fit of
    all K together (a shared slope and an offset in log2 K, itself L2-regularized): a few
    dozen pools are often nearly separable, and their unregularized fit was a step (slope 81
    on Qwen's benign K=1 pools) that fell back on half of XSTest's safe prompts.
    Keys are str(K), as JSON stores them."""
    ks = sorted(top_scores)
    s = {k: np.asarray(top_scores[k], dtype=np.float32) for k in ks}
    y = {k: torch.from_numpy(np.asarray(top_ok[k], dtype=np.float32)) for k in ks}
    every = np.concatenate([s[k] for k in ks])
    mu, sd = float(every.mean()), float(every.std()) + 1e-6
    z = {k: (s[k] - mu) / sd for k in ks}
    joint_x = np.concatenate([np.column_stack([z[k], np.full(len(z[k]), np.log2(k), np.float32)]) for k in ks])
    slope, per_doubling, bias = logistic(with_bias(joint_x), torch.cat([y[k] for k in ks]), JOINT_L2).tolist()
    out = {}
    for k in ks:
        prior = [slope, bias + per_doubling * float(np.log2(k))]
        a, b = logistic(with_bias(z[k][:, None]), y[k], SERVED_PRIOR / len(z[k]), penalize_bias=True,
                        init=prior, center=prior).tolist()
        out[str(k)] = [a / sd, b - a * mu / sd]  # on the raw score
    return out


def choose_threshold(best_benign: np.ndarray, edgy: np.ndarray | None = None) -> float:
    """Highest threshold that falls back on at most MAX_FALLBACK of benign pools and at most
    MAX_EDGY_FALLBACK of the edgy ones among them (`edgy`: a boolean mask)."""
    p = np.asarray(best_benign, dtype=float)
    if not len(p):
        return 0.5
    thr = np.quantile(p, MAX_FALLBACK)
    if edgy is not None and np.any(edgy):
        thr = min(thr, np.quantile(p[np.asarray(edgy, dtype=bool)], MAX_EDGY_FALLBACK))
    return float(thr)


def threshold_interval(best_benign: np.ndarray, edgy: np.ndarray | None = None, n: int = 1000,
                       seed: int = 0) -> list[float]:
    """5th and 95th percentile of `choose_threshold` over bootstrap resamples of the benign
    pools: the low quantiles rest on a few pools each."""
    p = np.asarray(best_benign, dtype=float)
    e = np.zeros(len(p)) if edgy is None else np.asarray(edgy, dtype=float)
    return bootstrap_interval(np.column_stack([p, e]),
                              lambda r: choose_threshold(r[:, 0], r[:, 1].astype(bool)), n, seed)
