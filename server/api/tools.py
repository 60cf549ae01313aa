"""Tool calls through selection: the chat template renders `tools`, all K candidates are
sampled under the same tools, and the served one is parsed into OpenAI `tool_calls` with vLLM's
own tool parser for the model. A tool call is a response like any other: the scorer ranks the
candidates' states whatever their text, and the refuse fallback replaces a harmful call with
the refusal text.

tool_choice "auto" parses what the model wrote (Qwen2.5 writes hermes-style
`<tool_call>{...}</tool_call>`, or, the 0.5B model often, the bare call JSON in a code fence); "required" and a named function constrain every candidate to
the call's JSON with vLLM's structured outputs (`get_json_schema_from_tools`), as vLLM's own
server does.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.protocol import APIError, ChatCompletionRequest, FunctionCall, ToolCall

# vLLM tool parser per model architecture (config.json model_type); SRR_TOOL_PARSER overrides.
PARSERS = {"qwen2": "hermes", "qwen2_moe": "hermes", "qwen3": "hermes", "qwen3_moe": "hermes"}


class Tools:
    """What the served model can do with tools: does its chat template render them, and which
    vLLM parser reads its calls."""

    def __init__(self, tokenizer: Any, model_type: str, parser: str | None):
        self.renders = "tools" in (tokenizer.chat_template or "")
        self.parser_name = parser or PARSERS.get(model_type)
        # Built once: a parser looks its tags up in the tokenizer's whole vocabulary, and its
        # non-streaming extract_tool_calls keeps no state between calls.
        self.parser = None
        if self.parser_name:
            from vllm.tool_parsers import ToolParserManager

            self.parser = ToolParserManager.get_tool_parser(self.parser_name)(tokenizer)

    def check(self, req: ChatCompletionRequest) -> None:
        if req.tool_mode() and not self.renders:
            raise APIError(400, "this model's chat template does not render tools", param="tools")
        if req.tool_mode() == "auto" and self.parser is None:
            raise APIError(400, "no tool-call parser for this model (set SRR_TOOL_PARSER)",
                           param="tools")

    def schema(self, req: ChatCompletionRequest) -> dict | None:
        """The JSON schema every candidate follows for a required or named tool_choice."""
        if req.tool_mode() not in ("required", "named"):
            return None
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionNamedToolChoiceParam, ChatCompletionToolsParam,
        )
        from vllm.tool_parsers.utils import get_json_schema_from_tools

        tools = [ChatCompletionToolsParam.model_validate(t.model_dump(exclude_none=True)) for t in req.tools]
        choice = (req.tool_choice if isinstance(req.tool_choice, str)
                  else ChatCompletionNamedToolChoiceParam.model_validate(req.tool_choice.model_dump()))
        schema = get_json_schema_from_tools(choice, tools, req.parallel_tool_calls)
        return json.loads(schema) if isinstance(schema, str) else schema

    def parse(self, req: ChatCompletionRequest, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a served candidate's text."""
        mode = req.tool_mode()
        if mode == "named":
            return None, [ToolCall(function=FunctionCall(name=req.tool_choice.function.name, arguments=text))]
        if mode == "required":
            try:
                calls = json.loads(text)
            except json.JSONDecodeError:  # cut by max_tokens: no call to return
                return text, []
            return None, [ToolCall(function=FunctionCall(name=c["name"], arguments=json.dumps(c["parameters"])))
                          for c in calls]
        if mode != "auto":
            return text, []
        info = self.parser.extract_tool_calls(text, request=None)
        if info.tools_called:
            return info.content or None, [ToolCall(function=FunctionCall(
                name=c.function.name, arguments=c.function.arguments)) for c in info.tool_calls]
        calls = bare_calls(text, {t.function.name for t in req.tools})
        return (None, calls) if calls else (text, [])


def bare_calls(text: str, names: set[str]) -> list[ToolCall]:
    """Calls written as bare JSON instead of the model's tags: small models often answer a
    tool request with just `{"name": ..., "arguments": {...}}` (or a list of them), in a
    ```json fence or not. Only when the whole answer is that JSON and every name is an offered
    tool: an answer that merely contains JSON stays text."""
    body = text.strip()
    if body.startswith("```"):
        body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return []
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(c, dict) and c.get("name") in names
                            and isinstance(c.get("arguments", c.get("parameters")), dict)
                            for c in items):
        return []
    return [ToolCall(function=FunctionCall(name=c["name"], arguments=json.dumps(
        c.get("arguments", c.get("parameters"))))) for c in items]


def template_messages(messages: list) -> list[dict]:
    """Messages as chat templates read them: tool calls' arguments as objects (Qwen's template
    writes `arguments | tojson`), a tool turn with its call id."""
    out = []
    for m in messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
