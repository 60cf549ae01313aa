"""`srr bench`: plain vLLM against the SRR server, same model, same requests, one run.

Both servers are started in turn on loopback: vLLM's own OpenAI server (`n=K`) and
`srr serve` (`srr.candidates=K`, one returned). Every request asks for K candidates of a
fixed length (`ignore_eos`, `max_tokens`) so both sides generate the same tokens. Printed:
p50/p95 latency of sequential requests, requests/s with 8 and 32 concurrent clients, peak
resident memory of the whole process tree, and SRR's split of a request into generation,
capture and scoring time (from its own metrics).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

PROMPTS = [  # benign and short: the benchmark measures cost, not safety
    "Give me three tips for writing clear emails.",
    "Explain how a bicycle gear works.",
    "What should I pack for a weekend hike?",
    "Describe the water cycle in simple terms.",
]


class Tree:
    """Peak RSS of a process and all its children (vLLM runs engine and worker processes)."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        return self.peak


def start(cmd: list[str], port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise TimeoutError("server did not start")


def body(model: str, k: int, tokens: int, srr: bool, i: int, seed: int | None) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
         "max_tokens": tokens, "ignore_eos": True, "temperature": 1.0}
    if seed is not None:
        b["seed"] = seed + i
    if srr:
        b["srr"] = {"candidates": k}
    else:
        b["n"] = k
    return b


async def run_load(base: str, make_body, requests: int, clients: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(range(requests))
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        async def worker():
            while queue:
                i = queue.pop()
                t = time.perf_counter()
                r = await http.post("/v1/chat/completions", json=make_body(i))
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return latencies, requests / (time.perf_counter() - t0)


def metric_sums(base: str) -> dict[str, float]:
    """The server's own histograms' _sum and _count samples, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for fam in text_string_to_metric_families(httpx.get(base + "/metrics").text)
            if fam.name.startswith("srr_") for s in fam.samples
            if s.name.endswith(("_sum", "_count"))}


def measure(name: str, cmd: list[str], port: int, env: dict, model: str, args) -> dict:
    t0 = time.perf_counter()
    proc = start(cmd, port, env)
    startup = time.perf_counter() - t0
    tree = Tree(proc.pid)
    base = f"http://127.0.0.1:{port}"
    srr = name == "srr"
    make = lambda i: body(model, args.k, args.tokens, srr, i, args.seed)  # noqa: E731
    try:
        asyncio.run(run_load(base, make, 2, 1))  # warm-up
        before = metric_sums(base) if srr else {}
        seq, _ = asyncio.run(run_load(base, make, args.requests, 1))
        after = metric_sums(base) if srr else {}
        res = {"startup_s": startup, "p50_s": statistics.median(seq),
               "p95_s": sorted(seq)[max(0, int(0.95 * len(seq)) - 1)]}
        for clients in (8, 32):
            _, rps = asyncio.run(run_load(base, make, max(args.requests, clients * 2), clients))
            res[f"rps_{clients}"] = rps
        res["peak_rss_mb"] = tree.stop() / 2**20
        if srr:
            n = after["srr_request_seconds_count"] - before["srr_request_seconds_count"]
            for part in ("generation", "capture", "scoring"):
                key = f"srr_{part}_seconds_sum"
                res[f"{part}_ms"] = 1000 * (after[key] - before[key]) / n
        return res
    finally:
        tree.stop()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(args) -> int:
    from vllm.platforms import current_platform

    from ranker import models
    from ranker.engine import cpu_flags, resolve_dtype

    model_dir = Path(args.model_dir) if args.model_dir else models.prepare()
    # The dtype `srr serve` resolves `auto` to, given to plain vLLM too: same arithmetic.
    dtype = resolve_dtype("auto", current_platform.is_cpu(), cpu_flags())
    model = model_dir.name
    common = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    plain_env = {**common, "SRR_CAPTURE_LAYERS": ""}
    port = args.port
    results = {
        "plain": measure("plain", [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                   "--model", str(model_dir), "--port", str(port),
                                   "--max-model-len", "4096", "--served-model-name", model,
                                   "--dtype", dtype],
                         port, plain_env, model, args),
        "srr": measure("srr", [sys.executable, "-m", "server.cli", "serve", "--port",
                               str(port + 1), "--max-candidates", str(max(16, args.k))],
                       port + 1, common, model, args),
    }
    p, s = results["plain"], results["srr"]
    results["ratio"] = {k: s[k] / p[k] for k in ("p50_s", "p95_s", "rps_8", "rps_32", "peak_rss_mb")}
    results["config"] = {"k": args.k, "max_tokens": args.tokens, "requests": args.requests,
                         "seed": args.seed, "cpus": os.cpu_count(), "model": model,
                         "dtype": dtype}
    print(f"{'':14}{'plain vLLM':>12}{'SRR':>12}{'SRR/plain':>11}")
    for key, label in (("p50_s", "p50 (s)"), ("p95_s", "p95 (s)"), ("rps_8", "req/s @8"),
                       ("rps_32", "req/s @32"), ("peak_rss_mb", "peak RSS MB"),
                       ("startup_s", "startup (s)")):
        ratio = results["ratio"].get(key)
        print(f"{label:14}{p[key]:12.3f}{s[key]:12.3f}{'' if ratio is None else f'{ratio:11.3f}'}")
    print(f"SRR split per request: generation {s['generation_ms']:.1f} ms, "
          f"capture {s['capture_ms']:.2f} ms, scoring {s['scoring_ms']:.2f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
