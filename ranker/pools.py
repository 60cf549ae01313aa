"""Candidate pools sampled by the serving model through the serving path, cached on disk.

A pool is what the server would see for one request: K candidates sampled at temperature
1.0, each with the pooled states the capture hook recorded during generation (no second
pass). Training lists and the end-to-end evaluation are both built from pools.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

Candidate = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # text, instruction, mean, last [L, H]


def load(cache: Path) -> dict[str, list[Candidate]]:
    store: dict[str, list[Candidate]] = {}
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:  # each z[...] reads the whole array
            meta = json.loads(str(z["meta"]))
            instr, mean, last = z["instr"], z["mean"], z["last"]
        for i, (p, texts) in enumerate(meta.items()):
            store[p] = [(t, instr[i, j], mean[i, j], last[i, j]) for j, t in enumerate(texts)]
    return store


def save(store: dict[str, list[Candidate]], cache: Path) -> None:
    keys = list(store)
    if not keys:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, meta=json.dumps({p: [c[0] for c in store[p]] for p in keys}),
             **{n: np.stack([[c[i].astype(np.float16) for c in store[p]] for p in keys])
                for i, n in ((1, "instr"), (2, "mean"), (3, "last"))})
    tmp.rename(cache)


async def sample(engine, prompts: list[str], k: int, max_tokens: int, cache: Path,
                 max_prompt_tokens: int = 1024, concurrency: int = 8,
                 save_every: int = 100) -> dict[str, list[Candidate]]:
    """prompt -> k candidates. Prompts longer than max_prompt_tokens are left out (absent).
    Saved every `save_every` new pools, so an interrupted run resumes where it stopped."""
    from tqdm.asyncio import tqdm_asyncio
    from vllm import SamplingParams

    store = load(cache)
    todo = [p for p in dict.fromkeys(prompts) if p not in store]
    sem = asyncio.Semaphore(concurrency)
    new = 0

    async def one(p: str) -> None:
        nonlocal new
        async with sem:
            ids = engine.prompt_ids([{"role": "user", "content": p}])
            if len(ids) > max_prompt_tokens or len(ids) + max_tokens > engine.context_length:
                return
            gen = await engine.generate(ids, SamplingParams(n=k, max_tokens=max_tokens, temperature=1.0))
            store[p] = [(c.text, c.features.instruction, c.features.mean, c.features.last)
                        for c in gen.candidates]
            new += 1
            if new % save_every == 0:
                save(store, cache)

    if todo:
        await tqdm_asyncio.gather(*(one(p) for p in todo), desc=f"pools {cache.stem}")
        save(store, cache)
    return store


def pick(scorer, pool: list[Candidate], k: int) -> tuple[int, float]:
    """What the server does with the first k candidates of a pool: the index of the best score
    and its calibrated probability (pools hold ranker.featurize.ABLATION_LAYERS)."""
    from ranker.featurize import ABLATION_LAYERS
    from ranker.features import Features

    cfg = scorer.config
    pairs = [Features(ABLATION_LAYERS, *(a.astype(np.float32) for a in c[1:]), response_rows=0)
             .select(cfg.layers, cfg.pooling) for c in pool[:k]]
    scores, probs = scorer.score(pairs[0][0], np.stack([r for _, r in pairs]))
    best = int(np.argmax(scores))
    return best, float(probs[best])


def outcome(best_prob: np.ndarray, best_ok: np.ndarray, threshold: float,
            fallback_ok: bool) -> dict[str, float]:
    """Per prompt the best candidate's probability and whether it is acceptable -> the share
    of prompts served an acceptable answer when the fallback fires below `threshold` (its
    answer counting as `fallback_ok`), and how often it fires."""
    fb = np.asarray(best_prob) < threshold
    return {"served": float(np.where(fb, fallback_ok, best_ok).mean()),
            "fallback_rate": float(fb.mean())}
