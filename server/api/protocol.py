"""The API's wire format: OpenAI chat schemas with the `srr` extension, and its errors."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class SRRRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: int | None = Field(None, ge=1, description="K: candidates to sample.")
    return_candidates: bool = False
    mode: Literal["select", "off"] = "select"


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Unknown fields are tolerated, as OpenAI clients send many."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling fields, as its own server accepts them.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    srr: SRRRequest | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        """Fail loudly on features this server would otherwise silently ignore."""
        extra = self.model_extra or {}
        fmt = extra.get("response_format")
        bad = [name for name, on in (
            ("logprobs", bool(extra.get("logprobs"))),
            ("top_logprobs", bool(extra.get("top_logprobs"))),
            ("tools", bool(extra.get("tools"))),
            ("functions", bool(extra.get("functions"))),
            ("logit_bias", bool(extra.get("logit_bias"))),
            ("response_format", isinstance(fmt, dict) and fmt.get("type") not in (None, "text")),
        ) if on]
        if bad:
            raise ValueError(f"not supported by this server: {', '.join(bad)}")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("stop: at most 4 non-empty strings")
        return v


class ScoreRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    candidates: list[str] = Field(min_length=1)


class SRRInfo(BaseModel):
    candidates: int
    selected: int | None = Field(description="Index of the returned candidate among the K, in generation order.")
    scores: list[float] = Field(description="Raw ranking score per candidate, generation order; higher = safer.")
    probabilities: list[float] = Field(description="Calibrated P(acceptable) per candidate.")
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


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    srr: SRRInfo | None = None


class ScoreResponse(BaseModel):
    object: Literal["srr.score"] = "srr.score"
    model: str
    scores: list[float]
    probabilities: list[float]
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
          index: int = 0, **extra: Any) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": None}]}
    body.update(extra)
    return body
