"""Listwise training of the SRR scorer, Platt calibration, and the threshold choice.

A list is one instruction with K candidates labelled 1 (acceptable: safe on a harmful prompt,
helpful on a benign one) or 0. Target p* is uniform over the acceptable candidates; the loss
is KL(p* || softmax(scores)) (method.md). Lists need at least one of each label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ranker.scorer import ScorerConfig, SRRScorer


@dataclass
class RankList:
    instruction: np.ndarray  # [D]
    candidates: np.ndarray  # [K, D]
    labels: np.ndarray  # [K], 1 = acceptable
    group: str = ""  # source / prompt kind, for reporting
    prompt_harmful: bool | None = None
    prompt: str = ""


def batch_tensors(lists: list[RankList]):
    k = max(len(x.labels) for x in lists)
    d = lists[0].instruction.shape[0]
    instr = torch.zeros(len(lists), d)
    cands = torch.zeros(len(lists), k, d)
    labels = torch.zeros(len(lists), k)
    mask = torch.zeros(len(lists), k, dtype=torch.bool)
    for i, x in enumerate(lists):
        n = len(x.labels)
        instr[i] = torch.from_numpy(x.instruction)
        cands[i, :n] = torch.from_numpy(x.candidates)
        labels[i, :n] = torch.from_numpy(x.labels.astype(np.float32))
        mask[i, :n] = True
    return instr, cands, labels, mask


def listwise_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    target = labels * mask
    target = target / target.sum(dim=1, keepdim=True).clamp(min=1e-9)
    logp = F.log_softmax(scores.masked_fill(~mask, -1e9), dim=1)
    return -(target * logp).sum(dim=1).mean()  # KL up to the target's constant entropy


def trainable(lists: list[RankList]) -> list[RankList]:
    return [x for x in lists if 0 < x.labels.sum() < len(x.labels)]


def feature_stats(lists: list[RankList]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.concatenate([np.stack([x.instruction for x in lists])] +
                          [x.candidates for x in lists])
    return torch.from_numpy(rows.mean(0)), torch.from_numpy(rows.std(0) + 1e-3)


def train(config: ScorerConfig, train_lists: list[RankList], *, epochs: int = 30,
          batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-4,
          seed: int = 0, progress: bool = True, model_cls: type = SRRScorer,
          pointwise: float = 0.0) -> SRRScorer:
    """Listwise KL; `pointwise` > 0 adds that weight of a per-candidate logistic loss on
    a * score + b (a, b learned alongside). The listwise loss alone is blind to a shift of a
    whole list's scores, yet the fallback threshold compares scores across prompts: the
    pointwise term ties the score's absolute level to "acceptable" for every prompt."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    lists = trainable(train_lists)
    model = model_cls(config)
    model.feat_mean, model.feat_std = feature_stats(lists)
    ab = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    opt = torch.optim.AdamW([*model.parameters(), ab], lr=lr, weight_decay=weight_decay)
    order = list(range(len(lists)))
    bar = tqdm(range(epochs), desc="train", disable=not progress)
    for _ in bar:
        model.train()
        random.shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch_size):
            instr, cands, labels, mask = batch_tensors([lists[i] for i in order[start:start + batch_size]])
            scores = model(instr, cands, mask)
            loss = listwise_loss(scores, labels, mask)
            if pointwise:
                logits = ab[0] * scores[mask] + ab[1]
                loss = loss + pointwise * F.binary_cross_entropy_with_logits(logits, labels[mask])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            opt.step()
            total += loss.item() * len(instr)
        bar.set_postfix(loss=f"{total / len(order):.4f}")
    return model.eval()


@torch.no_grad()
def predict(model: SRRScorer, lists: list[RankList], batch_size: int = 256) -> list[np.ndarray]:
    model.eval()
    out = []
    for start in range(0, len(lists), batch_size):
        part = lists[start:start + batch_size]
        instr, cands, _, mask = batch_tensors(part)
        scores = model(instr, cands, mask)
        out += [scores[i, : len(x.labels)].numpy() for i, x in enumerate(part)]
    return out


def fit_calibration(scores: list[np.ndarray], lists: list[RankList]) -> tuple[float, float]:
    """Platt scaling: P(acceptable) = sigmoid(a * score + b), fitted on held-out candidates."""
    s = torch.from_numpy(np.concatenate(scores)).float()
    y = torch.from_numpy(np.concatenate([x.labels for x in lists])).float()
    ab = torch.tensor([1.0, 0.0], requires_grad=True)
    opt = torch.optim.LBFGS([ab], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ab[0] * s + ab[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(ab[0]), float(ab[1])


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
