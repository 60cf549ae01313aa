"""`srr diagnose risk-gate`: would a stricter rule for requests the risk head judges harmful
make the server safer, and at what cost in over-refusal? Issue 22 asks that on such a request
only a candidate judged safe be served. Replayed on `srr eval`'s cached pools (no engine): the
shipped decision; a floor on the served candidate's P(acceptable) for harmful-judged requests
(their threshold becomes max(threshold, floor)); and serving them only a candidate the refusal
head judges a refusal. Nothing of it ships."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ranker import policy
from ranker.evaluation.end_to_end import KS
from ranker.evaluation.evaluate import POOL_K, acceptable, evaluation_sets, pool_path
from ranker.features import stack
from ranker.policy import Policy
from ranker.scorer import SRRScorer
from ranker.training import pools
from ranker.training.dataset import SEED, fit_harm_judge, labelled_records
from ranker.training.render import gate_md
from ranker.training.stats import bootstrap_interval

FLOORS = (0.5, 0.7, 0.9)
RULES = ("shipped", *(f"floor {f}" for f in FLOORS), "refusal only")


def served(threshold: float, rule: str, judged_harmful: bool, scores, probs, refusing,
           ok: list[bool], fallback_ok: bool) -> bool:
    """Whether the answer served under `rule` (one of RULES) is acceptable, for one list:
    `refusing` and `ok` per candidate (the refusal head's judgement, the judges')."""
    if judged_harmful and rule.startswith("floor"):
        threshold = max(threshold, float(rule.split()[1]))
    d = policy.decide(Policy(threshold), scores, probs, len(scores))
    if not d.order:
        return fallback_ok
    if judged_harmful and rule == "refusal only" and not refusing[d.order[0]]:
        return fallback_ok
    return ok[d.order[0]]


def replay_set(scorer: SRRScorer, store: dict, prompts: list[str], ok_fn, fallback_ok: bool) -> dict:
    """One set: per rule, served acceptable at each K (K=8's 90% interval) and K=16 minus K=1."""
    cfg = scorer.config
    rows = {rule: {k: [] for k in KS} for rule in RULES}
    flagged = []
    for p in (p for p in prompts if len(store.get(p, ())) >= POOL_K):
        ok = ok_fn(p, [c.text for c in store[p][:POOL_K]])
        instruction, candidates = (torch.from_numpy(np.asarray(a, dtype=np.float32))
                                   for a in stack([c.features for c in store[p][:POOL_K]], cfg.layers, cfg.pooling))
        with torch.no_grad():
            harmful = bool(scorer.judged_harmful(scorer.risk_probability(instruction)))
            refusing = (scorer.refusal_probability(candidates) >= cfg.refusal_threshold).tolist()
        flagged.append(harmful)
        for k in KS:
            x = pools.pick(scorer, p, store[p], k)  # as the server scores the first k
            for rule in RULES:
                rows[rule][k].append(served(cfg.threshold, rule, harmful, x.scores, x.probabilities,
                                            refusing, ok, fallback_ok))
    if not flagged:  # no pool of this set was sampled for these prompts
        return {"n": 0}
    out = {"n": len(flagged), "flagged": float(np.mean(flagged))}
    for rule, by_k in rows.items():
        v = {k: np.array(x, dtype=float) for k, x in by_k.items()}
        pair = np.column_stack([v[1], v[KS[-1]]])
        out[rule] = {"by_k": {k: float(x.mean()) for k, x in v.items()},
                     "k8_ci90": bootstrap_interval(v[8], seed=SEED),
                     "trend": float(pair[:, 1].mean() - pair[:, 0].mean())}
    return out


def run(model_dir: Path, scorer_dir: Path, out: Path, cache_dir: Path, n_advbench: int, n_xstest: int,
        n_rho: int | None, max_tokens: int = 64) -> dict:
    """On the pools `srr eval` cached for these set sizes and response length (sets without
    them are left out)."""
    scorer = SRRScorer.from_pretrained(scorer_dir)
    if scorer.risk is None or scorer.refusal is None:
        raise ValueError(f"{scorer_dir}: the risk gate needs a scorer with risk and refusal heads")
    t0 = time.time()
    harm = fit_harm_judge(labelled_records(scorer.config.training.get("scale", 1.0)))
    sets = {}
    for key, (name, prompts, plain_of) in evaluation_sets(n_advbench, n_xstest, n_rho).items():
        store = pools.load(pool_path(cache_dir, model_dir, name, POOL_K, max_tokens))
        res = replay_set(scorer, store, prompts, acceptable(harm, plain_of), plain_of is not None)
        if res["n"]:
            sets[key] = res
    report = {"sets": sets, "config": {
        "scorer": f"{scorer.config.name}@{scorer.config.version}", "threshold": scorer.config.threshold,
        "risk_threshold": scorer.config.risk_threshold, "max_tokens": max_tokens, "seed": SEED,
        "seconds": round(time.time() - t0)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "risk-gate.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "risk-gate.md").write_text(gate_md(report))
    return report
