"""End to end on the serving model's own candidate pools: what the server returns for each
K, threshold and fallback, replayed with `ranker.policy` (through `pools.replay`)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch

from ranker import policy
from ranker.policy import Policy
from ranker.training import data, judges, pools, prefixes, risk
from ranker.training.dataset import SEED
from ranker.training.pools import Pick
from ranker.training.stats import bootstrap_interval, gap_closed

KS = (1, 2, 4, 8, 16)
THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def judge_agreement(harm: judges.HarmJudge) -> dict:
    x = data.load_xstest_completions()
    refusal_ok = [judges.is_refusal(r.response) == bool(r.refusal) for r in x]
    labelled = [r for r in x if r.harmful is not None and r.prompt_harmful]
    pred = harm.harmful([r.prompt for r in labelled], [r.response for r in labelled])
    truth = np.array([r.harmful for r in labelled])
    return {"refusal_judge_agreement": float(np.mean(refusal_ok)), "refusal_n": len(x),
            "harm_judge_agreement": float(np.mean(pred == truth)), "harm_n": len(labelled),
            "harm_judge_recall": float(pred[truth].mean()) if truth.any() else None}


def end_to_end(scorer, store, prompts, safe_fn, refusal_value: bool) -> tuple[dict, dict]:
    """Per K: share of prompts whose returned answer is acceptable under each policy; and the
    trend: served at the largest K minus served at K=1, on the same prompts (90% interval)."""
    rng = random.Random(SEED)
    rule = Policy(scorer.config.threshold)
    res = {}
    size = min(len(store[p]) for p in prompts if store.get(p))
    judged = {p: safe_fn(p, [c.text for c in store[p][:size]]) for p in prompts if store.get(p)}
    served_at = {}
    for k in (k for k in KS if k <= size):
        first, rand, srr, oracle, picks = [], [], [], [], []
        for p, ok_all in judged.items():
            ok = ok_all[:k]
            picks.append(pools.pick(scorer, p, store[p], k))
            first.append(ok[0])
            rand.append(ok[rng.randrange(k)])
            srr.append(ok[picks[-1].best])
            oracle.append(any(ok))
        res[k] = {name: float(np.mean(v)) for name, v in (
            ("first", first), ("random", rand), ("srr", srr), ("oracle", oracle))}
        res[k].update(pools.outcome(picks, srr, rule, refusal_value))
        res[k]["n"] = len(first)
        served = served_at[k] = pools.replay(picks, srr, rule, refusal_value)[:, 0]
        rows = np.column_stack([first, srr, oracle, served]).astype(float)
        res[k]["served_ci90"] = bootstrap_interval(served, seed=SEED)
        res[k]["served_minus_first_ci90"] = bootstrap_interval(
            rows, lambda r: r[:, 3].mean() - r[:, 0].mean(), seed=SEED)
        res[k]["gap_closed_ci90"] = bootstrap_interval(
            rows, lambda r: gap_closed(*r[:, :3].mean(0)), seed=SEED)
    # Does serving hold up as K grows? The same prompts at the largest K and at K=1, paired.
    last = max(served_at)
    pair = np.column_stack([served_at[1], served_at[last]])
    trend = {"k": last, "value": float(pair[:, 1].mean() - pair[:, 0].mean()),
             "ci90": bootstrap_interval(pair, lambda r: r[:, 1].mean() - r[:, 0].mean(), seed=SEED)}
    return res, trend


def best_picks(scorer, sets: dict, k: int = 8) -> dict[str, tuple[list[Pick], list[bool]]]:
    """Per set, for each prompt with a pool: the server's view of its first k candidates and
    whether the best is acceptable (judged once, shared by the threshold trade-off and the
    fallback comparison). sets: name -> (pool store, prompts, safe_fn, whether a fallback
    refusal counts as acceptable)."""
    out = {}
    for name, (store, prompts, safe_fn, _) in sets.items():
        picks = [pools.pick(scorer, p, store[p], k) for p in prompts if store.get(p)]
        out[name] = (picks, [safe_fn(x.prompt, [store[x.prompt][x.best].text])[0] for x in picks])
    return out


def tradeoff(scorer, sets: dict, picks: dict) -> dict:
    """What the server returns as the threshold moves: per set, the share of prompts served an
    acceptable answer and the fallback rate (picks: `best_picks`)."""
    return {t: {name: pools.outcome(*picks[name], Policy(t), refusal_value)
                for name, (*_, refusal_value) in sets.items()}
            for t in sorted({*THRESHOLDS, round(scorer.config.threshold, 3)})}


def by_type(picks: tuple[list[Pick], list[bool]], types: dict[str, str],
            threshold: float) -> dict[str, dict]:
    """Over-refusal per prompt type (XSTest: homonyms, historical events, ...), to show where
    it comes from: per type, how often the fallback fires, how often the pick itself refuses,
    and the share served a helpful answer (picks: one set's `best_picks`)."""
    groups: dict[str, tuple[list, list]] = {}
    for x, ok in zip(*picks):
        group = groups.setdefault(types[x.prompt], ([], []))
        group[0].append(x)
        group[1].append(ok)
    return {t: {**pools.outcome(ps, oks, Policy(threshold), False),
                "pick_refuses": float(np.mean([not ok for ok in oks])), "n": len(ps)}
            for t, (ps, oks) in sorted(groups.items())}


def resample_policy(scorer, sets: dict, picks: dict, resampled: dict, k: int = 8) -> dict:
    """The server's `resample` fallback at K=k: where no candidate is accepted (picks:
    `best_picks`), K more are sampled under the safety system prompt (`resampled` pools);
    their best is returned if accepted, else the refusal. Per set: the share of prompts
    served an acceptable answer, how often the fallback fires, how often a resampled answer
    is served, and how often the best resampled candidate is acceptable at all. Only the
    sets that have resampled pools."""
    rule = Policy(scorer.config.threshold, fallback="resample")
    out = {}
    for name in resampled:
        _, _, safe_fn, refusal_value = sets[name]
        served, fired, used, again_ok = [], [], [], []
        for x, ok in zip(*picks[name]):
            if not resampled[name].get(x.prompt):
                continue
            d = policy.decide(rule, x.scores, x.probabilities, len(x.scores))
            fired.append(d.resample)
            if not d.resample:
                served.append(ok)
                continue
            again = pools.pick(scorer, x.prompt, resampled[name][x.prompt], k)
            again_ok.append(safe_fn(x.prompt, [resampled[name][x.prompt][again.best].text])[0])
            used.append(bool(policy.resampled(rule, again.scores, again.probabilities).order))
            served.append(again_ok[-1] if used[-1] else refusal_value)
        out[name] = {"served": float(np.mean(served)), "fallback_rate": float(np.mean(fired)),
                     "resample_served_rate": float(np.sum(used) / len(served)),
                     "resample_pick_acceptable": float(np.mean(again_ok)) if again_ok else None,
                     "n": len(served)}
    return out


def flagged(scorer, stores: dict[str, dict]) -> dict[str, dict]:
    """Per set, the share of its requests the risk head judges harmful, with a 90% bootstrap
    interval (`risk.instruction_rows`)."""
    out = {}
    for name, store in stores.items():
        with torch.no_grad():
            rows = torch.from_numpy(risk.instruction_rows(scorer, {name: store})[0])
            hit = scorer.judged_harmful(scorer.risk_probability(rows)).numpy()
        out[name] = {"flagged": float(hit.mean()), "flagged_ci90": bootstrap_interval(hit, seed=SEED),
                     "n": len(hit)}
    return out


def guarded(scorer, sets: dict, k: int = 8) -> dict:
    """Pruning on against off at K=k, on the same lists (`prefixes.replay`): per set whose
    pools carry prefix means, the share served an acceptable answer each way and their paired
    difference (90% interval), the tokens generated on / off (a stopped candidate
    counts up to its checkpoint), how often the guard exited or committed, and where the two
    serve differently: per guard decision ("commit", "exit", or "pruned" for neither), the
    lists whose served answer the judges found worse, equal and better with pruning on (the
    difference is (better - worse) / n)."""
    rule = Policy(scorer.config.threshold)
    out = {}
    for name, (store, prompts, safe_fn, refusal_value) in sets.items():
        rows, tokens, decided = [], [], Counter()
        differ = {d: [0, 0, 0] for d in ("commit", "exit", "pruned")}
        for p in prompts:
            pool = (store.get(p) or [])[:k]
            if len(pool) < k or pool[0].features.prefixes is None:
                continue
            lengths = [pools.sampled_tokens(c) for c in pool]
            on = prefixes.replay(scorer, rule, [c.features for c in pool], lengths)
            x = pools.pick(scorer, p, pool, k)
            off = policy.decide(rule, x.scores, x.probabilities, k)
            ok = safe_fn(p, [c.text for c in pool])
            value = lambda i: refusal_value if i is None else bool(ok[i])  # noqa: E731
            served_off = off.order[0] if off.order else None
            rows.append((value(served_off), value(on.served)))
            if on.served != served_off:
                differ[on.decided or "pruned"][int(rows[-1][1]) - int(rows[-1][0]) + 1] += 1
            tokens.append((sum(lengths), on.tokens))
            decided[on.decided] += 1
        if not rows:
            continue
        r, t = np.array(rows, dtype=float), np.array(tokens, dtype=float)
        out[name] = {"served_off": float(r[:, 0].mean()), "served_on": float(r[:, 1].mean()),
                     "difference_ci90": bootstrap_interval(r, lambda x: x[:, 1].mean() - x[:, 0].mean(), seed=SEED),
                     "tokens_ratio": float(t[:, 1].sum() / t[:, 0].sum()),
                     "exits": decided["exit"] / len(r), "commits": decided["commit"] / len(r),
                     "served_otherwise": differ, "n": len(r)}
    return out
