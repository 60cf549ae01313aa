"""POST /v1/responses: the OpenAI Responses API, stateless and text-only, as a chat completion
underneath (one path through selection), answered as a `response` object or its event stream."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import AsyncIterator, Iterator

from server.api.protocol import (
    APIError, ChatCompletionResponse, OutputMessage, OutputRefusal, OutputText, ResponseObject,
    ResponsesRequest, ResponseUsage,
)
from server.api.serving_chat import ServingChat
from server.api.streaming import EarlyStream


class ServingResponses:
    def __init__(self, chat: ServingChat):
        self.chat = chat

    async def create(self, req: ResponsesRequest, early: EarlyStream | None = None) -> ResponseObject:
        """`early`: as for chat, with a chat completion id (the response's ids follow it)."""
        try:
            chat_req = req.chat()
        except ValueError as e:
            raise APIError(400, str(e), param="input") from None
        return response_object(req, await self.chat.create(chat_req, early))


def ids(chat_id: str) -> tuple[str, str]:
    """The response's id and its one message's id, from the chat completion underneath."""
    key = chat_id.removeprefix("chatcmpl-")
    return "resp_" + key, "msg_" + key


def in_progress(req: ResponsesRequest, chat_id: str, created: int, model: str) -> ResponseObject:
    """The response as the stream first announces it: no output yet."""
    return ResponseObject(
        id=ids(chat_id)[0], created_at=created, status="in_progress", model=model, output=[],
        instructions=req.instructions, max_output_tokens=req.max_output_tokens,
        temperature=req.temperature, top_p=req.top_p, metadata=req.metadata or {},
        text={"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
        if req.text and req.text.format else {"format": {"type": "text"}})


def response_object(req: ResponsesRequest, result: ChatCompletionResponse) -> ResponseObject:
    (choice,) = result.choices
    message = choice.message
    part = (OutputText(text=message.content) if message.refusal is None
            else OutputRefusal(refusal=message.refusal))
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    usage = result.usage
    return in_progress(req, result.id, result.created, result.model).model_copy(update=dict(
        status=status,
        incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
        output=[OutputMessage(id=ids(result.id)[1], content=[part], status=status)],
        usage=ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                            total_tokens=usage.total_tokens),
        srr=result.srr))


class Events:
    """The Responses API's server-sent events, numbered in order."""

    def __init__(self):
        self.seq = itertools.count()

    def __call__(self, kind: str, **body) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(self.seq), **body})}\n\n"


def head(event: Events, pending: ResponseObject, item_id: str, part_type: str) -> Iterator[str]:
    """created, in progress, the output item and its one content part, still empty."""
    yield event("response.created", response=pending.model_dump())
    yield event("response.in_progress", response=pending.model_dump())
    yield event("response.output_item.added", output_index=0,
                item=OutputMessage(id=item_id, status="in_progress", content=[]).model_dump())
    empty = OutputText(text="") if part_type == "output_text" else OutputRefusal(refusal="")
    yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                part=empty.model_dump())


def delta(event: Events, item_id: str, part_type: str, text: str) -> str:
    where = dict(item_id=item_id, output_index=0, content_index=0)
    if part_type == "output_text":
        return event("response.output_text.delta", **where, delta=text, logprobs=[])
    return event("response.refusal.delta", **where, delta=text)


def tail(event: Events, resp: ResponseObject) -> Iterator[str]:
    """The part, the item and the response done; the last event carries the whole response and
    its `srr` object."""
    (item,) = resp.output
    (part,) = item.content
    where = dict(item_id=item.id, output_index=0, content_index=0)
    if part.type == "output_text":
        yield event("response.output_text.done", **where, text=part.text, logprobs=[])
    else:
        yield event("response.refusal.done", **where, refusal=part.refusal)
    yield event("response.content_part.done", **where, part=part.model_dump())
    yield event("response.output_item.done", output_index=0, item=item.model_dump())
    final = "response.completed" if resp.status == "completed" else "response.incomplete"
    yield event(final, response=resp.model_dump())


def stream(resp: ResponseObject) -> Iterator[str]:
    """The event stream of a selected answer: its one content part (text or refusal) as one
    delta."""
    event = Events()
    (item,) = resp.output
    (part,) = item.content
    pending = resp.model_copy(update={"status": "in_progress", "output": [], "usage": None})
    yield from head(event, pending, item.id, part.type)
    yield delta(event, item.id, part.type, part.text if part.type == "output_text" else part.refusal)
    yield from tail(event, resp)


def stream_early(req: ResponsesRequest, early: EarlyStream, first: str, work: asyncio.Future,
                 model: str) -> AsyncIterator[str]:
    """The winner's text from the guard's commit on, a delta per piece as it is generated; the
    rest once the request ends. A failure is an `error` event (the Responses stream has no
    [DONE])."""
    event = Events()
    item_id = ids(early.id)[1]
    return early.events(
        first, work, head=head(event, in_progress(req, early.id, early.created, model), item_id, "output_text"),
        piece=lambda text: delta(event, item_id, "output_text", text),
        end=lambda resp: tail(event, resp),
        failed=lambda body: [event("error", code=body["type"], message=body["message"], param=None)])
