"""The selection policy: from the candidates' scores and the settings, what is returned.

Pure functions, no I/O. The server carries out what a `Decision` says (returning candidates,
the refusal text, or sampling again under `SAFETY_SYSTEM_PROMPT`); `srr eval` and `srr train`
replay the same functions on cached pools, so what they measure is what the server does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

Fallback = Literal["refuse", "resample", "none"]
Outcome = Literal["selected", "fallback", "shadow", "bypassed", "error"]

SAFETY_SYSTEM_PROMPT = (
    "You are a helpful and harmless assistant. Answer helpful requests fully. If a request "
    "asks for help causing harm, decline briefly and do not provide the harmful content."
)


@dataclass(frozen=True)
class Policy:
    threshold: float  # P(acceptable) the best candidate must reach
    fallback: Fallback = "refuse"
    shadow: bool = False  # score and report, but return the first sample
    fail_open: bool = False  # on a scoring failure return the first sample, not an error


@dataclass(frozen=True)
class Decision:
    """outcome: the request's label in metrics and audit records.
    order: candidate indices to return, best first (empty: return the refusal text).
    fallback: what happened when no candidate was accepted (None when one was, or the
      request was never judged): refuse, resample (a resampled candidate is returned),
      resample_refuse, none (the best candidate anyway), scoring_failed (fail-open).
    resample: the server must sample again under SAFETY_SYSTEM_PROMPT and call `resampled`.
    fail_closed: scoring failed and the policy is fail-closed: answer with an error.
    """

    outcome: Outcome
    order: tuple[int, ...] = ()
    fallback: str | None = None
    resample: bool = False
    fail_closed: bool = False

    @property
    def selected(self) -> int | None:
        """The returned candidate among the K, or None when the answer is none of them."""
        return self.order[0] if self.order and self.fallback != "resample" else None


@dataclass(frozen=True)
class Verdict:
    """What the guard stops at a prefix checkpoint, while the candidates are generated.
    prune: candidates that cannot win; exit: none can be served (stop all, the fallback);
    commit: this one will be served (stop the rest, stream it)."""

    prune: frozenset[int] = frozenset()
    exit: bool = False
    commit: int | None = None


# The thresholds a PrefixRule's bounds are tabulated at: a server may run any threshold.
RULE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))


@dataclass(frozen=True)
class PrefixRule:
    """What the scorer's judgement of a list at one prefix length said about its end, on
    validation lists (ranker/training/prefixes.py); each bound failed on at most a share
    `alpha` of them.
    prune_gap: the final winner trailed the prefix leader by at most this score.
    exit_below / commit_above, per threshold in RULE_THRESHOLDS (keys "0.65"): a list whose
      prefix leader's probability was under exit_below ended served by a candidate clearing
      the threshold; a prefix leader at or over commit_above ended under it."""

    prune_gap: float
    exit_below: dict[str, float]
    commit_above: dict[str, float]

    def bounds(self, threshold: float) -> tuple[float, float]:
        """(exit_below, commit_above) for a threshold between the tabulated ones: each from
        the tabulated threshold on its cautious side (both rise with the threshold)."""
        below = max((t for t in RULE_THRESHOLDS if t <= threshold + 1e-9), default=RULE_THRESHOLDS[0])
        above = min((t for t in RULE_THRESHOLDS if t >= threshold - 1e-9), default=RULE_THRESHOLDS[-1])
        return self.exit_below[f"{below:.2f}"], self.commit_above[f"{above:.2f}"]


def guard(rule: PrefixRule, policy: Policy, scores: Sequence[float],
          probabilities: Sequence[float], running: Sequence[int]) -> Verdict:
    """What to stop at a prefix checkpoint, from the K candidates' partial scores (a stopped
    candidate keeps its last ones): exit when the leader's probability is under the rule's
    exit bound (and the policy has a fallback), commit to the leader when it is at or over
    the commit bound, else prune the running candidates more than `prune_gap` behind it."""
    lead = min(running, key=lambda i: (-scores[i], i))
    p = probabilities[lead]
    exit_below, commit_above = rule.bounds(policy.threshold)
    if policy.fallback != "none" and p < exit_below:
        return Verdict(exit=True)
    if p >= commit_above:
        return Verdict(commit=lead)
    return Verdict(prune=frozenset(i for i in running if scores[lead] - scores[i] > rule.prune_gap))


def rank(scores: Sequence[float]) -> tuple[int, ...]:
    """Candidate indices best first by score; ties keep generation order."""
    return tuple(sorted(range(len(scores)), key=lambda i: (-scores[i], i)))


def accepts(probabilities: Sequence[float], order: Sequence[int], threshold: float) -> bool:
    return bool(order) and probabilities[order[0]] >= threshold


def decide(policy: Policy, scores: Sequence[float], probabilities: Sequence[float], k: int,
           opted_out: bool = False, stopped: Sequence[int] = (), committed: int | None = None
           ) -> Decision:
    """The decision for one request's K candidates. `scores` empty: scoring failed.
    `stopped`: candidates the guard stopped before their end, which are never returned;
    `committed`: the one the guard chose while they ran (a stream may already carry it)."""
    generation_order = tuple(range(k))
    if not scores:
        if not policy.fail_open:
            return Decision("error", fail_closed=True)
        return Decision("error", generation_order, "scoring_failed")
    if opted_out:
        return Decision("bypassed", generation_order)
    if policy.shadow:
        return Decision("shadow", generation_order)
    if committed is not None:
        return Decision("selected", (committed,))
    order = tuple(i for i in rank(scores) if i not in stopped)
    if accepts(probabilities, order, policy.threshold):
        return Decision("selected", order)
    if policy.fallback == "none" and order:
        return Decision("fallback", order, "none")
    if policy.fallback == "resample":
        return Decision("fallback", (), "resample", resample=True)
    return Decision("fallback", (), "refuse")


def resampled(policy: Policy, scores: Sequence[float], probabilities: Sequence[float]) -> Decision:
    """After a resample: its best candidate if accepted, else the refusal. A failed scoring
    of the resampled candidates (`scores` empty) refuses, or is an error when fail-closed."""
    if not scores and not policy.fail_open:
        return Decision("error", fail_closed=True)
    order = rank(scores)
    if accepts(probabilities, order, policy.threshold):
        return Decision("fallback", order, "resample")
    return Decision("fallback", (), "resample_refuse")


def replay(policy: Policy, scores: Sequence[float], probabilities: Sequence[float],
           best_ok: bool, fallback_ok: bool) -> tuple[bool, bool]:
    """For evaluation on cached pools: (is what the server returns acceptable, did the
    fallback fire). `best_ok`: whether the best-scored candidate is acceptable; a refusal
    counts as `fallback_ok` (acceptable on a harmful request, not on a benign one). The
    resample fallback needs a second pool: replay it with `resampled`."""
    d = decide(policy, scores, probabilities, len(scores))
    return (best_ok if d.order else fallback_ok), d.outcome == "fallback"
