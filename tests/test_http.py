"""HTTP-layer behaviour only (auth, body limit, concurrency limit): a stub service stands in
for the engine here; every claim about serving is tested against the real engine elsewhere."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.config import Settings
from server.api.protocol import ChatCompletionResponse, ChatMessageOut, Choice, Usage


class StubEngine:
    def is_alive(self):
        return True

    def shutdown(self):
        pass


class StubChat:
    def __init__(self, delay=0.0):
        self.delay = delay

    async def create(self, req, early=None):
        await asyncio.sleep(self.delay)
        return ChatCompletionResponse(
            model="stub", choices=[Choice(index=0, message=ChatMessageOut(content="ok"),
                                          finish_reason="stop")],
            usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))


class StubServings:
    """Stands in for server.api.app.Servings: the engine and one handler per endpoint."""

    model_name = "stub"
    engine = StubEngine()

    def __init__(self, delay=0.0):
        self.chat = StubChat(delay)


def app_with(settings: Settings, service=None):
    svc = service or StubServings()

    async def build():
        return svc

    return create_app(settings, build)


BODY = {"model": "stub", "messages": [{"role": "user", "content": "hello"}]}


def test_api_key_guards_v1_but_not_health_or_metrics():
    with TestClient(app_with(Settings(api_key="s3cret"))) as c:
        r = c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models").status_code == 401
        ok = c.post("/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_protect_metrics():
    with TestClient(app_with(Settings(api_key="k", protect_metrics=True))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_oversized_body_is_413():
    with TestClient(app_with(Settings(max_body_bytes=2048))) as c:
        big = {**BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
        r = c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert c.post("/v1/chat/completions", json=BODY).status_code == 200


def test_streaming_format():
    with TestClient(app_with(Settings())) as c:
        r = c.post("/v1/chat/completions", json={**BODY, "stream": True})
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) == 4


@pytest.mark.anyio
async def test_over_the_concurrency_limit_is_429_with_retry_after():
    import httpx

    app = app_with(Settings(max_concurrent_requests=1), StubServings(delay=0.5))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = asyncio.create_task(c.post("/v1/chat/completions", json=BODY))
            await asyncio.sleep(0.1)
            second = await c.post("/v1/chat/completions", json=BODY)
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            assert (await first).status_code == 200


@pytest.fixture
def anyio_backend():
    return "asyncio"
