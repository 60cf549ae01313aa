"""Candidate pools sampled by the serving model through the serving path, cached on disk.

A pool is what the server would see for one request: K candidates sampled at temperature
1.0, each with the pooled states the capture hook recorded during generation (no second
pass). Training lists and the end-to-end evaluation are both built from pools, and both
replay the server's decision on them with `ranker.policy` (`pick`, `outcome`).
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ranker import policy
from ranker.engine import Candidate
from ranker.features import Features, stack
from ranker.policy import Policy

Pool = list[Candidate]  # features float16, as on disk; no token ids


def load(cache: Path) -> dict[str, Pool]:
    store: dict[str, Pool] = {}
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:  # each z[...] reads the whole array
            meta = json.loads(str(z["meta"]))
            instr, mean, last, layers = z["instr"], z["mean"], z["last"], z["layers"].tolist()
            prefixes = z["prefixes"] if "prefixes" in z else None  # pools sampled since 0.9.0
            rows = z["rows"] if "rows" in z else np.zeros(instr.shape[:2], dtype=int)  # older files: none
        for i, (p, texts) in enumerate(meta.items()):
            store[p] = [Candidate(j, t, [], None, Features(
                layers, instr[i, j], mean[i, j], last[i, j], int(rows[i, j]),
                None if prefixes is None else prefixes[i, j]))
                for j, t in enumerate(texts)]
    return store


def sampled_tokens(c: Candidate) -> int:
    """A cached candidate's sampled tokens (pool files keep no ids): the response rows its
    capture fed, and the last token, sampled but never fed (test_capture checks the rows are
    the tokens less one). Exact, where encoding the text again may split a token."""
    return c.features.response_rows + 1


def save(store: dict[str, Pool], cache: Path) -> None:
    keys = list(store)
    if not keys:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    array = lambda name: np.stack([[getattr(c.features, name).astype(np.float16) for c in store[p]]  # noqa: E731
                                   for p in keys])
    # A store with any pool sampled before prefixes were captured keeps none.
    with_prefixes = all(c.features.prefixes is not None for p in keys for c in store[p])
    np.savez(tmp, meta=json.dumps({p: [c.text for c in store[p]] for p in keys}),
             layers=np.array(store[keys[0]][0].features.layers),
             instr=array("instruction"), mean=array("mean"), last=array("last"),
             rows=np.array([[c.features.response_rows for c in store[p]] for p in keys]),
             **({"prefixes": array("prefixes")} if with_prefixes else {}))
    tmp.rename(cache)


async def sample(engine, prompts: list[str], k: int, max_tokens: int, cache: Path,
                 max_prompt_tokens: int = 1024, concurrency: int = 8,
                 save_every: int = 100, system: str | None = None) -> dict[str, Pool]:
    """prompt -> k candidates, under `system` as the system prompt if given (the server's
    resample fallback). Prompts longer than max_prompt_tokens are left out (absent).
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
            ids = engine.prompt_ids([{"role": "system", "content": system}] * bool(system)
                                    + [{"role": "user", "content": p}])
            if len(ids) > max_prompt_tokens or len(ids) + max_tokens > engine.context_length:
                return
            gen = await engine.generate(ids, SamplingParams(n=k, max_tokens=max_tokens, temperature=1.0))
            # float16 in memory as on disk: a run that samples a pool must train on the same
            # numbers as a rerun that loads it (the rounding alone moved the chosen threshold)
            for c in gen.candidates:
                c.features = c.features.astype(np.float16)
            store[p] = gen.candidates
            new += 1
            if new % save_every == 0:
                save(store, cache)

    if todo:
        await tqdm_asyncio.gather(*(one(p) for p in todo), desc=f"pools {cache.stem}")
        save(store, cache)
    # The cache may hold more prompts (a larger run's): only those asked for.
    return {p: store[p] for p in dict.fromkeys(prompts) if p in store}


def refusal_openings(refusals: list[str], words: int = 8) -> list[str]:
    """Topic-free openings of real refusals: each refusal's text up to the end of the last
    refusal phrase among its first `words` words ("I'm sorry, but I cannot"), so the
    opening names no other prompt's topic. Refusals that open with something else (a
    jailbreak persona's name) are left out."""
    from ranker.training.judges import refusal_phrases

    out = set()
    for r in refusals:
        head = " ".join(r.split()[:words])
        ends = refusal_phrases(head)
        if ends and ends[0].start() == 0:
            out.add(head[:ends[-1].end()])
    return sorted(out)


async def prefilled(engine, prompts: list[str], openings: list[str], per_prompt: int,
                    max_tokens: int, cache: Path, seed: int = 0,
                    max_prompt_tokens: int = 1024, save_every: int = 100) -> dict[str, list[str]]:
    """prompt -> `per_prompt` refusals in the serving model's own words, on the prompt's topic:
    the assistant turn starts with a seeded real refusal opening and the model continues it.

    The default model almost never refuses (docs/evaluation.md), so without this the only
    refusals in its lists are other prompts' (off-topic): a scorer then learns "an on-topic
    refusal is always right", and ranks refusals first on benign prompts. Cached as JSON,
    texts only: features come from the encode path, with the whole text as the response.
    Saved every `save_every` new prompts; each prompt's openings are seeded by the prompt, so
    a resumed run draws what an uninterrupted one would."""
    from tqdm.asyncio import tqdm_asyncio
    from vllm import SamplingParams

    store: dict[str, list[str]] = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [p for p in dict.fromkeys(prompts) if p not in store]
    plan = {p: random.Random(f"{seed}\x00{p}").sample(openings, per_prompt) for p in todo}
    # One sequence each: many in flight, or the engine's batches run nearly empty.
    sem = asyncio.Semaphore(64)
    done = 0

    def save() -> None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(store))
        tmp.rename(cache)

    async def one(p: str) -> None:
        async with sem:
            ids = engine.prompt_ids([{"role": "user", "content": p}])
            if len(ids) > max_prompt_tokens:
                return
            gens = await asyncio.gather(*(engine.generate(
                ids + engine.tokenizer.encode(head, add_special_tokens=False),
                SamplingParams(n=1, max_tokens=max_tokens, temperature=1.0)) for head in plan[p]))
            store[p] = [head + gen.candidates[0].text for head, gen in zip(plan[p], gens)]
            nonlocal done
            done += 1
            if done % save_every == 0:
                save()

    if todo:
        await tqdm_asyncio.gather(*(one(p) for p in todo), desc=f"prefilled {cache.stem}")
        save()
    return store


@dataclass
class Pick:
    """What the server sees of one pool's first k candidates."""

    prompt: str
    scores: list[float]
    probabilities: list[float]

    @property
    def best(self) -> int:
        return policy.rank(self.scores)[0]

    @property
    def best_probability(self) -> float:
        return self.probabilities[self.best]


def pick(scorer, prompt: str, pool: Pool, k: int) -> Pick:
    """The scorer's scores for the first k candidates of a pool, as the server computes them."""
    cfg = scorer.config
    return Pick(prompt, *scorer.score(*stack([c.features for c in pool[:k]], cfg.layers, cfg.pooling)))


def replay(picks: list[Pick], best_ok: list[bool], rule: Policy, fallback_ok: bool) -> np.ndarray:
    """The server's decision replayed per pool: rows of (served answer acceptable, fallback
    fired). `best_ok`: whether each pool's best candidate is acceptable; a fallback refusal
    counts as `fallback_ok`."""
    return np.array([policy.replay(rule, p.scores, p.probabilities, ok, fallback_ok)
                     for p, ok in zip(picks, best_ok)], dtype=float).reshape(-1, 2)


def outcome(picks: list[Pick], best_ok: list[bool], rule: Policy, fallback_ok: bool) -> dict[str, float]:
    """The share of prompts served an acceptable answer, and how often the fallback fires."""
    served, fired = replay(picks, best_ok, rule, fallback_ok).mean(0) if picks else (np.nan, np.nan)
    return {"served": float(served), "fallback_rate": float(fired)}
