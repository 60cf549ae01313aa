"""`srr bench`: plain vLLM against the SRR server, same model, same requests, one run.

Both servers are started in turn on loopback: vLLM's own OpenAI server (`n=K`) and
`srr serve` (`srr.candidates=K`, one returned).

The default workload asks for K candidates of a fixed length (`ignore_eos`, `max_tokens`) so
both sides generate the same tokens. Printed: p50/p95 latency of sequential requests,
requests/s with 8 and 32 concurrent clients, peak resident memory of the whole process tree,
and SRR's split of a request into generation, capture and scoring time (its own metrics).

`--workload mixed` measures pruning: benign (XSTest safe) and harmful (AdvBench) requests,
alternating, up to `--tokens` each without `ignore_eos`, sequential, against plain vLLM with
`n=K` and SRR with `srr.prune` off and on (one SRR server). Printed: tokens generated, p50
latency, the streaming time to first token on benign requests, and the time to the fallback
on harmful requests that end in it.

`--workload decision` measures what SRR adds once the candidates exist, without an engine:
per request, the captured states stacked, scored with every head (`BatchScorer`, as served)
and decided (`policy.decide`), and a guard look (the prefix head on partial states), for
each shipped scorer at K = 1..16, on states drawn around the scorer's training statistics.
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


def mixed_prompts(n: int) -> list[tuple[str, bool]]:
    """n requests, (text, harmful), benign and harmful alternating (seeded, held out)."""
    from ranker.training import data
    from ranker.training.dataset import advbench_sets

    benign = [p.text for p in data.load_xstest_prompts() if not p.harmful]
    harmful = advbench_sets(n)[0]
    return [(benign[i // 2], False) if i % 2 == 0 else (harmful[i // 2], True) for i in range(n)]


async def one(http: httpx.AsyncClient, b: dict, stream: bool = False) -> dict:
    """One request: its latency, completion tokens and srr object; streamed, also the time
    to its first content chunk."""
    t = time.perf_counter()
    if not stream:
        r = await http.post("/v1/chat/completions", json=b)
        r.raise_for_status()
        j = r.json()
        return {"s": time.perf_counter() - t, "tokens": j["usage"]["completion_tokens"], "srr": j.get("srr")}
    first, last = None, None
    async with http.stream("POST", "/v1/chat/completions",
                           json={**b, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - t
            last = chunk
    return {"s": time.perf_counter() - t, "ttft_s": first, "tokens": last["usage"]["completion_tokens"],
            "srr": last.get("srr")}


def mixed(args, model_dir: Path, model: str, plain_cmd: list[str], common: dict) -> dict:
    reqs = mixed_prompts(args.requests)
    port = args.port

    def make(text: str, i: int) -> dict:
        b = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": args.tokens,
             "temperature": 1.0}
        return b if args.seed is None else {**b, "seed": args.seed + i}

    async def series(base: str, extra: dict, stream: bool = False, which=lambda harmful: True) -> list:
        async with httpx.AsyncClient(base_url=base, timeout=900) as http:
            await one(http, {**make(reqs[0][0], 0), **extra})  # warm-up
            return [await one(http, {**make(t, i), **extra}, stream) if which(h) else None
                    for i, (t, h) in enumerate(reqs)]

    def served(cmd, port, env, runs):
        proc = start(cmd, port, env)
        try:
            return [asyncio.run(series(f"http://127.0.0.1:{port}", *run)) for run in runs]
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    (plain,) = served(plain_cmd, port, {**common, "SRR_CAPTURE_LAYERS": ""}, [({"n": args.k},)])
    k = {"candidates": args.k}
    off, on, streamed = served(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port + 1), "--max-tokens",
         str(args.tokens), "--max-candidates", str(max(16, args.k))], port + 1, common,
        [({"srr": {**k, "prune": False}},), ({"srr": {**k, "prune": True}},),
         ({"srr": {**k, "prune": True}}, True, lambda harmful: not harmful)])
    med = lambda rows: statistics.median(r["s"] for r in rows)  # noqa: E731
    tokens = lambda rows: sum(r["tokens"] for r in rows)  # noqa: E731
    benign = [i for i, (_, h) in enumerate(reqs) if not h]
    exits = [i for i, (_, h) in enumerate(reqs) if h and on[i]["srr"]["selected"] is None]
    res = {
        "requests": len(reqs), "benign": len(benign),
        "tokens": {"plain": tokens(plain), "prune_off": tokens(off), "prune_on": tokens(on)},
        "p50_s": {"plain": med(plain), "prune_off": med(off), "prune_on": med(on)},
        "decided": {d: sum(r["srr"]["decided"] == d for r in on) for d in ("exit", "commit")},
        "served_differs": sum(a["srr"]["selected"] != b["srr"]["selected"] for a, b in zip(off, on)),
        "benign_ttft_s": statistics.median(streamed[i]["ttft_s"] for i in benign),
        "benign_nonstream_s": statistics.median(off[i]["s"] for i in benign),
        "fallback_n": len(exits),
        "fallback_on_s": statistics.median(on[i]["s"] for i in exits) if exits else None,
        "fallback_off_s": statistics.median(off[i]["s"] for i in exits) if exits else None,
    }
    res["ratios"] = {
        "tokens_on_vs_off": res["tokens"]["prune_on"] / res["tokens"]["prune_off"],
        "p50_on_vs_plain": res["p50_s"]["prune_on"] / res["p50_s"]["plain"],
        "ttft_vs_nonstream": res["benign_ttft_s"] / res["benign_nonstream_s"],
        "fallback_on_vs_off": res["fallback_on_s"] / res["fallback_off_s"] if exits else None,
    }
    return res


DECISION_KS = (1, 2, 4, 8, 16)


def decision(args) -> dict:
    import numpy as np

    from ranker import policy
    from ranker.batching import BatchScorer
    from ranker.features import Features, stack
    from ranker.scorer import SRRScorer
    from server.api.config import WEIGHTS_DIR

    rng = np.random.default_rng(args.seed or 0)
    folders = [Path(args.scorer_dir)] if args.scorer_dir else \
        sorted(p.parent for p in WEIGHTS_DIR.glob("*/config.json"))
    res = {}
    for folder in folders:
        scorer = SRRScorer.from_pretrained(folder)
        cfg, batch = scorer.config, BatchScorer(scorer)
        served = policy.Policy(threshold=cfg.threshold)
        prefix_rule = policy.PrefixRule(**next(iter(cfg.prefix_rules.values()))) if cfg.prefix_rules else None
        mean, std = scorer.feat_mean.numpy(), scorer.feat_std.numpy()
        shape = (len(cfg.layers), cfg.hidden_size)
        draw = lambda: (mean + std * rng.standard_normal(mean.shape)).astype(np.float32).reshape(shape)  # noqa: E731

        async def one(feats, partial: bool) -> float:
            t0 = time.perf_counter()
            scores, probs, _ = await batch.score(*stack(feats, cfg.layers, cfg.pooling), partial)
            if partial:  # the guard's rule at the first checkpoint, every candidate running
                policy.guard(prefix_rule, served, scores, probs, range(len(feats)))
            else:
                policy.decide(served, scores, probs, len(feats))
            return time.perf_counter() - t0

        async def series(k: int, partial: bool) -> list[float]:
            instruction = draw()
            feats = [Features(cfg.layers, instruction, m, m, 64) for m in (draw() for _ in range(k))]
            for _ in range(20):  # warm-up
                await one(feats, partial)
            return [await one(feats, partial) for _ in range(args.requests)]

        rows = {}
        looks = (("decide", False), ("guard look", True)) if prefix_rule else (("decide", False),)
        for k in DECISION_KS:
            for name, partial in looks:
                t = asyncio.run(series(k, partial))
                rows[f"{name}/{k}"] = {"p50_ms": 1e3 * statistics.median(t),
                                       "p99_ms": 1e3 * statistics.quantiles(t, n=100, method="inclusive")[98]}
        res[f"{cfg.name}@{cfg.version}"] = rows
    return res


def report_decision(res: dict, config: dict, out: str) -> int:
    print(f"decision cost per request (ms), {config['requests']} requests each, "
          f"torch threads {config['torch_threads']}")
    for scorer, rows in res.items():
        print(f"{scorer}\n{'':20}" + "".join(f"{'K=' + str(k):>14}" for k in DECISION_KS))
        for name in ("decide", "guard look"):
            if f"{name}/1" in rows:
                print(f"{name + ' p50/p99':20}" + "".join(
                    f"{rows[f'{name}/{k}']['p50_ms']:7.2f}/{rows[f'{name}/{k}']['p99_ms']:<6.2f}"
                    for k in DECISION_KS))
    return write({"decision": res, "config": config}, out)


def main(args) -> int:
    if args.workload == "decision":
        import torch

        config = {"requests": args.requests, "seed": args.seed, "cpus": os.cpu_count(),
                  "torch_threads": torch.get_num_threads(), "workload": "decision"}
        return report_decision(decision(args), config, args.out)
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
    plain_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                 "--port", str(port), "--max-model-len", "4096", "--served-model-name", model,
                 "--dtype", dtype]
    config = {"k": args.k, "max_tokens": args.tokens, "requests": args.requests, "seed": args.seed,
              "cpus": os.cpu_count(), "model": model, "dtype": dtype, "workload": args.workload}
    if args.workload == "mixed":
        return report_mixed({**mixed(args, model_dir, model, plain_cmd, common), "config": config}, args.out)
    results = {
        "plain": measure("plain", plain_cmd, port, plain_env, model, args),
        "srr": measure("srr", [sys.executable, "-m", "server.cli", "serve", "--port",
                               str(port + 1), "--max-candidates", str(max(16, args.k))],
                       port + 1, common, model, args),
    }
    p, s = results["plain"], results["srr"]
    results["ratio"] = {k: s[k] / p[k] for k in ("p50_s", "p95_s", "rps_8", "rps_32", "peak_rss_mb")}
    results["config"] = config
    print(f"{'':14}{'plain vLLM':>12}{'SRR':>12}{'SRR/plain':>11}")
    for key, label in (("p50_s", "p50 (s)"), ("p95_s", "p95 (s)"), ("rps_8", "req/s @8"),
                       ("rps_32", "req/s @32"), ("peak_rss_mb", "peak RSS MB"),
                       ("startup_s", "startup (s)")):
        ratio = results["ratio"].get(key)
        print(f"{label:14}{p[key]:12.3f}{s[key]:12.3f}{'' if ratio is None else f'{ratio:11.3f}'}")
    print(f"SRR split per request: generation {s['generation_ms']:.1f} ms, "
          f"capture {s['capture_ms']:.2f} ms, scoring {s['scoring_ms']:.2f} ms")
    return write(results, args.out)


def report_mixed(res: dict, out: str) -> int:
    print(f"mixed workload: {res['requests']} requests ({res['benign']} benign), K={res['config']['k']}, "
          f"up to {res['config']['max_tokens']} tokens")
    print(f"{'':22}{'plain vLLM':>12}{'prune off':>12}{'prune on':>12}")
    for key, label, fmt in (("tokens", "tokens generated", "12.0f"), ("p50_s", "p50 latency (s)", "12.3f")):
        v = res[key]
        print(f"{label:22}{v['plain']:{fmt}}{v['prune_off']:{fmt}}{v['prune_on']:{fmt}}")
    r = res["ratios"]
    print(f"tokens on/off {r['tokens_on_vs_off']:.3f}; p50 on/plain {r['p50_on_vs_plain']:.3f}; "
          f"early exits {res['decided']['exit']}, commits {res['decided']['commit']}; "
          f"served answer differs on/off {res['served_differs']} of {res['requests']}")
    print(f"benign stream: first token {res['benign_ttft_s']:.3f} s vs {res['benign_nonstream_s']:.3f} s "
          f"whole ({r['ttft_vs_nonstream']:.3f})")
    if res["fallback_n"]:
        print(f"harmful requests ending in the fallback ({res['fallback_n']}): {res['fallback_on_s']:.3f} s "
              f"pruned vs {res['fallback_off_s']:.3f} s not ({r['fallback_on_vs_off']:.3f})")
    return write(res, out)


def write(results: dict, out: str) -> int:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
