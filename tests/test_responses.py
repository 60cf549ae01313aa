"""POST /v1/responses (the OpenAI Responses API, stateless, text only) through the same
selection as chat, on the real server, with the OpenAI SDK and LangChain."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

MODEL = "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer"],
          "properties": {"answer": {"enum": ["yes", "no"]}}}


def test_response_is_the_selected_candidate(client):
    r = client.responses.create(
        model=MODEL, input="Name a red fruit.", instructions="Answer in one short sentence.",
        max_output_tokens=12, extra_body={"srr": {"candidates": 3, "return_candidates": True}})
    assert r.object == "response" and r.id.startswith("resp_")
    srr = r.model_dump()["srr"]
    assert srr["candidates"] == 3 and len(srr["scores"]) == 3
    assert r.output_text == srr["candidate_texts"][srr["selected"]]
    assert r.status == ("incomplete" if srr["candidate_finish_reasons"][srr["selected"]] == "length"
                        else "completed")
    assert r.usage.output_tokens == sum(len(t) for t in srr["candidate_token_ids"])


def test_message_list_input(client):
    r = client.responses.create(model=MODEL, max_output_tokens=8, input=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
        extra_body={"srr": {"candidates": 2}})
    assert r.output[0].content[0].type == "output_text" and r.output_text


def test_response_stream_events(client):
    events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8,
                                          stream=True, extra_body={"srr": {"candidates": 2}}))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    delta = next(e.delta for e in events if e.type == "response.output_text.delta")
    assert delta == final.output_text and final.model_dump()["srr"]["candidates"] == 2


def test_text_format_json_schema(client):
    r = client.responses.create(
        model=MODEL, input="Is the sky blue? Answer in JSON.", max_output_tokens=32,
        text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}},
        extra_body={"srr": {"candidates": 3, "return_candidates": True}})
    srr = r.model_dump()["srr"]
    finished = [t for t, why in zip(srr["candidate_texts"], srr["candidate_finish_reasons"]) if why == "stop"]
    assert finished
    for text in finished:
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
    {"previous_response_id": "resp_1"}, {"store": True}, {"input": []},
    {"text": {"format": {"type": "json_schema", "name": "x"}}},
])
def test_unsupported_responses_requests_are_400(server, extra):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, **extra}
    r = httpx.post(server.base + "/v1/responses", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_langchain_on_the_responses_api(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.base + "/v1", api_key="unused", model=MODEL, max_tokens=8,
                     max_retries=0, use_responses_api=True, extra_body={"srr": {"candidates": 2}})
    out = llm.invoke("Say hello.")
    assert out.text
