"""POST /v1/completions (the legacy text API) through the same selection as chat, on the real
server, with the OpenAI SDK and LangChain's `OpenAI` LLM."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "A short list of three fruits:"


def test_completion_returns_the_selected_candidate(client):
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, seed=1,
        extra_body={"srr": {"candidates": 3, "return_candidates": True}, "ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    srr = r.model_dump()["srr"]
    assert srr["candidates"] == 3 and len(srr["probabilities"]) == 3
    (choice,) = r.choices
    assert choice.text == srr["candidate_texts"][srr["selected"]]
    assert r.usage.completion_tokens == sum(len(t) for t in srr["candidate_token_ids"]) == 24


def test_completion_logprobs_in_the_legacy_shape(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=2,
                                  extra_body={"srr": {"candidates": 2}, "ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(alts) <= 2 and max(alts.values()) >= got
               for alts, got in zip(lp.top_logprobs, lp.token_logprobs))


def test_completion_streams_the_selected_text(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, stream=True,
                                            extra_body={"srr": {"candidates": 2}}))
    assert chunks and all(c.object == "text_completion" for c in chunks)
    last = chunks[-1].model_dump()
    assert last["srr"]["candidates"] == 2 and last["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("body", [
    {"prompt": ["one", "two"]}, {"prompt": PROMPT, "echo": True}, {"prompt": PROMPT, "suffix": "x"},
    {"prompt": ""}, {"prompt": PROMPT, "logprobs": 6}, {"prompt": PROMPT, "max_tokens": 10**6},
])
def test_bad_completion_requests_are_400(server, body):
    r = httpx.post(server.base + "/v1/completions", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT)


def test_langchain_openai_llm(server):
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=server.base + "/v1", api_key="unused", model=MODEL, max_tokens=8,
                 max_retries=0, extra_body={"srr": {"candidates": 2}})
    out = llm.invoke(PROMPT)
    assert isinstance(out, str) and out
