"""What applications ask of the output, through selection, on the real server (vLLM serving
SmolLM2-135M-Instruct): `response_format` (every candidate sampled under vLLM's structured
outputs), `logprobs` / `top_logprobs` and `logit_bias`, with the OpenAI SDK and LangChain's
`ChatOpenAI.with_structured_output`."""

from __future__ import annotations

import json

import jsonschema
import pytest

MODEL = "SmolLM2-135M-Instruct"
ANSWER = {"type": "object", "additionalProperties": False, "required": ["answer", "colour"],
          "properties": {"answer": {"enum": ["yes", "no"]},
                         "colour": {"enum": ["red", "green", "blue", "other"]}}}
ASK = [{"role": "user", "content": "Is the sky blue? Reply in JSON with an answer and a colour."}]


def ask(client, k=4, **kw):
    kw.setdefault("max_tokens", 48)
    return client.chat.completions.create(
        model=MODEL, messages=ASK, seed=3,
        extra_body={"srr": {"candidates": k, "return_candidates": True}}, **kw)


def candidates(r) -> list[tuple[str, str]]:
    srr = r.model_dump()["srr"]
    return list(zip(srr["candidate_texts"], srr["candidate_finish_reasons"]))


def test_json_schema_constrains_every_candidate_and_the_answer(client):
    r = ask(client, response_format={"type": "json_schema", "json_schema": {
        "name": "answer", "schema": ANSWER, "strict": True}})
    cands = candidates(r)
    finished = [text for text, reason in cands if reason == "stop"]
    assert len(cands) == 4 and finished, cands  # a candidate cut by max_tokens is unfinished JSON
    for text in finished:
        jsonschema.validate(json.loads(text), ANSWER)
    selected = r.model_dump()["srr"]["selected"]
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == cands[selected]


def test_json_object_gives_json_objects(client):
    r = ask(client, response_format={"type": "json_object"}, max_tokens=64)
    finished = [text for text, reason in candidates(r) if reason == "stop"]
    assert finished
    assert all(isinstance(json.loads(text), dict) for text in finished)


def test_logprobs_of_the_served_candidate(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=8, logprobs=True, top_logprobs=3,
        extra_body={"srr": {"candidates": 3, "return_candidates": True}, "ignore_eos": True})
    (choice,) = r.choices
    srr = r.model_dump()["srr"]
    steps = choice.logprobs.content
    assert len(steps) == len(srr["candidate_token_ids"][srr["selected"]]) == 8
    assert "".join(s.token for s in steps) == choice.message.content
    for s in steps:
        assert s.logprob <= 0 and len(s.top_logprobs) == 3
        tops = [t.logprob for t in s.top_logprobs]
        assert tops == sorted(tops, reverse=True) and s.logprob <= tops[0] + 1e-6
        assert bytes(s.bytes).decode() == s.token


def test_logit_bias_applies_to_every_candidate(client, model_dir):
    from transformers import AutoTokenizer

    (token,) = AutoTokenizer.from_pretrained(model_dir).encode(" blue", add_special_tokens=False)
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=5, logit_bias={str(token): 100},
        extra_body={"srr": {"candidates": 3, "return_candidates": True}, "ignore_eos": True})
    ids = r.model_dump()["srr"]["candidate_token_ids"]
    assert ids == [[token] * 5] * 3


def test_a_bad_schema_is_a_400_and_the_server_serves_on(client, server):
    import openai

    with pytest.raises(openai.BadRequestError):
        ask(client, response_format={"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "frobnicate"}}}}})
    assert ask(client, k=2).choices[0].message.content is not None


def test_langchain_with_structured_output(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        answer: str = Field(json_schema_extra={"enum": ["yes", "no"]})
        colour: str = Field(json_schema_extra={"enum": ["red", "green", "blue", "other"]})

    llm = ChatOpenAI(base_url=server.base + "/v1", api_key="unused", model=MODEL, max_tokens=48,
                     max_retries=0, seed=3, extra_body={"srr": {"candidates": 4}})
    out = llm.with_structured_output(Answer, method="json_schema").invoke(ASK[0]["content"])
    assert isinstance(out, Answer) and out.answer in ("yes", "no")
