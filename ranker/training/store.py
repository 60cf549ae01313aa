"""Features for (prompt, response) pairs through the serving engine's encode path, cached.

Training uses exactly the engine, hook and pooling the server uses (ranker.engine.Engine), so
train and serve features are the same by construction. Features are cached on disk per model
and layer set, so reruns only encode what is new.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ranker.features import Features

# Depths captured for training and ablations, as fractions of the model's layers: bottom
# quarter (the paper), middle, ~60% depth (Language Ranker), and deeper. On SmolLM2-135M's
# 30 layers: 4, 7, 11, 15, 18, 22, 26.
SWEEP_DEPTHS = (0.13, 0.23, 0.37, 0.5, 0.6, 0.73, 0.87)
MAX_PROMPT_TOKENS = 1024
MAX_RESPONSE_TOKENS = 256  # like a generation with max_tokens=256


def sweep_layers(n_layers: int) -> list[int]:
    """The layers of the sweep for a model of n_layers (distinct, in order)."""
    return sorted({min(n_layers - 1, round(d * n_layers)) for d in SWEEP_DEPTHS})


def pair_key(prompt: str, response: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()[:32]


class FeatureStore:
    """One .npz per model and layer set: key -> Features, float16 (as on disk)."""

    def __init__(self, path: Path, layers: list[int]):
        self.path = path
        self.layers = layers
        self.items: dict[str, Features] = {}
        if path.exists():
            with np.load(path) as z:  # each z[...] reads the whole array: read each once
                keys, instr, mean, last, rows = (z[n] for n in ("keys", "instr", "mean", "last", "rows"))
            for i, k in enumerate(keys):
                self.items[str(k)] = Features(layers, instr[i], mean[i], last[i], int(rows[i]))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        feats = list(self.items.values())
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(self.items)),
                 instr=np.stack([f.instruction for f in feats]),
                 mean=np.stack([f.mean for f in feats]),
                 last=np.stack([f.last for f in feats]),
                 rows=np.array([f.response_rows for f in feats]))
        tmp.rename(self.path)

    def get(self, key: str) -> Features:
        """As stored (float16): `Features.select` gives the scorer float32 of the layers it reads."""
        return self.items[key]

    def put(self, key: str, feats: Features) -> None:
        self.items[key] = feats.astype(np.float16)


def truncate(tokenizer, response: str) -> str:
    ids = tokenizer.encode(response, add_special_tokens=False)
    return response if len(ids) <= MAX_RESPONSE_TOKENS else tokenizer.decode(ids[:MAX_RESPONSE_TOKENS])


async def encode_pairs(engine, pairs: list[tuple[str, str]], store: FeatureStore,
                       concurrency: int = 32, save_every: int = 200) -> None:
    """Encode every (prompt, response) pair not yet in the store (keys: `pair_key`).

    Prompts are single user turns under the model's chat template, as the server sees them.
    Pairs whose prompt exceeds MAX_PROMPT_TOKENS are skipped (absent from the store).
    """
    todo = [(p, r, pair_key(p, r)) for p, r in dict.fromkeys(pairs)]
    todo = [t for t in todo if t[2] not in store.items]
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(todo), desc="encode", disable=not todo)

    async def one(prompt: str, response: str, key: str) -> None:
        async with sem:
            ids = engine.prompt_ids([{"role": "user", "content": prompt}])
            if len(ids) <= MAX_PROMPT_TOKENS:
                (feats,) = await engine.encode(ids, [truncate(engine.tokenizer, response)])
                store.put(key, feats)
            bar.update(1)
            if bar.n % save_every == 0:
                store.save()

    await asyncio.gather(*(one(*t) for t in todo))
    bar.close()
    if todo:
        store.save()
