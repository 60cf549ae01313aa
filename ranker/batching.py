"""Scoring batched across concurrent requests.

Candidates of concurrent requests often finish in the same engine step, so their score
calls arrive in the same event-loop turn. Each call queues its list and the first schedules
one padded forward for everything queued by then (`call_soon`), instead of one forward each.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from ranker.features import pad
from ranker.scorer import SRRScorer


class BatchScorer:
    def __init__(self, scorer: SRRScorer):
        self.scorer = scorer.eval()
        self.pending: dict[bool, list[tuple[np.ndarray, np.ndarray, asyncio.Future]]] = {False: [], True: []}
        self.batches = 0  # forwards run, for tests and metrics

    async def score(self, instruction: np.ndarray, candidates: np.ndarray, partial: bool = False
                    ) -> tuple[list[float], list[float], float | None]:
        """(scores, probabilities, the request's risk or None without a risk head).
        `partial`: the candidates are partial responses (see SRRScorer.forward)."""
        fut = asyncio.get_running_loop().create_future()
        self.pending[partial].append((instruction, candidates, fut))
        if len(self.pending[partial]) == 1:
            asyncio.get_running_loop().call_soon(self._run, partial)
        return await fut

    @torch.no_grad()
    def _run(self, partial: bool) -> None:
        batch, self.pending[partial] = self.pending[partial], []
        try:
            instr, cands, mask = pad([(i, c) for i, c, _ in batch])
            scores, probs, risk = self.scorer.judge(instr, cands, mask, partial)
            self.batches += 1
        except Exception as e:  # noqa: BLE001 - every waiter gets the failure
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for b, (_, c, fut) in enumerate(batch):
            if not fut.done():
                fut.set_result((scores[b, : len(c)].tolist(), probs[b, : len(c)].tolist(),
                                None if risk is None else float(risk[b])))
