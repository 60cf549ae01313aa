"""What every endpoint's stream shares: server-sent events, and the early stream that begins
at the guard's commit, before the request ends (docs/api.md, "Pruning")."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator


@dataclass
class EarlyStream:
    """Where the winner's text goes as it is generated once the guard commits to it. The
    stream's id and creation time are fixed before the response exists, and the response
    takes them."""

    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def text(self, first: str, work: asyncio.Future) -> AsyncIterator[str]:
        """`first`, then each piece as it is generated, until `work` (the request) ends."""
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
