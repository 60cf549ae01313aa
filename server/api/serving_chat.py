"""POST /v1/chat/completions: messages -> the shared selection (serving_generate) -> a chat
completion, or its stream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Iterator

from ranker.policy import SAFETY_SYSTEM_PROMPT
from server.api.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, Choice, ChoiceLogprobs, Message,
    TokenLogprob, TopLogprob, Usage, chunk,
)
from server.api.serving_generate import Selection, ServingGenerate, token_logprobs
from server.api.streaming import DONE, EarlyStream, sse
from server.api.tools import Tools


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
            **({"id": early.id, "created": early.created} if early else {}),
            model=self.model_name, choices=self.choices(req, sel), srr=self.info(req, sel),
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
    """The selected answer, once selection is done.

    Each returned choice streams as a role chunk, a content chunk and a finish chunk; the
    `srr` object rides on the last chunk (the usage chunk when asked for).
    """
    cid, created, model = result.id, result.created, result.model
    for c in result.choices:
        yield sse(chunk(cid, created, model, {"role": "assistant", "content": ""}, index=c.index))
        m = c.message
        delta = {"content": m.content} if m.refusal is None else {"refusal": m.refusal}
        if m.tool_calls:
            delta["tool_calls"] = [{"index": i, **call.model_dump()} for i, call in enumerate(m.tool_calls)]
        yield sse(chunk(cid, created, model, delta, index=c.index,
                        logprobs=c.logprobs.model_dump() if c.logprobs else None))
        if c is not result.choices[-1]:
            yield sse(chunk(cid, created, model, {}, c.finish_reason, index=c.index))
    yield from tail(result, include_usage)


def tail(result: ChatCompletionResponse, include_usage: bool) -> Iterator[str]:
    """The last choice's finish chunk, the usage chunk when asked for, and [DONE]."""
    cid, created, model = result.id, result.created, result.model
    srr = {"srr": result.srr.model_dump()} if result.srr is not None else {}
    c = result.choices[-1]
    yield sse(chunk(cid, created, model, {}, c.finish_reason, index=c.index, **({} if include_usage else srr)))
    if include_usage:
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": result.usage.model_dump(), **srr})
    yield DONE


def stream_early(early: EarlyStream, first: str, work: asyncio.Future, model: str,
                 include_usage: bool) -> AsyncIterator[str]:
    """The winner's stream from the guard's commit on: its text as it is generated, then the
    finish chunk (and usage) with the `srr` object, once the request ends."""
    return early.events(
        first, work, head=[sse(chunk(early.id, early.created, model, {"role": "assistant", "content": ""}))],
        piece=lambda text: sse(chunk(early.id, early.created, model, {"content": text})),
        end=lambda result: tail(result, include_usage))
