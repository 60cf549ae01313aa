"""What the scorer reads: per candidate, pooled residual-stream states at chosen layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Pooling = Literal["mean", "last"]


@dataclass
class Features:
    """Pooled states of one (prompt, response) pair, float32, shape [len(layers), width].

    instruction: the row at the last prompt token (end of the assistant header).
    mean / last: mean over the response rows / the last response row (see ranker.capture
    for which rows count; an empty response pools to the instruction row).
    """

    layers: list[int]
    instruction: np.ndarray
    mean: np.ndarray
    last: np.ndarray
    response_rows: int

    def select(self, layers: list[int], pooling: Pooling) -> tuple[np.ndarray, np.ndarray]:
        """(instruction, response) vectors for the scorer: layers concatenated."""
        idx = [self.layers.index(layer) for layer in layers]
        resp = self.mean if pooling == "mean" else self.last
        return self.instruction[idx].reshape(-1), resp[idx].reshape(-1)
