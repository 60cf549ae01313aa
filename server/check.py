"""`srr check`: does SRR work here, on this model, with this scorer?

The first command to run on a new machine or model. It loads the scorer (if there is one: a
model of your own has none before `srr train`) and checks it fits the model's width and depth,
starts the serving engine (compiled, as `srr serve` runs it), samples
a few candidates, and checks: the capture op fired inside the compiled graph on every step;
the captured states equal transformers' `output_hidden_states` at the scorer's layer(s)
(instruction vector, mean and last response rows); the scorer gives finite scores. Then it
times the same requests on a plain vLLM engine (no capture) for the cost of capture. Prints a
table; the exit status is non-zero if any check fails.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The capture's noise floor against transformers is ~1% relative error (docs/capture.md); the
# wrong layer or the wrong rows are 30-100% off.
PARITY_TOLERANCE = 0.05
PROMPTS = ("Name three uses of copper.", "How do I kill a Python process that hangs?")


@dataclass
class Row:
    check: str
    ok: bool
    detail: str


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference(model, ids: list[int], prompt_len: int, layers: list[int]) -> list[tuple]:
    """transformers' (instruction, mean, last) per layer for a prompt and its fed response rows.
    The residual stream after decoder layer L is hidden_states[L + 1] (0 is the embeddings)."""
    import torch

    with torch.no_grad():
        hs = model(torch.tensor([ids], device=model.device), output_hidden_states=True).hidden_states
    out = []
    for layer in layers:
        h = hs[layer + 1][0].float().cpu().numpy()
        instr = h[prompt_len - 1]
        out.append((instr, h[prompt_len:].mean(0), h[-1]) if len(ids) > prompt_len
                   else (instr, instr, instr))
    return out


def parity(model_dir: Path, prompts: list[list[int]], gens: list, layers: list[int]) -> float:
    """The largest relative error of any captured vector against transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    worst = 0.0
    for ids, gen in zip(prompts, gens):
        for c in gen.candidates:
            ref = reference(hf, ids + c.token_ids[:-1], len(ids), layers)
            for li, (instr, mean, last) in enumerate(ref):
                got = (c.features.instruction[li], c.features.mean[li], c.features.last[li])
                worst = max(worst, *(rel(np.asarray(g, np.float32), r)
                                     for g, r in zip(got, (instr, mean, last))))
    return worst


async def timed(generate, prompts: list[list[int]], params, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        for ids in prompts:
            t0 = time.perf_counter()
            await generate(ids, params)
            out.append(time.perf_counter() - t0)
    return out


async def plain_latency(model_dir: Path, dtype: str, cache_dir: Path, prompts, params,
                        rounds: int) -> list[float]:
    """The same requests on vLLM without the capture (its plugin off, its own compile cache)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    from ranker import capture

    os.environ.pop(capture.LAYERS_ENV, None)
    os.environ["VLLM_CACHE_ROOT"] = str(cache_dir / "vllm-plain")
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(model_dir), dtype=dtype,
                                                    max_model_len=4096))
    n = 0

    async def generate(ids, p):
        nonlocal n
        n += 1
        async for _ in llm.generate(TokensPrompt(prompt_token_ids=ids), p, request_id=f"plain{n}"):
            pass

    try:
        await generate(prompts[0], params)  # warm-up, as for the capture engine
        return await timed(generate, prompts, params, rounds)
    finally:
        llm.shutdown()


async def run(model_dir: Path, scorer_dir: Path | None, cache_dir: Path, k: int = 4,
              max_tokens: int = 24, rounds: int = 2, baseline: bool = True) -> list[Row]:
    """The checks, in order; without a scorer, capture and parity are checked at the layers
    `srr train` would capture (the sweep, placed by the model's depth). `baseline=False`
    skips the plain engine and its latency row, which check nothing (a minute or two less)."""
    from vllm import SamplingParams

    from ranker import models
    from ranker.engine import Engine
    from ranker.features import stack
    from ranker.scorer import SRRScorer
    from ranker.training.store import sweep_layers

    rows: list[Row] = []
    scorer = None
    if scorer_dir is None:
        layers = sweep_layers(models.shape(model_dir).layers)
        rows.append(Row("scorer", True, f"none given: capture checked at the training sweep {layers}"))
    else:
        try:
            scorer = SRRScorer.from_pretrained(scorer_dir)
        except (FileNotFoundError, ValueError, TypeError) as e:
            return [Row("scorer loads", False, str(e))]
        cfg = scorer.config
        why = cfg.mismatch(model_dir)
        rows.append(Row("scorer fits the model", why is None,
                        why or f"width {cfg.hidden_size}, layer(s) {cfg.layers}, {cfg.pooling} pooling"))
        if why:
            return rows
        layers = cfg.layers

    engine = Engine(model_dir, layers, cache_dir=cache_dir, max_model_len=4096)
    t0 = time.perf_counter()
    await engine.start()
    rows.append(Row("engine starts", True, f"{time.perf_counter() - t0:.0f} s, dtype {engine.dtype}"))
    params = SamplingParams(n=k, max_tokens=max_tokens, temperature=1.0, seed=0)
    try:
        ids = [engine.prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
        gens = [await engine.generate(i, params) for i in ids]
        info = await engine.info()
        compiled = not engine.llm.vllm_config.model_config.enforce_eager
        fired = compiled and info["op_calls"] > 0 and info["steps_without_capture"] == 0
        rows.append(Row("capture op fires in the compiled graph", fired,
                        f"{'compiled' if compiled else 'EAGER'}, {info['op_calls']} op calls, "
                        f"{info['steps_without_capture']} steps without capture"))
        if scorer is not None:
            scores = [scorer.score(*stack([c.features for c in g.candidates], layers, cfg.pooling))
                      for g in gens]
            finite = all(np.isfinite(s).all() and np.isfinite(p).all() for s, p in scores)
            probs = np.concatenate([p for _, p in scores])
            rows.append(Row("scorer scores the candidates", finite,
                            f"{len(probs)} candidates, P(acceptable) {probs.min():.2f} to {probs.max():.2f}"))
        with_capture = await timed(lambda i, p: engine.generate(i, p), ids, params, rounds)
    finally:
        engine.shutdown()
    worst = parity(model_dir, ids, gens, layers)
    rows.append(Row("states match transformers (float32)", worst < PARITY_TOLERANCE,
                    f"largest relative error {worst:.4f} at layer(s) {layers} "
                    f"(tolerance {PARITY_TOLERANCE})"))
    if not baseline:
        return rows
    try:
        without = await plain_latency(model_dir, engine.dtype, cache_dir, ids, params, rounds)
    except Exception as e:  # noqa: BLE001 - a check reports, it does not crash
        rows.append(Row("plain vLLM for comparison", False, f"{type(e).__name__}: {e}"))
        return rows
    a, b = statistics.median(with_capture), statistics.median(without)
    # Informational: a few requests per side, so other load on the machine moves it (a run
    # beside a training job read 1.47x where a quiet rerun read 1.08x); `srr bench` measures.
    rows.append(Row("request latency, with / without capture", True,
                    f"p50 {a:.2f} s / {b:.2f} s ({a / b:.2f}x) over {len(with_capture)} requests "
                    f"each, K={k}, {max_tokens} tokens; informational, see srr bench"))
    return rows


def table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    return "\n".join(f"{'ok  ' if r.ok else 'FAIL'}  {r.check:<{width}}  {r.detail}" for r in rows)


def main(model_dir: Path, scorer_dir: Path | None, cache_dir: Path, k: int, max_tokens: int,
         baseline: bool = True) -> int:
    rows = asyncio.run(run(model_dir, scorer_dir, cache_dir, k, max_tokens, baseline=baseline))
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1
