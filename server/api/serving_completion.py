"""POST /v1/completions: the legacy text completion, one prompt and no chat template, through
the same selection as chat (serving_generate).

The scorer was trained on chat prompts: its instruction vector is the state at the last token
of a chat-formatted prompt. A raw text prompt is scored the same way, but it is not what the
scorer learned from; treat its decisions on this endpoint with that in mind (docs/capture.md).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import AsyncIterator, Iterator

from ranker.policy import SAFETY_SYSTEM_PROMPT
from server.api.protocol import (
    APIError, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage,
)
from server.api.serving_generate import Selection, ServingGenerate, token_logprobs
from server.api.streaming import DONE, EarlyStream, sse


class ServingCompletion(ServingGenerate):
    async def create(self, req: CompletionRequest, early: EarlyStream | None = None) -> CompletionResponse:
        """`early`: where the winner's text goes as it is generated, once the guard commits
        to it (a stream of one answer without logprobs)."""
        self.check_model(req.model)
        prompt_ids = self.text_ids(req.text())
        t_start = time.perf_counter()
        plain = req.n == 1 and req.top_logprobs_count() is None
        # The resample fallback's safety instruction, as text before the prompt: no roles here.
        sel = await self.select(req, prompt_ids,
                                lambda: self.text_ids(f"{SAFETY_SYSTEM_PROMPT}\n\n{req.text()}"),
                                on_text=early.pieces.put_nowait if early and plain else None)
        response = CompletionResponse(
            **({"id": early.id, "created": early.created} if early else {}),
            model=self.model_name, choices=self.choices(req, sel), srr=self.info(req, sel),
            usage=Usage(prompt_tokens=sel.prompt_tokens, completion_tokens=sel.completion_tokens,
                        total_tokens=sel.prompt_tokens + sel.completion_tokens))
        self.record(response.id, sel, time.perf_counter() - t_start, req.text(),
                    [c.text for c in response.choices])
        return response

    def text_ids(self, text: str) -> list[int]:
        ids = self.engine.tokenizer.encode(text)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return self.fitting(ids, "prompt")

    def choices(self, req: CompletionRequest, sel: Selection) -> list[CompletionChoice]:
        if not sel.decision.order:  # the refusal
            return [CompletionChoice(index=j, text=self.settings.refusal_text, finish_reason="stop")
                    for j in range(req.n)]
        top = req.top_logprobs_count()
        return [CompletionChoice(index=j, text=c.text, finish_reason=c.finish_reason,
                                 logprobs=None if top is None else completion_logprobs(c, top))
                for j, c in enumerate(sel.candidates[i] for i in sel.decision.order[: req.n])]


def completion_logprobs(c, top: int) -> CompletionLogprobs:
    steps = token_logprobs(c, top)
    tokens = [token for (token, _), _ in steps]
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[lp for (_, lp), _ in steps],
        top_logprobs=[dict(alts) for _, alts in steps],
        text_offset=list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else [])


def stream(result: CompletionResponse) -> Iterator[str]:
    """The selected text as one `text_completion` chunk per choice, then [DONE]; the `srr`
    object and usage ride on the last chunk."""
    for c in result.choices:
        body = piece(result.id, result.created, result.model, c.model_dump())
        if c is result.choices[-1]:
            body.update(tail(result))
        yield sse(body)
    yield DONE


def piece(cid: str, created: int, model: str, choice: dict) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def tail(result: CompletionResponse) -> dict:
    return {"usage": result.usage.model_dump(), **({"srr": result.srr.model_dump()} if result.srr else {})}


def stream_early(early: EarlyStream, first: str, work: asyncio.Future, model: str) -> AsyncIterator[str]:
    """The winner's text from the guard's commit on, a chunk per piece as it is generated; the
    last chunk carries the finish reason, usage and the `srr` object, once the request ends."""
    def end(result: CompletionResponse) -> Iterator[str]:
        (c,) = result.choices
        last = CompletionChoice(index=0, text="", finish_reason=c.finish_reason).model_dump()
        yield sse(piece(early.id, early.created, model, last) | tail(result))
        yield DONE

    return early.events(first, work, end=end, piece=lambda text: sse(piece(
        early.id, early.created, model, CompletionChoice(index=0, text=text, finish_reason=None).model_dump())))
