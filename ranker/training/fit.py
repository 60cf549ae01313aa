"""Listwise training of the SRR scorer, and its predictions on lists.

A list is one instruction with K candidates labelled 1 (acceptable: safe on a harmful prompt,
helpful on a benign one) or 0. Target p* is uniform over the acceptable candidates; the loss
is KL(p* || softmax(scores)) (the paper's listwise loss). Lists need at least one of each label.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ranker.features import pad
from ranker.scorer import ScorerConfig, SRRScorer
from ranker.training.lists import RankList, trainable


def batch_tensors(lists: list[RankList]):
    instr, cands, mask = pad([(x.instruction, x.candidates) for x in lists])
    labels = torch.zeros(mask.shape)
    for i, x in enumerate(lists):
        labels[i, : len(x.labels)] = torch.from_numpy(x.labels.astype(np.float32))
    return instr, cands, labels, mask


def listwise_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    target = labels * mask
    target = target / target.sum(dim=1, keepdim=True).clamp(min=1e-9)
    logp = F.log_softmax(scores.masked_fill(~mask, -1e9), dim=1)
    return -(target * logp).sum(dim=1).mean()  # KL up to the target's constant entropy


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
def predict(model: SRRScorer, lists: list[RankList], batch_size: int = 256,
            served: bool = False) -> list[np.ndarray]:
    """Each list's scores; `served`: as the server ranks them (`SRRScorer.judge`: with the
    risk and refusal heads), else the scorer's own."""
    model.eval()
    out = []
    for start in range(0, len(lists), batch_size):
        part = lists[start:start + batch_size]
        instr, cands, _, mask = batch_tensors(part)
        scores = model.judge(instr, cands, mask)[0] if served else model(instr, cands, mask)
        out += [scores[i, : len(x.labels)].numpy() for i, x in enumerate(part)]
    return out


