"""Fixtures that run the real parts: vLLM serving SmolLM2-135M-Instruct with SRR capture."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
# The suite runs on the small model, where an engine starts and generates fastest; the default
# model (Qwen2.5-Coder-0.5B) is served end to end by test_tools.py and checked by test_check.py.
SUITE_MODEL = "smollm2-135m-instruct"
SCORER_DIR = REPO / "weights" / SUITE_MODEL
os.environ.setdefault("SRR_MODEL_DIR", SUITE_MODEL)  # what `srr serve` serves in the tests
STARTUP_SECONDS = 600


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from ranker import models

    return models.prepare(SUITE_MODEL)


@pytest.fixture(scope="session")
def scorer():
    from ranker.scorer import SRRScorer

    return SRRScorer.from_pretrained(SCORER_DIR)


class LoopThread:
    """An event loop in a thread: AsyncLLM binds to the loop it was created on."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def engine(model_dir, scorer):
    """The server's Engine in-process, capturing the shipped scorer's layer(s)."""
    from server.api.config import Settings
    from ranker.engine import Engine

    runner = LoopThread()
    eng = Engine(model_dir, scorer.config.layers, cache_dir=Settings().cache_dir,
                 max_model_len=Settings().max_model_len)
    runner.run(eng.start())
    eng.run = runner.run
    yield eng
    eng.shutdown()
    runner.stop()


def metric(base: str, sample: str) -> float:
    """A /metrics sample's value summed over its labels (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(base + "/metrics").text)
    return sum(s.value for fam in families for s in fam.samples if s.name == sample)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, extra_env: dict | None = None, args: list[str] | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # Kept after the run: a server that fails to start says why in its log's tail.
        (REPO / ".pytest_cache").mkdir(exist_ok=True)
        self.log_path = REPO / ".pytest_cache" / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        env = {k: v for k, v in {**os.environ, **(extra_env or {})}.items() if v is not None}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), *(args or [])],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: `stop` can kill the engine's too

    def wait_healthy(self, timeout: float = STARTUP_SECONDS) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up;"
                                   f" the end of {self.log_path}:\n{tail}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server did not become healthy; see {self.log_path}")

    def __enter__(self) -> "ServerProcess":
        """Healthy before use, stopped after (also when it never became healthy)."""
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Killed before its engine stopped (a slow start-up): its engine processes
                # would outlive it, holding memory and cores the next tests need.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def audited_server(audit: Path, args: list[str], env: dict | None = None):
    """`srr serve` with `args`, `env` (None unsets a variable) and a fresh audit log
    (`srv.audit`), healthy before use and stopped after."""
    audit.unlink(missing_ok=True)
    with ServerProcess({"SRR_AUDIT_LOG": str(audit), **(env or {})}, args) as srv:
        srv.audit = audit
        yield srv


@pytest.fixture(scope="session")
def server(model_dir):
    """One server for the API and robustness tests: small limits keep fuzzing and load cheap.
    Threshold 0: every request selects a candidate, so the tests of what is returned always
    run (the fallbacks are tested in test_selection.py)."""
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    with audited_server(REPO / ".pytest_cache" / "audit.jsonl",
                        ["--max-tokens", "64", "--max-candidates", "8", "--threshold", "0"]) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
