"""What the scorer reads: per candidate, pooled residual-stream states at chosen layers.

One representation (`Features`) from capture to scorer: the engine returns it per candidate,
pools and the training feature store hold it, and `stack` / `pad` turn lists of it into the
scorer's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from ranker.capture import PREFIX_TOKENS

Pooling = Literal["mean", "last"]


@dataclass
class Features:
    """Pooled states of one (prompt, response) pair, shape [len(layers), width].

    instruction: the row at the last prompt token (end of the assistant header).
    mean / last: mean over the response rows / the last response row (see ranker.capture
    for which rows count; an empty response pools to the instruction row).
    prefixes: [len(PREFIX_TOKENS), layers, width], the mean over the first t response rows
      for each t in ranker.capture.PREFIX_TOKENS (the full mean for a shorter response);
      None where not captured (features cached before 0.9.0).
    """

    layers: list[int]
    instruction: np.ndarray
    mean: np.ndarray
    last: np.ndarray
    response_rows: int
    prefixes: np.ndarray | None = None

    def at_prefix(self, j: int) -> "Features":
        """These features as they were after PREFIX_TOKENS[j] response rows (mean pooling)."""
        if self.prefixes is None:
            raise ValueError("these features were captured without prefix means")
        return Features(self.layers, self.instruction, self.prefixes[j], self.prefixes[j],
                        min(self.response_rows, PREFIX_TOKENS[j]))

    def select(self, layers: list[int], pooling: Pooling) -> tuple[np.ndarray, np.ndarray]:
        """(instruction, response) float32 vectors for the scorer: layers concatenated."""
        idx = [self.layers.index(layer) for layer in layers]
        resp = self.mean if pooling == "mean" else self.last
        f32 = lambda a: a[idx].astype(np.float32).reshape(-1)  # noqa: E731
        return f32(self.instruction), f32(resp)

    def astype(self, dtype) -> "Features":
        return Features(self.layers, self.instruction.astype(dtype), self.mean.astype(dtype),
                        self.last.astype(dtype), self.response_rows,
                        None if self.prefixes is None else self.prefixes.astype(dtype))


def stack(features: Sequence[Features], layers: list[int], pooling: Pooling
          ) -> tuple[np.ndarray, np.ndarray]:
    """One list's scorer input: the instruction vector [D] (the candidates share the prompt,
    so the first candidate's) and the candidates' vectors [K, D]."""
    pairs = [f.select(layers, pooling) for f in features]
    return pairs[0][0], np.stack([p[1] for p in pairs])


def pad(lists: Sequence[tuple[np.ndarray, np.ndarray]]
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lists of (instruction [D], candidates [K_i, D]) -> instruction [B, D], candidates
    [B, K, D] zero-padded to the longest list, mask [B, K] (True = a real candidate)."""
    k = max(len(c) for _, c in lists)
    d = lists[0][0].shape[-1]
    instr = torch.zeros(len(lists), d)
    cands = torch.zeros(len(lists), k, d)
    mask = torch.zeros(len(lists), k, dtype=torch.bool)
    for b, (i, c) in enumerate(lists):
        instr[b] = torch.from_numpy(np.asarray(i, dtype=np.float32))
        cands[b, : len(c)] = torch.from_numpy(np.asarray(c, dtype=np.float32))
        mask[b, : len(c)] = True
    return instr, cands, mask
