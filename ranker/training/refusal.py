"""The candidate-level refusal signal: P(a candidate refuses), read by the scorer's refusal
head from the candidate's pooled states (the vector the scorer already receives).

With the risk head it carries the policy's second rule (`SRRScorer.judge`): on a request
judged benign with confidence, a refusal must lose to a helpful answer. A scorer alone can
rank refusals first on benign requests that sound harmful (Qwen's 0.8.0 did on XSTest).
Fitted on the training split's responses, labelled by the refusal judge (generated
candidates and prefilled refusals) or by their source.
"""

from __future__ import annotations

import numpy as np
import torch

from ranker.training.risk import linear_head
from ranker.training.stats import auroc

THRESHOLD = 0.5  # P(refusal) from which a candidate is judged a refusal


def fit_head(model, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
             l2: float = 1e-2) -> dict:
    """Give `model` a refusal head fitted on (candidate vectors, refusal labels); returns what
    it measured on the validation ones."""
    model.refusal = linear_head(model, *train, l2)
    model.config.refusal_threshold = THRESHOLD
    xv, yv = val
    with torch.no_grad():
        judged = model.refusal_probability(torch.from_numpy(xv)).numpy()
    hit = judged >= THRESHOLD
    return {"val_auroc": auroc(judged, yv), "val_accuracy": float(np.mean(hit == (yv == 1))),
            "val_refusals_caught": float(hit[yv == 1].mean()),
            "val_answers_flagged": float(hit[yv == 0].mean()),
            "n_train": len(train[1]), "n_val": len(yv)}
