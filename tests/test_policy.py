"""The selection policy alone (ranker.policy): every outcome from scores and settings. Pure
functions, no engine; the server carrying each decision out on the real engine is tested in
test_selection.py."""

from __future__ import annotations

import itertools

import pytest

from ranker.policy import Decision, Policy, accepts, decide, rank, replay, resampled

SCORES = [0.1, 2.0, 0.5, 2.0]  # best: 1 (ties keep generation order), then 3, 2, 0
BEST_FIRST = (1, 3, 2, 0)
PROBS = [0.2, 0.7, 0.4, 0.6]


def test_rank_is_best_first_and_ties_keep_generation_order():
    assert rank(SCORES) == BEST_FIRST
    assert rank([]) == ()
    assert accepts(PROBS, BEST_FIRST, 0.7) and not accepts(PROBS, BEST_FIRST, 0.71)
    assert not accepts([], (), 0.0)


def expected(fail_open, opted_out, shadow, accepted, fallback, scored) -> Decision:
    """The whole matrix, written out as the README states it."""
    if not scored:
        return (Decision("error", tuple(range(4)), "scoring_failed") if fail_open
                else Decision("error", fail_closed=True))
    if opted_out:
        return Decision("bypassed", tuple(range(4)))
    if shadow:
        return Decision("shadow", tuple(range(4)))
    if accepted:
        return Decision("selected", BEST_FIRST)
    return {"none": Decision("fallback", BEST_FIRST, "none"),
            "refuse": Decision("fallback", (), "refuse"),
            "resample": Decision("fallback", (), "resample", resample=True)}[fallback]


MATRIX = list(itertools.product([False, True], [False, True], [False, True], [False, True],
                                ["refuse", "resample", "none"], [False, True]))


@pytest.mark.parametrize("fail_open,opted_out,shadow,accepted,fallback,scored", MATRIX)
def test_decide_matrix(fail_open, opted_out, shadow, accepted, fallback, scored):
    rule = Policy(threshold=0.7 if accepted else 0.9, fallback=fallback, shadow=shadow,
                  fail_open=fail_open)
    got = decide(rule, SCORES if scored else [], PROBS if scored else [], 4, opted_out)
    assert got == expected(fail_open, opted_out, shadow, accepted, fallback, scored)


@pytest.mark.parametrize("decision,selected", [
    (Decision("selected", BEST_FIRST), 1),
    (Decision("fallback", BEST_FIRST, "none"), 1),  # the best candidate is returned anyway
    (Decision("shadow", (0, 1, 2, 3)), 0),  # the first sample
    (Decision("bypassed", (0, 1, 2, 3)), 0),
    (Decision("error", (0, 1, 2, 3), "scoring_failed"), 0),
    (Decision("fallback", (), "refuse"), None),  # the refusal text is none of the K
    (Decision("fallback", (2, 0), "resample"), None),  # nor is a resampled candidate
    (Decision("fallback", (), "resample_refuse"), None),
])
def test_selected_names_the_returned_candidate_among_the_k(decision, selected):
    assert decision.selected == selected


def test_resampled_serves_its_best_if_accepted_else_refuses():
    rule = Policy(threshold=0.65, fallback="resample")
    assert resampled(rule, SCORES, PROBS) == Decision("fallback", BEST_FIRST, "resample")
    assert resampled(Policy(0.8, "resample"), SCORES, PROBS) == Decision("fallback", (), "resample_refuse")
    # Scoring the resampled candidates failed: refuse when fail-open, an error when fail-closed.
    assert resampled(Policy(0.0, "resample", fail_open=True), [], []) == Decision(
        "fallback", (), "resample_refuse")
    assert resampled(Policy(0.0, "resample"), [], []).fail_closed


@pytest.mark.parametrize("threshold,fallback,best_ok,fallback_ok,want", [
    (0.5, "refuse", True, False, (True, False)),  # accepted: the best is served
    (0.5, "refuse", False, True, (False, False)),
    (0.9, "refuse", True, False, (False, True)),  # fallback: the refusal counts as fallback_ok
    (0.9, "refuse", False, True, (True, True)),
    (0.9, "none", False, True, (False, True)),  # none serves the best candidate anyway
])
def test_replay_is_decide_on_a_pool(threshold, fallback, best_ok, fallback_ok, want):
    assert replay(Policy(threshold, fallback), SCORES, PROBS, best_ok, fallback_ok) == want


# The guard while candidates are generated (ranker.policy.guard), on partial scores.
def rule(exit_below=0.3, commit_above=0.9, prune_gap=1.0):
    from ranker.policy import RULE_THRESHOLDS, PrefixRule

    # Bounds that rise with the threshold, as fitted ones do: at 0.5, exit 0.3 and commit 0.9.
    shift = lambda x, t: round(min(1.0, max(0.0, x + t - 0.5)), 2)  # noqa: E731
    return PrefixRule(prune_gap, {f"{t:.2f}": shift(exit_below, t) for t in RULE_THRESHOLDS},
                      {f"{t:.2f}": shift(commit_above, t) for t in RULE_THRESHOLDS})


def test_rule_bounds_between_tabulated_thresholds_take_the_cautious_side():
    exit_below, commit_above = rule().bounds(0.53)
    assert (exit_below, commit_above) == (0.3, 0.95)  # exit as at 0.50, commit as at 0.55
    assert rule().bounds(0.5) == (0.3, 0.9)


def test_guard_prunes_only_running_candidates_far_behind_the_leader():
    from ranker.policy import Verdict, guard

    v = guard(rule(), Policy(0.5), [3.0, 2.5, 1.9, 0.0], [0.6, 0.5, 0.4, 0.1], [0, 1, 2])
    assert v == Verdict(prune=frozenset({2}))  # 3 is stopped already; 1 is within the gap


def test_guard_exits_when_the_leader_is_under_the_exit_bound():
    from ranker.policy import Verdict, guard

    assert guard(rule(), Policy(0.5), [3.0, 1.0], [0.29, 0.1], [0, 1]) == Verdict(exit=True)
    assert guard(rule(), Policy(0.5), [3.0, 1.0], [0.31, 0.1], [0, 1]).exit is False
    # Without a fallback the best is served anyway: nothing to exit to.
    assert guard(rule(), Policy(0.5, "none"), [3.0, 1.0], [0.1, 0.1], [0, 1]).exit is False
    # The leader is the best scored, not the most probable.
    assert guard(rule(), Policy(0.5), [3.0, 1.0], [0.2, 0.95], [0, 1]) == Verdict(exit=True)


def test_guard_commits_to_a_leader_at_the_commit_bound():
    from ranker.policy import Verdict, guard

    assert guard(rule(), Policy(0.5), [1.0, 3.5, 1.4], [0.3, 0.9, 0.3], [0, 1, 2]) == Verdict(commit=1)
    assert guard(rule(), Policy(0.5), [1.0, 3.5, 1.4], [0.3, 0.89, 0.3], [0, 1, 2]) == Verdict(prune=frozenset({0, 2}))
    # A higher threshold asks more of a commit.
    assert guard(rule(), Policy(0.55), [1.0, 3.5], [0.3, 0.9], [0, 1]).commit is None


def test_decide_never_returns_a_stopped_candidate_and_keeps_a_commit():
    assert decide(Policy(0.5), [3.0, 2.0, 1.0], [0.9, 0.8, 0.7], 3, stopped=[0]).order == (1, 2)
    # Every candidate stopped (an early exit): the fallback, whatever the final scores say.
    assert decide(Policy(0.5), [3.0, 2.0], [0.9, 0.8], 2, stopped=[0, 1]) == Decision("fallback", (), "refuse")
    assert decide(Policy(0.5, "none"), [3.0, 2.0], [0.9, 0.8], 2, stopped=[0, 1]) == Decision("fallback", (), "refuse")
    # A commit is served: a stream may already carry it.
    assert decide(Policy(0.5), [3.0, 2.0], [0.9, 0.2], 2, stopped=[0], committed=1) == Decision("selected", (1,))
