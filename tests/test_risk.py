"""The request-level risk signal's data and probe (ranker.training.risk), on the real pinned data.

Prompts are real harmful text: assertions compare counts and booleans only.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ranker.features import Features
from ranker.training import data, risk
from ranker.training.dataset import evaluation_prompts
from ranker.training.store import FeatureStore, pair_key


@pytest.fixture(scope="module")
def requests() -> list[data.Prompt]:
    return risk.training_requests()


def test_every_wrapper_family_wraps_benign_and_harmful_requests_alike(requests) -> None:
    wrapped = Counter((p.source.split("/")[0], p.harmful) for p in requests if p.goal)
    for family in ("pyrit", "wild"):
        assert wrapped[(family, True)] == wrapped[(family, False)] > 0
    assert all(p.goal in p.text for p in requests if p.goal)


def test_training_requests_hold_no_evaluation_prompt(requests) -> None:
    assert data.remove_overlap(requests, evaluation_prompts()) == requests


def test_held_out_wrappers_are_no_training_wrapper_family() -> None:
    train_t, eval_t = risk.wild_template_split()
    assert train_t and eval_t
    assert data.remove_overlap(train_t, eval_t, threshold=0.5) == train_t


def test_held_out_sets_wrap_their_requests_in_held_out_templates() -> None:
    held = risk.evaluation_requests(n_advbench=20)
    assert {len(held[k]) for k in ("advbench", "advbench-pyrit-heldout", "advbench-wild-heldout")} == {20}
    train_t = risk.wild_template_split()[0]
    probe = "\x00probe\x00"
    train_frames = {tuple(data.wrap(t, probe).split(probe)) for t in train_t}
    for p in held["advbench-wild-heldout"] + held["xstest-safe-wild-heldout"]:
        assert tuple(p.text.split(p.goal)) not in train_frames


def test_threshold_flags_at_most_the_budget_of_benign_requests() -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    thr = risk.threshold_at(scores, 0.05)
    assert 0.04 <= (scores >= thr).mean() <= 0.05 + 1e-9


def test_study_reads_a_harm_direction_and_ignores_a_wrapper_direction(tmp_path) -> None:
    """Synthetic states: harm along one axis, being wrapped along another (on both sides). A
    probe fitted on form-matched requests flags wrapped harm and passes wrapped benign."""
    rng = np.random.default_rng(0)
    store = FeatureStore(tmp_path / "s.npz", [3])

    def prompts(n, harmful, wrapped, tag):
        out = []
        for i in range(n):
            p = data.Prompt("t", f"{tag} {i}", harmful, None, goal=f"req {tag} {i}" if wrapped else None)
            x = rng.normal(size=(1, 8)) + 2.0 * np.eye(8)[0] * harmful + 3.0 * np.eye(8)[1] * wrapped
            store.put(pair_key(p.text, ""), Features([3], x, x, x, 0))
            out.append(p)
        return out

    train = (prompts(200, True, False, "h") + prompts(200, False, False, "b")
             + prompts(200, True, True, "wh") + prompts(200, False, True, "wb"))
    held = {"xstest": prompts(50, True, False, "xu") + prompts(50, False, False, "xs"),
            "wrapped-harm": prompts(50, True, True, "ah"), "wrapped-benign": prompts(50, False, True, "ab")}
    res = risk.study(store, train, held, [3])[3]
    assert res["xstest_auroc"] > 0.9 and res["val_auroc"] > 0.9
    assert res["flagged_wrapped-harm"] > 0.7 and res["flagged_wrapped-benign"] < 0.15
    assert res["flagged_xstest-safe"] < 0.15
