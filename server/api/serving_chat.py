"""POST /v1/chat/completions: messages -> the shared selection (serving_generate) -> a chat
completion, or its stream."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from ranker.policy import SAFETY_SYSTEM_PROMPT
from server.api.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, Choice, ChoiceLogprobs, Message,
    TokenLogprob, TopLogprob, Usage, chunk, completion_id,
)
from server.api.serving_generate import Selection, ServingGenerate, token_logprobs
from server.api.tools import Tools


@dataclass
class EarlyStream:
    """A stream that may begin before the request ends: its id, and the winner's text pieces."""

    id: str = field(default_factory=completion_id)
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)


class ServingChat(ServingGenerate):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tools = Tools(self.engine.tokenizer, self.engine.llm.model_config.hf_config.model_type,
                           self.settings.tool_parser)

    async def create(self, req: ChatCompletionRequest, early: EarlyStream | None = None
                     ) -> ChatCompletionResponse:
        """`early`: where the winner's text goes as it is generated, once the guard commits
        to it (a stream of one plain answer: no tools, no logprobs)."""
        self.check_model(req.model)
        plain = req.n == 1 and not req.tool_mode() and req.top_logprobs_count() is None
        on_text = early.pieces.put_nowait if early and plain else None
        self.tools.check(req)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tool_mode() else None
        prompt_ids = self.prompt_ids(req.messages, tools)
        t_start = time.perf_counter()
        sel = await self.select(req, prompt_ids, lambda: self.prompt_ids(
            [Message(role="system", content=SAFETY_SYSTEM_PROMPT)]
            + [m for m in req.messages if m.role not in ("system", "developer")], tools),
            self.tools.schema(req), on_text)
        response = ChatCompletionResponse(
            **({"id": early.id} if early else {}), model=self.model_name, choices=self.choices(req, sel), srr=self.info(req, sel),
            usage=Usage(prompt_tokens=sel.prompt_tokens, completion_tokens=sel.completion_tokens,
                        total_tokens=sel.prompt_tokens + sel.completion_tokens))
        self.record(response.id, sel, time.perf_counter() - t_start,
                    json.dumps([m.model_dump() for m in req.messages]),
                    [c.message.answer() for c in response.choices])
        return response

    def choices(self, req: ChatCompletionRequest, sel: Selection) -> list[Choice]:
        if not sel.decision.order:  # the refusal
            text = self.settings.refusal_text
            # Under a response_format the refusal is no valid output: OpenAI's place for it
            # is message.refusal, with content null (the SDKs' parse() and LangChain read it).
            message = (ChatMessageOut(content=None, refusal=text) if req.structure()
                       else ChatMessageOut(content=text))
            return [Choice(index=j, message=message, finish_reason="stop") for j in range(req.n)]
        top = req.top_logprobs_count()
        out = []
        for j, c in enumerate(sel.candidates[i] for i in sel.decision.order[: req.n]):
            content, calls = self.tools.parse(req, c.text)
            out.append(Choice(
                index=j, message=ChatMessageOut(content=content, tool_calls=calls or None),
                finish_reason="tool_calls" if calls else c.finish_reason,
                logprobs=None if top is None else chat_logprobs(c, top)))
        return out


def chat_logprobs(c, top: int) -> ChoiceLogprobs:
    def fields(token: str, logprob: float) -> dict:
        return dict(token=token, logprob=logprob, bytes=list(token.encode()))

    return ChoiceLogprobs(content=[
        TokenLogprob(**fields(*sampled), top_logprobs=[TopLogprob(**fields(*alt)) for alt in alts])
        for sampled, alts in token_logprobs(c, top)])


def stream(result: ChatCompletionResponse, include_usage: bool) -> Iterator[str]:
    """Selection needs every candidate finished, so the winner is streamed after selection.

    Each returned choice streams as a role chunk, a content chunk and a finish chunk; the
    `srr` object rides on the last chunk (the usage chunk when asked for).
    """
    cid, created, model = result.id, result.created, result.model
    last = len(result.choices) - 1
    for c in result.choices:
        yield sse(chunk(cid, created, model, {"role": "assistant", "content": ""}, index=c.index))
        m = c.message
        delta = {"content": m.content} if m.refusal is None else {"refusal": m.refusal}
        if m.tool_calls:
            delta["tool_calls"] = [{"index": i, **call.model_dump()} for i, call in enumerate(m.tool_calls)]
        yield sse(chunk(cid, created, model, delta, index=c.index,
                        logprobs=c.logprobs.model_dump() if c.logprobs else None))
        extra = {}
        if c.index == last and not include_usage and result.srr is not None:
            extra["srr"] = result.srr.model_dump()
        yield sse(chunk(cid, created, model, {}, c.finish_reason, index=c.index, **extra))
    if include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "usage": result.usage.model_dump()}
        if result.srr is not None:
            body["srr"] = result.srr.model_dump()
        yield sse(body)
    yield "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def stream_early(early: EarlyStream, first: str, work: asyncio.Future, model: str,
                       include_usage: bool) -> AsyncIterator[str]:
    """The winner's stream from the guard's commit on: its text so far (`first`), each piece
    as it is generated, then the finish chunk (and usage) with the `srr` object, once the
    request ends."""
    cid, created = early.id, int(time.time())
    yield sse(chunk(cid, created, model, {"role": "assistant", "content": ""}))
    yield sse(chunk(cid, created, model, {"content": first}))
    while True:
        get = asyncio.ensure_future(early.pieces.get())
        await asyncio.wait({get, work}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            break
        yield sse(chunk(cid, created, model, {"content": get.result()}))
    while not early.pieces.empty():
        yield sse(chunk(cid, created, model, {"content": early.pieces.get_nowait()}))
    try:
        result: ChatCompletionResponse = work.result()
    except Exception as e:  # noqa: BLE001 - the stream has begun: the error is its last event
        yield sse({"error": {"message": getattr(e, "message", "the request failed"),
                             "type": getattr(e, "type", "server_error")}})
        yield "data: [DONE]\n\n"
        return
    srr = result.srr.model_dump() if result.srr is not None else None
    finish = result.choices[0].finish_reason
    yield sse(chunk(cid, created, model, {}, finish, **({} if include_usage else {"srr": srr})))
    if include_usage:
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": result.usage.model_dump(), "srr": srr})
    yield "data: [DONE]\n\n"
