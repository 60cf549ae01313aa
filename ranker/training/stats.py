"""Measures over ranked lists and pools: top-1, NDCG, calibration error, AUROC, bootstrap
intervals, and the mean over training seeds."""

from __future__ import annotations

import numpy as np

from ranker.training.lists import RankList, trainable


def top1_hits(scores: list[np.ndarray], lists: list[RankList], contrast: bool = True) -> np.ndarray:
    """Per list, whether its top pick is acceptable, over lists holding both labels (a list of
    acceptable answers only is right whatever the ranking). contrast=False: the paper's
    definition, every list with at least one acceptable candidate."""
    return np.array([x.labels[int(np.argmax(s))] for s, x in zip(scores, lists)
                     if x.labels.sum() > 0 and (not contrast or x.labels.sum() < len(x.labels))],
                    dtype=float)


def top1_accuracy(scores: list[np.ndarray], lists: list[RankList], contrast: bool = True) -> float:
    hits = top1_hits(scores, lists, contrast)
    return float(hits.mean()) if len(hits) else float("nan")


def bootstrap_interval(rows, stat=np.mean, n: int = 1000, seed: int = 0) -> list[float]:
    """5th and 95th percentile of `stat` over `n` bootstrap resamples of `rows` (one row per
    prompt or list): how far a number measured on 100-250 prompts could move on others."""
    rows = np.asarray(rows)
    if not len(rows):
        return [float("nan")] * 2
    rng = np.random.default_rng(seed)
    boot = [stat(rows[rng.integers(0, len(rows), len(rows))]) for _ in range(n)]
    return [float(q) for q in np.nanquantile(boot, [0.05, 0.95])]


def ndcg(scores: list[np.ndarray], lists: list[RankList]) -> float:
    vals = []
    for s, x in zip(scores, lists):
        if x.labels.sum() == 0:
            continue
        order = np.argsort(-s, kind="stable")
        disc = 1.0 / np.log2(np.arange(2, len(s) + 2))
        ideal = np.sort(x.labels)[::-1]
        vals.append(float((x.labels[order] * disc).sum() / (ideal * disc).sum()))
    return float(np.mean(vals)) if vals else float("nan")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(probs, edges) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(probs[sel].mean() - labels[sel].mean())
    return float(ece)


def by_kind(scores, lists, intervals: bool = False) -> dict[str, float]:
    """Top-1 accuracy on harmful-prompt lists and on benign-prompt lists, separately: over
    lists holding both labels (n_*), and in the paper's looser sense (*_all: every list with
    an acceptable candidate, so lists that cannot be wrong count as hits). `intervals`: also
    a 90% bootstrap interval over lists (top1_*_ci90)."""
    harm = [(s, x) for s, x in zip(scores, lists) if x.prompt_harmful is not False]
    benign = [(s, x) for s, x in zip(scores, lists) if x.prompt_harmful is False]
    res = {}
    for name, part in (("harmful", harm), ("benign", benign)):
        s, x = map(list, zip(*part)) if part else ([], [])
        res[f"top1_{name}"] = top1_accuracy(s, x)
        if intervals:
            res[f"top1_{name}_ci90"] = bootstrap_interval(top1_hits(s, x))
        res[f"n_{name}"] = len(trainable(x))
        res[f"top1_{name}_all"] = top1_accuracy(s, x, contrast=False)
    res["ndcg"] = ndcg(scores, lists)
    return res


def seed_mean(runs: list[dict]) -> dict:
    """Per-seed result dicts (nested) -> the mean of every number, and its standard deviation
    across seeds as `<key>_sd` (counts `n_*` are equal across seeds and get none)."""
    out: dict = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = seed_mean([r[k] for r in runs])
        elif isinstance(v, (int, float)):
            vals = np.array([r[k] for r in runs], dtype=float)
            out[k] = float(np.mean(vals))
            if not k.startswith("n_"):
                out[f"{k}_sd"] = float(np.std(vals))
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
                 / (len(pos) * len(neg)))


def gap_closed(first: float, srr: float, oracle: float) -> float:
    """The share of the first-sample-to-oracle gap in safe rate that SRR's pick closes."""
    return (srr - first) / (oracle - first) if oracle > first else float("nan")
