"""Ranking lists: labelled items per prompt -> one list of candidate features per prompt."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ranker.features import stack
from ranker.training import data
from ranker.training.store import FeatureStore, pair_key


GENERATED_WRITER = "self"  # the writer of the serving model's own candidates


@dataclass
class RankList:
    instruction: np.ndarray  # [D]
    candidates: np.ndarray  # [K, D]
    labels: np.ndarray  # [K], 1 = acceptable
    group: str = ""  # source / prompt kind, for reporting
    prompt_harmful: bool | None = None
    prompt: str = ""


def trainable(lists: list[RankList]) -> list[RankList]:
    return [x for x in lists if 0 < x.labels.sum() < len(x.labels)]


def acceptable(r: data.LabelledResponse) -> int | None:
    if r.prompt_harmful is False:
        return None if r.refusal is None else int(not r.refusal)
    return None if r.harmful is None else int(not r.harmful)


@dataclass
class Item:
    prompt: str
    response: str
    label: int
    prompt_harmful: bool | None
    source: str
    writer: str | None = None  # None for a borrowed refusal


def build_items(records: list[data.LabelledResponse], seed: int) -> list[Item]:
    """Labelled items per prompt, with a borrowed real refusal where a prompt lacks contrast."""
    rng = random.Random(seed)
    refusals = sorted({r.response for r in records if r.refusal is True and len(r.response) < 400
                       and r.writer != GENERATED_WRITER})
    groups: dict[str, list[data.LabelledResponse]] = defaultdict(list)
    for r in records:
        if acceptable(r) is not None:
            groups[data.normalize(r.prompt)].append(r)
    items = []
    for key in sorted(groups):
        rs = groups[key]
        labels = {acceptable(r) for r in rs}
        ph = rs[0].prompt_harmful
        for r in rs:
            items.append(Item(r.prompt, r.response, acceptable(r), r.prompt_harmful, r.source, r.writer))
        if len(labels) == 1 and refusals:
            (only,) = labels
            if only == 0 and ph is not False:  # harmful answers only: a refusal is acceptable
                items.append(Item(rs[0].prompt, rng.choice(refusals), 1, ph, rs[0].source + "+refusal"))
            elif only == 1 and ph is False:  # helpful answers only: a refusal is not
                items.append(Item(rs[0].prompt, rng.choice(refusals), 0, ph, rs[0].source + "+refusal"))
    return items


def make_lists(items: list[Item], store: FeatureStore, layers: list[int], pooling: str
               ) -> list[RankList]:
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if pair_key(it.prompt, it.response) in store.items:
            groups[it.prompt].append(it)
    out = []
    for prompt in sorted(groups):
        its = groups[prompt]
        instruction, candidates = stack([store.get(pair_key(it.prompt, it.response)) for it in its],
                                        layers, pooling)
        out.append(RankList(instruction=instruction, candidates=candidates,
                            labels=np.array([it.label for it in its]), group=its[0].source,
                            prompt_harmful=its[0].prompt_harmful, prompt=prompt))
    return out
