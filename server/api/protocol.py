"""The API's wire format: OpenAI chat schemas with the `srr` extension, and its errors."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class SRRRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: int | None = Field(None, ge=1, description="K: candidates to sample.")
    return_candidates: bool = False
    mode: Literal["select", "off"] = "select"
    prune: bool | None = Field(None, description="Stop losing candidates while they are generated "
                               "(default: the server's SRR_PRUNE).")


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchema(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: every candidate is sampled under it (vLLM structured outputs)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format: json_schema is required when type is json_schema")
        return self

    @property
    def structured(self) -> bool:
        return self.type != "text"


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class SamplingRequest(BaseModel):
    """What every generating endpoint shares: the model, n, OpenAI's and vLLM's sampling
    fields and `srr`. Unknown fields are tolerated, as OpenAI clients send many."""

    model_config = ConfigDict(extra="allow")
    model: str
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling fields, as its own server accepts them.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    srr: SRRRequest | None = None

    def completion_limit(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """Alternatives per token when logprobs are asked for; None when they are not."""
        return None

    def structure(self) -> ResponseFormat | None:
        return None

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("stop: at most 4 non-empty strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_limits(cls, v):
        for token, bias in (v or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"logit_bias: keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias: values must be in [-100, 100]")
        return v


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_mode(self) -> str | None:
        """None (no tools offered, or tool_choice "none"), "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return None
        return "named" if isinstance(self.tool_choice, NamedToolChoice) else (self.tool_choice or "auto")

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def structure(self) -> ResponseFormat | None:
        return self.response_format if self.response_format and self.response_format.structured else None

    @model_validator(mode="after")
    def _unsupported(self):
        """Fail loudly on features this server would otherwise silently ignore."""
        extra = self.model_extra or {}
        bad = [name for name in ("functions", "function_call") if extra.get(name)]
        if bad:
            raise ValueError(f"not supported by this server: {', '.join(bad)} (use tools)")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools or []}:
            raise ValueError(f"tool_choice: no tool named {self.tool_choice.function.name!r} in tools")
        if self.tool_mode() in ("named", "required") and self.structure():
            raise ValueError("response_format cannot be combined with a required or named tool_choice")
        return self


class CompletionRequest(SamplingRequest):
    """The legacy text completion: one prompt, no chat template."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=5)  # alternatives per token, as OpenAI's legacy API
    echo: bool = False
    suffix: str | None = None

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @model_validator(mode="after")
    def _unsupported(self):
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: one prompt per request (selection is per prompt)")
        bad = [name for name, on in (("echo", self.echo), ("suffix", self.suffix),
                                     ("best_of", (self.model_extra or {}).get("best_of"))) if on]
        if bad:
            raise ValueError(f"not supported by this server: {', '.join(bad)}")
        return self


class InputPart(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    """A message item of the Responses API's `input` (text only)."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputPart]

    def message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return Message(role=self.role, content=text)


class TextFormat(BaseModel):
    """The Responses API's `text.format`: response_format, flattened."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    def response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        if self.schema_ is None or not self.name:
            raise ValueError("text.format: json_schema needs a name and a schema")
        return ResponseFormat(type="json_schema", json_schema=JSONSchema(
            name=self.name, schema=self.schema_, strict=self.strict, description=self.description))


class ResponseText(BaseModel):
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """POST /v1/responses (the OpenAI Responses API), stateless: text in, text out."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: ResponseText | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # vLLM's extension, as in chat
    srr: SRRRequest | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        extra = self.model_extra or {}
        bad = [name for name in ("tools", "previous_response_id", "conversation", "reasoning",
                                 "background") if extra.get(name)]
        if bad:
            raise ValueError(f"not supported by this server: {', '.join(bad)}")
        if self.store:
            raise ValueError("store: this server keeps no responses (send store: false)")
        if self.text and self.text.format:
            self.text.format.response_format()  # a json_schema without its schema is a 400 here
        return self

    def chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion: one path through selection."""
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        if not items:
            raise ValueError("input: at least one message")
        messages = [Message(role="system", content=self.instructions)] * bool(self.instructions)
        fmt = self.text.format.response_format() if self.text and self.text.format else None
        return ChatCompletionRequest(
            model=self.model, messages=messages + [m.message() for m in items],
            max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=self.seed, user=self.user, response_format=fmt, srr=self.srr)


class ScoreRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    candidates: list[str] = Field(min_length=1)


class SRRInfo(BaseModel):
    candidates: int
    selected: int | None = Field(description="Index of the returned candidate among the K, in generation order.")
    scores: list[float] = Field(description="Raw ranking score per candidate, generation order; higher = safer.")
    probabilities: list[float] = Field(description="Calibrated P(acceptable) per candidate; the "
                                       "selected one's is what the threshold is compared with.")
    request_risk: float | None = Field(None, description="The scorer's P(the request asks for "
                                       "harm), from the prompt's states; null without a risk head.")
    layer: list[int]
    scorer: str
    threshold: float
    fallback: str | None = None
    mode: str = "select"
    candidate_texts: list[str] | None = None
    candidate_finish_reasons: list[str | None] | None = Field(
        None, description="With return_candidates: 'length' marks a candidate cut by max_tokens.")
    candidate_token_ids: list[list[int]] | None = Field(
        None, description="With return_candidates: the token ids each candidate sampled.")
    candidate_tokens: list[int] = Field(
        default_factory=list, description="Tokens each candidate generated (fewer when pruned).")
    pruned: list[bool] = Field(
        default_factory=list, description="Per candidate: stopped by the guard before its end.")
    decided: Literal["exit", "commit"] | None = Field(
        None, description="The guard's decision before the candidates ended: exit (none could be "
        "served: the fallback at once) or commit (the winner known: the rest stopped, and a "
        "stream carries it from then on); null when the decision waited for every candidate.")
    decided_at_tokens: int | None = Field(None, description="The prefix length it was made at.")
    decided_seconds: float | None = Field(None, description="Seconds into generation it was made.")


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = Field(None, description="The refusal fallback under a response_format "
                                "(content is then null): a refusal is not valid for a schema.")
    tool_calls: list[ToolCall] | None = None

    def answer(self) -> str:
        """What was answered, as one text (for the audit log): content, refusal or the calls."""
        if self.tool_calls:
            return json.dumps([c.function.model_dump() for c in self.tool_calls])
        return self.content if self.content is not None else self.refusal or ""


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def text_completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    srr: SRRInfo | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=text_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    srr: SRRInfo | None = None


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)


class OutputRefusal(BaseModel):
    type: Literal["refusal"] = "refusal"
    refusal: str


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: "msg_" + uuid.uuid4().hex)
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText | OutputRefusal]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict = Field(default_factory=lambda: {"reasoning_tokens": 0})


class ResponseObject(BaseModel):
    """The Responses API's response, with the `srr` object."""

    id: str = Field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    incomplete_details: dict | None = None
    error: None = None
    model: str
    output: list[OutputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list = Field(default_factory=list)
    text: dict = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = False
    usage: ResponseUsage | None = None
    srr: SRRInfo | None = None


class ScoreResponse(BaseModel):
    object: Literal["srr.score"] = "srr.score"
    model: str
    scores: list[float]
    probabilities: list[float]
    request_risk: float | None = None
    layer: list[int]
    scorer: str
    threshold: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "srr"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class APIError(Exception):
    """A client-visible error: rendered as an OpenAI error body with this status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
          index: int = 0, logprobs: dict | None = None, **extra: Any) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": logprobs}]}
    body.update(extra)
    return body
