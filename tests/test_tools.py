"""Tool calls through selection on the real engine: vLLM serving Qwen2.5-Coder-0.5B-Instruct
(its chat template renders tools, its calls are hermes-style), with the OpenAI SDK and
LangChain's `bind_tools`.

The server is what `make serve` starts, the default model with its shipped scorer
(weights/qwen2.5-coder-0.5b-instruct), here at threshold 0: what is tested is how tools go
through selection (rendering, K candidates under the same tools, parsing the served one), not
the ranking; and that the default serves a plain request with its scorer's K scores."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import audited_server

MODEL = "Qwen2.5-Coder-0.5B-Instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 40}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now? Use the tool."}]


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    """What `make serve` serves: no model or scorer named, so the default and its scorer."""
    audit = tmp_path_factory.mktemp("qwen") / "audit.jsonl"
    with audited_server(audit, ["--threshold", "0", "--max-tokens", "96"],
                        env={"SRR_MODEL_DIR": None, "SRR_SCORER_DIR": None}) as srv:
        yield srv


@pytest.fixture(scope="module")
def qwen(qwen_server):
    from openai import OpenAI

    return OpenAI(base_url=qwen_server.base + "/v1", api_key="unused", max_retries=0, timeout=600)


def candidates(r):
    srr = r.model_dump()["srr"]
    return srr["candidate_texts"], srr["selected"]


def test_the_default_serves_its_shipped_scorers_eight_scores(qwen):
    r = qwen.chat.completions.create(model=MODEL, max_tokens=24, seed=0, messages=[
        {"role": "user", "content": "How do I reverse a list in Python?"}])
    srr = r.model_dump()["srr"]
    assert r.model == MODEL and r.choices[0].message.content
    assert srr["candidates"] == 8 and len(srr["scores"]) == len(srr["probabilities"]) == 8
    assert all(0 <= p <= 1 for p in srr["probabilities"])
    assert srr["scorer"].startswith("srr-qwen2.5-coder-0.5b-instruct")
    assert 0 <= srr["request_risk"] <= 1  # the risk head (recipes 0.8.0 on)


def test_the_default_scorer_guards_while_generating(qwen):
    """`srr.prune` on the default: its scorer carries prefix rules (`srr prefixes`), so the
    guard runs instead of the 400 a scorer without them answers; tokens are counted per
    candidate and usage is what was generated."""
    r = qwen.chat.completions.create(model=MODEL, max_tokens=48, seed=0, messages=[
        {"role": "user", "content": "Write a haiku about autumn rain."}], extra_body={"srr": {"prune": True}})
    srr = r.model_dump()["srr"]
    assert len(srr["candidate_tokens"]) == len(srr["pruned"]) == 8
    assert all(0 < n <= 48 for n in srr["candidate_tokens"])
    assert r.usage.completion_tokens == sum(srr["candidate_tokens"])


def test_named_tool_choice_constrains_every_candidate(qwen):
    r = qwen.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=48, seed=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={"srr": {"candidates": 3, "return_candidates": True}})
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city"}
    texts, selected = candidates(r)
    assert call.function.arguments == texts[selected]
    assert all(set(json.loads(t)) == {"city"} for t in texts)  # all K sampled under the schema


def test_a_tool_call_is_audited_without_its_text(qwen, qwen_server):
    r = qwen.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=48, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={"srr": {"candidates": 2}})
    record = next(json.loads(line) for line in qwen_server.audit.read_text().splitlines()
                  if json.loads(line)["id"] == r.id)
    (answer,) = record["response"]
    assert answer.startswith("sha256:") and "Paris" not in answer


def test_auto_tool_call_is_parsed_from_the_served_candidate(qwen):
    r = qwen.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=64, seed=0, temperature=0.3,
        extra_body={"srr": {"candidates": 4, "return_candidates": True}})
    texts, selected = candidates(r)
    assert '"get_weather"' in texts[selected]  # the model calls the tool when told to (seeded)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    assert r.choices[0].finish_reason == "tool_calls"


def test_a_bare_json_call_is_a_call_and_other_json_is_text():
    from server.api.tools import bare_calls

    names = {"get_weather"}
    fenced = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    (call,) = bare_calls(fenced, names)
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert bare_calls('{"name": "rm_rf", "arguments": {}}', names) == []  # not an offered tool
    assert bare_calls('Sure: {"name": "get_weather", "arguments": {}}', names) == []  # prose around it
    assert bare_calls('{"name": "get_weather", "arguments": "Paris"}', names) == []


def test_tool_result_turn_is_rendered(qwen):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, light rain"}]
    r = qwen.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=32,
                                     seed=0, tool_choice="none", extra_body={"srr": {"candidates": 2}})
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_streamed_tool_call(qwen):
    chunks = list(qwen.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=48, seed=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={"srr": {"candidates": 2}}))
    calls = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_on_a_model_whose_template_ignores_them_is_a_400(server):
    body = {"model": "SmolLM2-135M-Instruct", "messages": ASK, "tools": [WEATHER]}
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "does not render tools" in r.json()["error"]["message"]


def test_langchain_bind_tools(qwen_server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "18 C"

    llm = ChatOpenAI(base_url=qwen_server.base + "/v1", api_key="unused", model=MODEL, max_tokens=64,
                     max_retries=0, seed=0, extra_body={"srr": {"candidates": 2}})
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(ASK[0]["content"])
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    assert isinstance(msg.tool_calls[0]["args"].get("city"), str)
