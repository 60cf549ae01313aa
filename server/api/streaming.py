"""What every endpoint's stream shares: server-sent events, and the early stream that begins
at the guard's commit, before the request ends (docs/api.md, "Pruning")."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable


@dataclass
class EarlyStream:
    """Where the winner's text goes as it is generated once the guard commits to it. The
    stream's id and creation time are fixed before the response exists, and the response
    takes them."""

    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def events(self, first: str, work: asyncio.Future, piece: Callable[[str], str],
                     end: Callable[[object], Iterable[str]],
                     failed: Callable[[dict], Iterable[str]] = lambda body: (sse({"error": body}), DONE),
                     head: Iterable[str] = ()) -> AsyncIterator[str]:
        """An endpoint's stream from the commit on: `head`, an event per piece of the winner's
        text (`first`, then each piece as it is generated), and once `work` (the request) ends,
        `end(its result)`; or `failed(error body)` if it failed after the stream began, when
        the status is already sent and the error can only be an event."""
        for e in head:
            yield e
        async for text in self._text(first, work):
            yield piece(text)
        try:
            result = work.result()
        except Exception as e:  # noqa: BLE001 - the stream has begun: the error is its last event
            for ev in failed(error_body(e)):
                yield ev
            return
        for ev in end(result):
            yield ev

    async def _text(self, first: str, work: asyncio.Future) -> AsyncIterator[str]:
        yield first
        while True:
            get = asyncio.ensure_future(self.pieces.get())
            await asyncio.wait({get, work}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                break
            yield get.result()
        while not self.pieces.empty():
            yield self.pieces.get_nowait()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


DONE = "data: [DONE]\n\n"


def error_body(e: BaseException) -> dict:
    """A failure after the stream has begun: the status is sent, so the error is an event."""
    return {"message": getattr(e, "message", "the request failed"),
            "type": getattr(e, "type", "server_error")}
