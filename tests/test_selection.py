"""The chat handler carrying out every policy outcome on the real engine (vLLM serving
SmolLM2-135M-Instruct, the shipped scorer): select, refuse, none, resample, shadow,
fail-open, fail-closed and opt-out. Thresholds are set so each outcome is certain."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.batching import BatchScorer
from ranker.scorer import ScorerConfig, SRRScorer
from server.api.config import Settings
from server.api.protocol import APIError, ChatCompletionRequest
from server.api.serving_chat import ServingChat

K, TOKENS = 3, 6
ASK = [{"role": "user", "content": "Name a fruit that is red."}]


def chat(engine, scorer, n=1, srr=None, request=None, **settings):
    handler = ServingChat(Settings(**settings), engine, scorer, BatchScorer(scorer))
    req = ChatCompletionRequest(
        model=engine.served_model_name, messages=ASK, max_tokens=TOKENS, ignore_eos=True, n=n,
        seed=7, srr={"candidates": K, "return_candidates": True, **(srr or {})}, **(request or {}))
    return engine.run(handler.create(req))


def broken_scorer(engine):
    """A scorer whose forward fails on the engine's states (wrong width): a scorer fault."""
    return SRRScorer(ScorerConfig(base_model="m", layers=engine.layers, pooling="mean",
                                  hidden_size=engine.hidden_size + 1)).eval()


def test_selected_returns_the_best_scored_candidates(engine, scorer):
    r = chat(engine, scorer, n=2, threshold=0.0)
    info = r.srr
    order = np.argsort(-np.array(info.scores), kind="stable")
    assert info.fallback is None and info.selected == order[0]
    assert [c.message.content for c in r.choices] == [info.candidate_texts[i] for i in order[:2]]
    assert r.usage.completion_tokens == K * TOKENS


def test_refuse_returns_the_refusal_text(engine, scorer):
    r = chat(engine, scorer, n=2, threshold=1.01, fallback="refuse", refusal_text="No.")
    assert r.srr.fallback == "refuse" and r.srr.selected is None and len(r.srr.scores) == K
    assert [c.message.content for c in r.choices] == ["No.", "No."]


def test_refusal_under_a_response_format_is_the_messages_refusal(engine, scorer):
    """A refusal is no valid output for a schema: it goes in message.refusal, content null,
    as OpenAI answers a refused structured request (the SDKs' parse() and LangChain read it)."""
    r = chat(engine, scorer, threshold=1.01, fallback="refuse", refusal_text="No.",
             request={"response_format": {"type": "json_object"}})
    (choice,) = r.choices
    assert (choice.message.content, choice.message.refusal) == (None, "No.")
    assert r.srr.fallback == "refuse"
    plain = chat(engine, scorer, threshold=1.01, fallback="refuse", refusal_text="No.")
    assert (plain.choices[0].message.content, plain.choices[0].message.refusal) == ("No.", None)


def test_none_returns_the_best_candidate_anyway(engine, scorer):
    r = chat(engine, scorer, threshold=1.01, fallback="none")
    best = int(np.argmax(r.srr.scores))
    assert r.srr.fallback == "none" and r.srr.selected == best
    assert r.choices[0].message.content == r.srr.candidate_texts[best]


def test_resample_that_is_refused_too(engine, scorer):
    r = chat(engine, scorer, threshold=1.01, fallback="resample", refusal_text="No.")
    assert r.srr.fallback == "resample_refuse" and r.choices[0].message.content == "No."
    assert r.usage.completion_tokens == 2 * K * TOKENS  # the resampled candidates are paid for


def test_resample_serves_the_best_resampled_candidate(engine, scorer, monkeypatch):
    """The first K are rejected (the policy's decision is forced, the policy itself is
    tested in test_policy.py); the resampled K under the safety prompt are accepted at
    threshold 0, so the best of those is served: none of the first K."""
    from ranker import policy
    from server.api import serving_generate

    monkeypatch.setattr(serving_generate.policy, "decide", lambda *a, **k: policy.Decision(
        "fallback", (), "resample", resample=True))
    generations = []  # what each generate_scored returned: the first K, then the resampled K
    real = serving_generate.ServingGenerate.generate_scored

    async def spy(self, *a, **k):
        generations.append(await real(self, *a, **k))
        return generations[-1]

    monkeypatch.setattr(serving_generate.ServingGenerate, "generate_scored", spy)
    r = chat(engine, scorer, threshold=0.0, fallback="resample")
    assert r.srr.fallback == "resample" and r.srr.selected is None
    assert r.usage.completion_tokens == 2 * K * TOKENS
    first, again = generations
    assert [c.text for c in first.generation.candidates] == r.srr.candidate_texts
    best = policy.rank(again.scores)[0]  # the policy's own order, ties included
    assert r.choices[0].message.content == again.generation.candidates[best].text


def test_shadow_scores_but_returns_the_first_sample(engine, scorer):
    r = chat(engine, scorer, threshold=1.01, shadow=True)
    assert r.srr.fallback is None and r.srr.selected == 0 and len(r.srr.scores) == K
    assert r.choices[0].message.content == r.srr.candidate_texts[0]


def test_fail_open_returns_the_first_sample_after_a_scorer_fault(engine):
    r = chat(engine, broken_scorer(engine), fail_open=True)
    assert r.srr.fallback == "scoring_failed" and r.srr.scores == [] and r.srr.selected == 0
    assert r.choices[0].message.content == r.srr.candidate_texts[0]


def test_fail_closed_answers_503_after_a_scorer_fault(engine):
    with pytest.raises(APIError) as e:
        chat(engine, broken_scorer(engine), fail_open=False)
    assert e.value.status == 503


def test_opt_out_samples_n_and_returns_them_unranked(engine, scorer):
    r = chat(engine, scorer, n=2, srr={"mode": "off"}, allow_opt_out=True, threshold=1.01)
    assert r.srr.mode == "off" and r.srr.candidates == 2 and r.srr.fallback is None
    assert [c.message.content for c in r.choices] == r.srr.candidate_texts
    assert r.usage.completion_tokens == 2 * TOKENS


def test_the_engine_leaves_the_callers_sampling_params_alone(engine):
    from vllm import SamplingParams

    params = SamplingParams(n=2, max_tokens=4, seed=1)
    before = repr(params)
    engine.run(engine.generate(engine.prompt_ids(ASK), params))
    assert repr(params) == before
