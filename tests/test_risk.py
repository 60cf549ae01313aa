"""The request-level risk signal's data and probe (ranker.training.risk), on the real pinned data.

Prompts are real harmful text: assertions compare counts and booleans only.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import torch

from ranker.engine import Candidate
from ranker.features import Features
from ranker.scorer import ScorerConfig, SRRScorer
from ranker.training import data, dataset, refusal, risk
from ranker.training.dataset import evaluation_prompts


@pytest.fixture(scope="module")
def kinds() -> dict[str, list[data.Prompt]]:
    return dataset.training_requests()


@pytest.fixture(scope="module")
def requests(kinds) -> list[data.Prompt]:
    return [p for ps in kinds.values() for p in ps]


def test_every_wrapper_family_wraps_benign_and_harmful_requests_alike(kinds) -> None:
    assert len(kinds["wrapped"]) == len(kinds["wrapped-benign"]) > 0
    assert all(p.harmful for p in kinds["wrapped"]) and not any(p.harmful for p in kinds["wrapped-benign"])
    assert Counter(p.harmful for p in kinds["wild"]) == {True: dataset.WILD_PROMPTS, False: dataset.WILD_PROMPTS}
    wrapped = [p for ps in kinds.values() for p in ps if p.goal]
    assert all(p.goal in p.text for p in wrapped)
    # The same pyrit templates, request for request: the i-th benign request sits in the
    # template of the i-th harmful one.
    probe = [p.text.replace(p.goal, "") for p in kinds["wrapped"]]
    assert probe == [p.text.replace(p.goal, "") for p in kinds["wrapped-benign"]]


def test_each_kind_holds_harmful_and_benign_forms(kinds) -> None:
    labels = {k: {p.harmful for p in v} for k, v in kinds.items()}
    assert labels["harmful"] == labels["wrapped"] == labels["tense"] == {True}
    assert labels["benign"] == labels["wrapped-benign"] == {False}
    assert labels["wild"] == labels["adjacent"] == {True, False}


def test_a_smaller_run_trains_on_a_share_inside_a_larger_one(kinds) -> None:
    small, large = dataset.training_requests(0.1), dataset.training_requests(0.3)
    for kind, ps in kinds.items():
        texts = {p.text for p in ps}
        assert {p.text for p in small[kind]} <= {p.text for p in large[kind]} <= texts
        assert 0.03 * len(ps) <= len(small[kind]) <= 0.2 * len(ps), kind
    # A request kept plain is kept inside its wrapper too.
    assert [p.text for p in small["harmful"]] == [p.goal for p in small["wrapped"]]


def test_training_requests_hold_no_evaluation_prompt(requests) -> None:
    assert data.remove_overlap(requests, evaluation_prompts()) == requests


def test_held_out_wrappers_are_no_training_wrapper_family() -> None:
    train_t, eval_t = dataset.wild_template_split()
    assert train_t and eval_t
    assert data.remove_overlap(train_t, eval_t, threshold=0.5) == train_t


def test_held_out_sets_wrap_their_requests_in_held_out_templates() -> None:
    held = dataset.held_out_wrapped(n_advbench=20)
    assert len(held["advbench-wild"]) == 20
    assert all(p.goal and p.goal in p.text for ps in held.values() for p in ps)
    probe = "\x00probe\x00"
    train_frames = {tuple(data.wrap(t, probe).split(probe)) for t in dataset.wild_template_split()[0]}
    for p in held["advbench-wild"] + held["xstest-safe-wild"]:
        assert tuple(p.text.split(p.goal)) not in train_frames


def test_threshold_flags_at_most_the_budget_of_benign_requests() -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    thr = risk.threshold_at(scores, 0.05)
    assert 0.04 <= (scores >= thr).mean() <= 0.05 + 1e-9


def test_risk_head_reads_a_harm_direction_and_ignores_a_wrapper_direction(tmp_path) -> None:
    """Synthetic states: harm along one axis, being wrapped along another, on both sides.
    The head fitted on such form-matched pools flags wrapped harm and passes wrapped benign
    requests, and survives a save and load with the scorer."""
    rng = np.random.default_rng(0)

    def pools(n, harmful, wrapped):
        x = rng.normal(size=(n, 8)) + 2.0 * np.eye(8)[0] * harmful + 3.0 * np.eye(8)[1] * wrapped
        return {f"{harmful}{wrapped}{i}": [Candidate(0, "", [], None, Features([3], x[i:i + 1], x[i:i + 1], x[i:i + 1], 0))]
                for i in range(n)}

    def cases(n):
        return {"harmful": pools(n, True, False), "wrapped": pools(n, True, True),
                "benign": {**pools(n, False, False), **pools(n, False, True)}}

    model = SRRScorer(ScorerConfig(base_model="m", layers=[3], pooling="mean", hidden_size=8))
    res = risk.fit_head(model, risk.instruction_rows(model, cases(300)), risk.instruction_rows(model, cases(100)))
    assert res["val_auroc"] > 0.9 and res["val_flagged_benign"] <= 0.05 + 1e-9
    test = cases(200)
    x = {k: torch.from_numpy(risk.instruction_rows(model, {k: v})[0]) for k, v in test.items()}
    flags = {k: (model.risk_probability(v) >= model.config.risk_threshold).float().mean().item()
             for k, v in x.items()}
    assert flags["wrapped"] > 0.6 and flags["harmful"] > 0.6 and flags["benign"] < 0.1
    model.save_pretrained(tmp_path / "s")
    again = SRRScorer.from_pretrained(tmp_path / "s")
    assert torch.equal(again.risk_probability(x["wrapped"]), model.risk_probability(x["wrapped"]))


def test_on_a_request_judged_benign_a_refusal_ranks_below_every_answer(tmp_path) -> None:
    """Synthetic states: harm along axis 0 of the instruction, refusing along axis 1 of a
    candidate. Heads fitted on such rows demote the refusals of a request judged benign with
    confidence below every answer, whatever the scorer's own scores, and leave a request
    judged harmful as the scorer ranks it; both survive a save and load."""
    rng = np.random.default_rng(0)
    model = SRRScorer(ScorerConfig(base_model="m", layers=[3], pooling="mean", hidden_size=8))

    def rows(n, axis):
        y = rng.random(n) < 0.5
        return (rng.normal(size=(n, 8)) + 3.0 * np.eye(8)[axis] * y[:, None]).astype(np.float32), y.astype(float)

    res = risk.fit_head(model, rows(400, 0), rows(400, 0))
    assert res["val_auroc"] > 0.9 and res["val_sure_harmful"] <= risk.MAX_PASSED_HARMFUL + 1e-9
    assert model.config.benign_below <= model.config.risk_threshold
    fit = refusal.fit_head(model, rows(400, 1), rows(200, 1))
    assert fit["val_auroc"] > 0.9 and fit["val_accuracy"] > 0.8
    cands = torch.zeros(1, 6, 8)
    cands[0, :3, 1] = 4.0  # candidates 0-2 refuse, 3-5 answer
    benign, harmful = torch.zeros(1, 8), torch.zeros(1, 8)
    benign[0, 0], harmful[0, 0] = -4.0, 4.0
    for again in (model, None):
        if again is None:
            model.save_pretrained(tmp_path / "s")
            again = SRRScorer.from_pretrained(tmp_path / "s")
        again.eval()
        scores, probs, p_harm = again.judge(benign, cands)
        plain = again(benign, cands)
        assert p_harm.item() < again.config.benign_below
        assert torch.allclose(scores[0, :3], plain[0, :3] - 2.0 / again.config.tau)
        assert torch.allclose(scores[0, 3:], plain[0, 3:])
        assert scores[0, :3].max() < scores[0, 3:].min() and probs[0, :3].max() < probs[0, 3:].min()
        scores, _, p_harm = again.judge(harmful, cands)
        assert again.judged_harmful(p_harm).item() and torch.allclose(scores, again(harmful, cands))
