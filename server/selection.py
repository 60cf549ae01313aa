"""Selection policy: which candidates to return, and what to do when none is acceptable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    order: list[int]  # candidate indices, best first
    accepted: bool  # the best candidate clears the threshold


def rank(scores: list[float], probabilities: list[float], threshold: float) -> Decision:
    """Best first by score (ties keep generation order); accept if the best clears the threshold."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return Decision(order=order, accepted=bool(order) and probabilities[order[0]] >= threshold)
