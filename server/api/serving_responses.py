"""POST /v1/responses: the OpenAI Responses API, stateless and text-only, as a chat completion
underneath (one path through selection), answered as a `response` object or its event stream."""

from __future__ import annotations

import json
from typing import Iterator

from server.api.protocol import (
    APIError, ChatCompletionResponse, OutputMessage, OutputRefusal, OutputText, ResponseObject,
    ResponsesRequest, ResponseUsage,
)
from server.api.serving_chat import ServingChat


class ServingResponses:
    def __init__(self, chat: ServingChat):
        self.chat = chat

    async def create(self, req: ResponsesRequest) -> ResponseObject:
        try:
            chat_req = req.chat()
        except ValueError as e:
            raise APIError(400, str(e), param="input") from None
        return response_object(req, await self.chat.create(chat_req))


def response_object(req: ResponsesRequest, result: ChatCompletionResponse) -> ResponseObject:
    (choice,) = result.choices
    message = choice.message
    part = (OutputText(text=message.content) if message.refusal is None
            else OutputRefusal(refusal=message.refusal))
    cut = choice.finish_reason == "length"
    usage = result.usage
    return ResponseObject(
        id="resp_" + result.id.removeprefix("chatcmpl-"), created_at=result.created,
        status="incomplete" if cut else "completed",
        incomplete_details={"reason": "max_output_tokens"} if cut else None,
        model=result.model, output=[OutputMessage(content=[part], status="incomplete" if cut else "completed")],
        instructions=req.instructions, max_output_tokens=req.max_output_tokens,
        temperature=req.temperature, top_p=req.top_p, metadata=req.metadata or {},
        text={"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
        if req.text and req.text.format else {"format": {"type": "text"}},
        usage=ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                            total_tokens=usage.total_tokens),
        srr=result.srr)


def stream(resp: ResponseObject) -> Iterator[str]:
    """The Responses API's event stream for a selected answer: created, the output item with
    its one content part (text or refusal) as one delta, then completed, which carries the
    whole response and its `srr` object."""
    seq = iter(range(1 << 30))

    def event(kind: str, **body) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **body})}\n\n"

    pending = resp.model_copy(update={"status": "in_progress", "output": [], "usage": None})
    yield event("response.created", response=pending.model_dump())
    yield event("response.in_progress", response=pending.model_dump())
    (item,) = resp.output
    (part,) = item.content
    ids = dict(item_id=item.id, output_index=0)
    yield event("response.output_item.added", output_index=0,
                item=item.model_copy(update={"status": "in_progress", "content": []}).model_dump())
    empty = OutputText(text="") if part.type == "output_text" else OutputRefusal(refusal="")
    yield event("response.content_part.added", **ids, content_index=0, part=empty.model_dump())
    if part.type == "output_text":
        yield event("response.output_text.delta", **ids, content_index=0, delta=part.text, logprobs=[])
        yield event("response.output_text.done", **ids, content_index=0, text=part.text, logprobs=[])
    else:
        yield event("response.refusal.delta", **ids, content_index=0, delta=part.refusal)
        yield event("response.refusal.done", **ids, content_index=0, refusal=part.refusal)
    yield event("response.content_part.done", **ids, content_index=0, part=part.model_dump())
    yield event("response.output_item.done", output_index=0, item=item.model_dump())
    final = "response.completed" if resp.status == "completed" else "response.incomplete"
    yield event(final, response=resp.model_dump())
