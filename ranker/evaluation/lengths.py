"""`srr eval --lengths 64 256`: does the scorer's judgement hold at the response lengths users
ask for? The evaluation sets' pools are sampled at each length (16 candidates per prompt,
cached beside `srr eval`'s, which shares the 64-token ones), and each set's K=8 decision is
replayed at each length on the same prompts: first sample, SRR pick, what is served, the
fallback, and the served pick's P(acceptable), which is what the threshold reads. The paired
difference between the last and the first length is over the same prompts.

It needs no training pools, only the engine, the scorer and the harm judge (fitted on the
labelled text, as in `srr eval`), so it runs on any model in minutes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ranker.evaluation.evaluate import POOL_K, acceptable, evaluation_sets, pool_path
from ranker.policy import Policy
from ranker.scorer import SRRScorer
from ranker.training import pools
from ranker.training.dataset import SEED, fit_harm_judge, labelled_records, start_engine
from ranker.training.render import lengths_md
from ranker.training.stats import bootstrap_interval

K = 8  # the server's default


def at_length(scorer: SRRScorer, store: dict, prompts: list[str], ok_fn,
              harmful: bool) -> tuple[dict, np.ndarray]:
    """One set at one length: its K=8 outcome, and per prompt whether the served answer was
    acceptable."""
    picks = [pools.pick(scorer, p, store[p], K) for p in prompts]
    ok = [ok_fn(p, [c.text for c in store[p][:K]]) for p in prompts]
    best_ok = [o[pk.best] for o, pk in zip(ok, picks)]
    served = pools.replay(picks, best_ok, Policy(scorer.config.threshold), harmful)
    return {"first": float(np.mean([o[0] for o in ok])), "srr": float(np.mean(best_ok)),
            "served": float(served[:, 0].mean()), "served_ci90": bootstrap_interval(served[:, 0], seed=SEED),
            "fallback_rate": float(served[:, 1].mean()),
            "served_probability": float(np.mean([pk.best_probability for pk in picks])),
            "tokens": float(np.mean([pools.sampled_tokens(c)
                                     for p in prompts for c in store[p][:K]])),
            "n": len(prompts)}, served[:, 0]


async def run(model_dir: Path, scorer_dir: Path, out: Path, cache_dir: Path, n_advbench: int,
              n_xstest: int, n_rho: int | None, lengths: list[int]) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    scorer = SRRScorer.from_pretrained(scorer_dir)
    named = evaluation_sets(n_advbench, n_xstest, n_rho)
    engine = await start_engine(cache_dir, model_dir)
    try:
        stores = {n: {key: await pools.sample(engine, ps, POOL_K, n, pool_path(cache_dir, model_dir, name, POOL_K, n),
                                              max_prompt_tokens=4096)
                      for key, (name, ps, _) in named.items()} for n in lengths}
    finally:
        engine.shutdown()
    harm = fit_harm_judge(labelled_records(scorer.config.training.get("scale", 1.0)))
    sets = {}
    for key, (_, prompts, plain_of) in named.items():
        common = [p for p in prompts if all(len(stores[n][key].get(p, ())) >= K for n in lengths)]
        ok_fn, rows, served = acceptable(harm, plain_of), {}, {}
        for n in lengths:
            rows[str(n)], served[n] = at_length(scorer, stores[n][key], common, ok_fn,
                                                plain_of is not None)
        pair = np.column_stack([served[lengths[0]], served[lengths[-1]]])
        sets[key] = {"by_length": rows, "difference": float(pair[:, 1].mean() - pair[:, 0].mean()),
                     "difference_ci90": bootstrap_interval(pair, lambda r: r[:, 1].mean() - r[:, 0].mean(), seed=SEED)}
    report = {"sets": sets,
              "config": {"scorer": f"{scorer.config.name}@{scorer.config.version}",
                         "threshold": scorer.config.threshold, "k": K, "lengths": lengths,
                         "seed": SEED, "seconds": round(time.time() - t0)}}
    (out / "lengths.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "lengths.md").write_text(lengths_md(report))
    return report
