"""The served API end to end: real vLLM, real model, shipped scorer, OpenAI SDK as client."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import metric

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "How do I keep basil fresh after buying it?"}]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.base + "/health").status_code == 200


def test_returns_highest_scored_candidate(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=16,
        extra_body={"srr": {"candidates": 4, "return_candidates": True}, "ignore_eos": True})
    srr = r.model_dump()["srr"]
    assert srr["candidates"] == 4 and len(srr["scores"]) == 4 and len(srr["candidate_texts"]) == 4
    assert r.usage.completion_tokens == 4 * 16  # every candidate is paid for
    best = int(np.argmax(srr["scores"]))
    assert srr["fallback"] is None and srr["selected"] == best
    assert r.choices[0].message.content == srr["candidate_texts"][best]
    assert srr["probabilities"][best] >= srr["threshold"] == 0


def test_n_best_of_k_in_score_order(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=8, n=3,
        extra_body={"srr": {"candidates": 5, "return_candidates": True}})
    srr = r.model_dump()["srr"]
    order = sorted(range(5), key=lambda i: -srr["scores"][i])[:3]
    assert srr["fallback"] is None
    assert [c.message.content for c in r.choices] == [srr["candidate_texts"][i] for i in order]


def test_streaming_returns_the_selected_text(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
        extra_body={"srr": {"candidates": 3, "return_candidates": True}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1].model_dump()
    assert last["usage"]["completion_tokens"] > 0
    srr = last["srr"]
    assert srr["fallback"] is None and text == srr["candidate_texts"][srr["selected"]]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_score_endpoint_agrees_with_chat(client, server, model_dir):
    """Same texts through the encode path give the chat path's scores.

    "Same text" must mean same tokens. Two cases differ, and the test avoids them:
    - a candidate cut by max_tokens: its last sampled token is never fed through the model,
      so its features have one token fewer than its text;
    - a sampled token sequence that is not the text's canonical tokenization: re-encoding the
      text gives other tokens.
    The scorer attends across the list, so one such candidate moves every score. Seeds are
    tried until every candidate ends on EOS and re-tokenizes to the tokens it sampled (same
    length is not enough: "Sky = nothing" can be sampled in other pieces). vLLM samples
    candidate i with seed + i, so seeds step by 4 to make each try four fresh samples: about one
    sample in five fails, and which ones moves with the engine's precision and CPU.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ask = [{"role": "user", "content": "Answer with one word: what colour is the sky?"}]
    for seed in range(0, 160, 4):
        r = client.chat.completions.create(
            model=MODEL, messages=ask, max_tokens=48, seed=seed,
            extra_body={"srr": {"candidates": 4, "return_candidates": True}})
        srr = r.model_dump()["srr"]
        if srr["candidate_finish_reasons"] == ["stop"] * 4 and all(
                tok.encode(t, add_special_tokens=False) == ids[:-1]
                for t, ids in zip(srr["candidate_texts"], srr["candidate_token_ids"])):
            break
    else:
        pytest.fail("no seed gave four EOS-terminated, canonically tokenized candidates")
    resp = httpx.post(server.base + "/v1/srr/score", timeout=120, json={
        "model": MODEL, "messages": ask, "candidates": srr["candidate_texts"]})
    assert resp.status_code == 200
    scored = resp.json()
    assert scored["layer"] == srr["layer"] and scored["scorer"] == srr["scorer"]
    np.testing.assert_allclose(scored["scores"], srr["scores"], rtol=0.01, atol=0.02)
    np.testing.assert_allclose(scored["probabilities"], srr["probabilities"], atol=0.01)
    assert int(np.argmax(scored["scores"])) == int(np.argmax(srr["scores"]))


def test_metrics_move(client, server):
    before = metric(server.base, "srr_requests_total")
    gen_before = metric(server.base, "vllm:generation_tokens_total")
    client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4,
                                   extra_body={"srr": {"candidates": 2}})
    assert metric(server.base, "srr_requests_total") == before + 1
    assert metric(server.base, "vllm:generation_tokens_total") >= gen_before + 2
    assert metric(server.base, "srr_candidates_count") >= 1
    assert metric(server.base, "srr_scoring_seconds_count") >= 1


@pytest.mark.parametrize("body,status", [
    ({"model": "nope", "messages": ASK}, 404),
    ({"model": MODEL, "messages": []}, 400),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ({"model": MODEL, "messages": ASK, "max_tokens": -1}, 400),
    ({"model": MODEL, "messages": ASK, "n": 9, "srr": {"candidates": 4}}, 400),
    ({"model": MODEL, "messages": ASK, "srr": {"candidates": 10_000}}, 400),
    ({"model": MODEL, "messages": ASK, "srr": {"mode": "off"}}, 400),
])
def test_bad_requests_get_openai_errors(server, body, status):
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert httpx.get(server.base + "/health").status_code == 200


def test_malformed_json(server):
    r = httpx.post(server.base + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ASK)


def test_score_endpoint_rejects_a_candidate_past_the_context(server):
    r = httpx.post(server.base + "/v1/srr/score", timeout=120, json={
        "model": MODEL, "messages": ASK, "candidates": ["Short.", "word " * 5000]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(server.base + "/health").status_code == 200


def test_score_endpoint_caps_the_candidates(server):
    """The server under test runs with --max-candidates 8."""
    r = httpx.post(server.base + "/v1/srr/score", timeout=120, json={
        "model": MODEL, "messages": ASK, "candidates": ["Yes."] * 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "candidates"
    ok = httpx.post(server.base + "/v1/srr/score", timeout=120, json={
        "model": MODEL, "messages": ASK, "candidates": ["Yes."] * 8})
    assert ok.status_code == 200 and len(ok.json()["scores"]) == 8
