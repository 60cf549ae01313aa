"""`srr prefixes`: what the guard (ranker.policy.guard) reads while candidates are generated.

1. A prefix head: a second projection and block of the scorer, initialized from the first
   and trained so that its scores of a list of partial responses (the means of their first
   8, 16, 32 tokens) match the scorer's scores of the whole responses. The scorer itself is
   unchanged (its head, calibration and threshold): a partial score means what a final one
   means, and the final decision stays what `srr eval` measured.
2. The rules: how far the judgement of a list at each prefix length was from its end, so
   that the guard stops only what would not have been served.

Label-free: what is predicted is the scorer's own final decision, from the same list's
partial states. Fitted on the serving model's pools of validation requests, sampled with
their prefix means (ranker.capture.PREFIX_TOKENS) and longer than training's, because a
served answer runs on after the last checkpoint; half the requests train the head, the
other half fit the rules, so the rules' bounds are measured on lists the head never saw.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ranker import policy
from ranker.capture import PREFIX_TOKENS
from ranker.features import Features, pad, stack
from ranker.policy import RULE_THRESHOLDS, Policy, PrefixRule, rank
from ranker.scorer import SRRScorer

ALPHA = 0.01  # each bound may be exceeded on this share of validation lists
LIST_K = 8  # the server's default K: lists of this size are cut from each pool
PROMPTS = 400  # validation requests sampled, across the training kinds: half train the head, half fit the rules
MAX_TOKENS = 128
TUNE_EPOCHS = 30
TUNE_SUBSETS = 8  # random lists drawn from each pool to train the prefix head


@torch.no_grad()
def judged(scorer: SRRScorer, lists: list[list[Features]], partial: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, probabilities) [n, K] of equal-size lists, as the server computes them."""
    cfg = scorer.config
    instr, cands, mask = pad([stack(f, cfg.layers, cfg.pooling) for f in lists])
    scores, probs, _ = scorer.judge(instr, cands, mask, partial)
    return scores.numpy(), probs.numpy()


Movements = dict[int, dict[str, np.ndarray]]  # prefix length -> measure -> a value per list


def movements(scorer: SRRScorer, lists: list[list[Features]]) -> Movements:
    """Per prefix length, per list: the prefix judgement against the final one."""
    scores, probs = judged(scorer, lists)
    rows = np.arange(len(lists))
    winner = np.array([rank(s)[0] for s in scores])
    out = {}
    for j, t in enumerate(PREFIX_TOKENS):
        s, p = judged(scorer, [[f.at_prefix(j) for f in fs] for fs in lists], partial=True)
        lead = np.array([rank(x)[0] for x in s])
        out[t] = {"winner_gap": s[rows, lead] - s[rows, winner],
                  "lost": lead != winner,
                  "prefix_p": p[rows, lead],  # the prefix leader's probability
                  "leader_final_p": probs[rows, lead],  # the same candidate's at the end
                  "served_p": probs[rows, winner]}  # what the final decision compares
    return out


def upper(x: np.ndarray, alpha: float) -> float:
    """A bound exceeded by at most a share alpha of x (the largest values beyond it)."""
    return float(np.sort(x)[::-1][int(alpha * len(x))]) if len(x) else 0.0


GRID = np.round(np.linspace(0.0, 1.0, 101), 2)


def exit_bound(prefix_p: np.ndarray, accepted: np.ndarray, alpha: float) -> float:
    """The largest e for which lists whose prefix leader was under e and whose final decision
    accepted a candidate are at most a share alpha of all lists."""
    ok = [e for e in GRID if np.sum((prefix_p < e) & accepted) <= alpha * len(prefix_p)]
    return float(max(ok))


def commit_bound(prefix_p: np.ndarray, leader_ok: np.ndarray, alpha: float) -> float:
    """The smallest c for which lists whose prefix leader was at or over c and ended under
    the threshold are at most a share alpha of all lists (above 1: never)."""
    ok = [c for c in GRID if np.sum((prefix_p >= c) & ~leader_ok) <= alpha * len(prefix_p)]
    return float(min(ok)) if ok else 1.01


def fit(moves: Movements, alpha: float = ALPHA) -> dict[str, PrefixRule]:
    """The guard's rule per prefix length (keys as in ScorerConfig.prefix_rules), from the
    `movements` of validation lists."""
    rules = {}
    for t, m in moves.items():
        rules[str(t)] = PrefixRule(
            prune_gap=upper(m["winner_gap"], alpha),
            exit_below={f"{h:.2f}": exit_bound(m["prefix_p"], m["served_p"] >= h, alpha) for h in RULE_THRESHOLDS},
            commit_above={f"{h:.2f}": commit_bound(m["prefix_p"], m["leader_final_p"] >= h, alpha)
                          for h in RULE_THRESHOLDS})
    return rules


def report(moves: Movements, rules: dict[str, PrefixRule], threshold: float) -> dict:
    """Per prefix length, on the lists the rules were fitted on: how often the prefix leader
    was the final winner, how far its probability moved by the end, how often the prefix
    and final decisions agree at the threshold, and how often the guard would exit or
    commit there at the threshold (each checkpoint alone)."""
    out = {}
    for t, m in moves.items():
        exit_below, commit_above = rules[str(t)].bounds(threshold)
        out[str(t)] = {
            "lists": len(m["lost"]), "exit_below": exit_below, "commit_above": commit_above,
            "prune_gap": rules[str(t)].prune_gap,
            "leader_is_winner": float(1 - m["lost"].mean()),
            "mean_abs_probability_change": float(np.abs(m["leader_final_p"] - m["prefix_p"]).mean()),
            "decision_agrees": float(((m["prefix_p"] >= threshold) == (m["served_p"] >= threshold)).mean()),
            "exits": float((m["prefix_p"] < exit_below).mean()),
            "commits": float((m["prefix_p"] >= commit_above).mean()),
        }
    return out


@dataclass
class Guarded:
    """One list replayed through the guard: what was served (None: the fallback), the tokens
    generated, and the guard's early decision (None, "exit" or "commit")."""

    served: int | None
    tokens: int
    decided: str | None


def replay(scorer: SRRScorer, rule: Policy, feats: list[Features], lengths: list[int],
           rules: dict[str, PrefixRule] | None = None) -> Guarded:
    """What the server does with pruning on, replayed on a list whose prefix means were
    captured: the checkpoints, verdicts and final decision of `Engine.generate` and the chat
    handler (ranker.policy.guard, then decide). `lengths`: each candidate's tokens. A stopped
    candidate keeps the states of its last checkpoint and counts the tokens up to it (in the
    server a few more are generated before the stop takes effect). `rules`: the scorer's own
    unless given."""
    rules = ({int(t): r for t, r in rules.items()} if rules is not None else
             {int(t): PrefixRule(**r) for t, r in scorer.config.prefix_rules.items()})
    k = len(feats)
    stopped: dict[int, int] = {}  # candidate -> the checkpoint (index) it was stopped at
    committed, decided = None, None
    for j, t in enumerate(PREFIX_TOKENS):
        running = [i for i in range(k) if i not in stopped and lengths[i] > t]
        if not running or committed is not None:
            break
        if t not in rules:
            continue
        s, p = judged(scorer, [[f.at_prefix(stopped.get(i, j)) for i, f in enumerate(feats)]], partial=True)
        v = policy.guard(rules[t], rule, s[0].tolist(), p[0].tolist(), running)
        stop = set(running) if v.exit else set(running) - {v.commit} if v.commit is not None else set(v.prune)
        stopped.update((i, j) for i in stop)
        if v.exit or v.commit is not None:
            decided, committed = ("exit", None) if v.exit else ("commit", v.commit)
    s, p = judged(scorer, [[f.at_prefix(stopped[i]) if i in stopped else f for i, f in enumerate(feats)]])
    d = policy.decide(rule, s[0].tolist(), p[0].tolist(), k, stopped=list(stopped), committed=committed)
    tokens = sum(min(n, PREFIX_TOKENS[stopped[i]] + 1) if i in stopped else n for i, n in enumerate(lengths))
    return Guarded(d.order[0] if d.order else None, tokens, decided)


def lists_of(pools: dict[str, list], k: int = LIST_K, of=lambda c: c.features) -> list[list]:
    """Each pool cut into lists of k candidates (a 16-candidate pool gives two), each
    candidate as `of` gives it (its features unless told)."""
    return [[of(c) for c in pool[i:i + k]] for pool in pools.values()
            for i in range(0, len(pool) - k + 1, k)]


SWEEP = (0.01, 0.02, 0.05, 0.10)


def sweep(scorer: SRRScorer, lists: list[list[Features]], lengths: list[list[int]],
          alphas: tuple[float, ...] = SWEEP) -> dict:
    """What ALPHA trades, per alpha: the rules fitted on `lists` and replayed on them with the
    scorer's prefix head. The share of lists the guard exits and commits on, tokens generated
    with the guard against without, and how often it serves the candidate that pruning off
    serves and makes the same serve-or-fallback decision. In-sample (the rules are fitted on
    the lists they are replayed on), so the savings are what a workload like these lists gets
    at best."""
    rule = Policy(scorer.config.threshold)
    moves = movements(scorer, lists)
    scores, probs = judged(scorer, lists)
    off = [policy.decide(rule, s.tolist(), p.tolist(), len(s)).order for s, p in zip(scores, probs)]
    off = [o[0] if o else None for o in off]
    out = {}
    for alpha in alphas:
        rules = fit(moves, alpha)
        on = [replay(scorer, rule, f, n, rules) for f, n in zip(lists, lengths)]
        out[f"{alpha:.2f}"] = {
            "exits": float(np.mean([g.decided == "exit" for g in on])),
            "commits": float(np.mean([g.decided == "commit" for g in on])),
            "tokens_ratio": sum(g.tokens for g in on) / sum(map(sum, lengths)),
            "same_served": float(np.mean([g.served == o for g, o in zip(on, off)])),
            "same_decision": float(np.mean([(g.served is None) == (o is None) for g, o in zip(on, off)])),
            "lists": len(lists)}
    return out


def tune(scorer: SRRScorer, pools: dict[str, list], epochs: int = TUNE_EPOCHS, seed: int = 0) -> SRRScorer:
    """The scorer with a prefix head trained on `pools` (see the module doc): on random
    LIST_K-subsets of each pool, the head's scores of the list at every prefix length (and
    whole, as a response shorter than a prefix is) regress on the scorer's scores of the
    whole list. Only the head trains."""
    rng, cfg = random.Random(seed), scorer.config
    torch.manual_seed(seed)
    lists = [[pool[i].features for i in rng.sample(range(len(pool)), LIST_K)]
             for pool in pools.values() if len(pool) >= LIST_K for _ in range(TUNE_SUBSETS)]
    model = SRRScorer(replace(cfg, prefix_head=True))
    model.load_state_dict(scorer.state_dict(), strict=False)
    model.prefix_proj.load_state_dict(scorer.proj.state_dict())
    model.prefix_block.load_state_dict(scorer.block.state_dict())
    head = [p for name, p in model.named_parameters() if name.startswith("prefix_")]
    instr, full, mask = pad([stack(f, cfg.layers, cfg.pooling) for f in lists])
    with torch.no_grad():
        target = scorer.eval()(instr, full, mask)
    views = [full] + [pad([stack([f.at_prefix(j) for f in fs], cfg.layers, cfg.pooling) for fs in lists])[1]
                      for j in range(len(PREFIX_TOKENS))]
    opt = torch.optim.Adam(head, lr=1e-4)
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(len(lists)).split(64):
            loss = sum(F.mse_loss(model(instr[b], v[b], mask[b], partial=True), target[b]) for v in views)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def refusal_by_prefix(scorer: SRRScorer, pools: dict[str, list]) -> dict[str, dict] | None:
    """How well the refusal head, which the guard ranks with, reads a refusal from each prefix
    and from the whole response: AUROC (None without both classes) and accuracy against the
    refusal judge on the whole text. None without a refusal head."""
    from ranker.training.judges import is_refusal
    from ranker.training.stats import auroc

    if scorer.refusal is None:
        return None
    cfg, cands = scorer.config, [c for pool in pools.values() for c in pool]
    truth = np.array([is_refusal(c.text) for c in cands])
    out = {}
    for j, name in [*enumerate(map(str, PREFIX_TOKENS)), (None, "whole")]:
        feats = [c.features if j is None else c.features.at_prefix(j) for c in cands]
        p = scorer.refusal_probability(torch.from_numpy(stack(feats, cfg.layers, cfg.pooling)[1])).numpy()
        out[name] = {"auroc": auroc(p, truth) if 0 < truth.sum() < len(truth) else None,
                     "accuracy": float(np.mean((p >= cfg.refusal_threshold) == truth))}
    return {"by_prefix": out, "candidates": len(cands), "refusals": float(truth.mean())}


def halves(store: dict[str, list]) -> tuple[dict[str, list], dict[str, list]]:
    """The pools in two halves, alternately in the order of a hash of their request:
    (train the head, fit the rules)."""
    order = sorted(store, key=lambda p: zlib.crc32(p.encode()))
    return {p: store[p] for p in order[0::2]}, {p: store[p] for p in order[1::2]}


def requests(n: int = PROMPTS, seed: int = 0) -> list[str]:
    """n validation requests, as many from each training kind as it has (seeded)."""
    from ranker.training import data
    from ranker.training.dataset import SEED, SPLIT, training_requests

    kinds = training_requests()
    rng = random.Random(seed)
    per_kind = -(-n // len(kinds))
    out = []
    for ps in kinds.values():
        val = data.split_by_prompt(ps, seed=SEED, fractions=SPLIT)[1]
        out += [p.text for p in rng.sample(val, min(per_kind, len(val)))]
    return out[:n]


async def run(model_dir: Path, scorer_dir: Path, cache_dir: Path, n: int = PROMPTS,
              max_tokens: int = MAX_TOKENS, alpha: float = ALPHA, sweep_only: bool = False) -> dict:
    """`srr prefixes`: sample the pools (cached), fit the rules, write them into the scorer's
    config and the report beside it (prefixes.json). `sweep_only`: write nothing, return the
    `sweep` of ALPHA on the rule-fitting lists with the scorer's prefix head."""
    from ranker.training import pools
    from ranker.training.dataset import start_engine

    scorer = SRRScorer.from_pretrained(scorer_dir)
    cache = cache_dir / "train" / model_dir.name / f"pool-prefix-{2 * LIST_K}x{max_tokens}.npz"
    if sweep_only:
        # A report on the pools the head and rules were fitted on: read, never sampled, so
        # no engine starts.
        if not (scorer.config.prefix_head and cache.exists()):
            raise ValueError(f"{scorer_dir} has no prefix head or {cache} is missing: run `srr prefixes` first")
        cached = pools.load(cache)
        store = {p: cached[p] for p in dict.fromkeys(requests(n)) if p in cached}
    else:
        engine = await start_engine(cache_dir, model_dir)
        try:
            store = await pools.sample(engine, requests(n), 2 * LIST_K, max_tokens, cache)
        finally:
            engine.shutdown()
    train_pools, fit_pools = halves(store)
    lists = lists_of(fit_pools)
    if sweep_only:
        lengths = lists_of(fit_pools, of=pools.sampled_tokens)
        return sweep(scorer, lists, lengths)
    threshold = scorer.config.threshold
    # Without the head (the scorer reading prefix means as whole responses), for comparison.
    moves = movements(scorer, lists)
    untuned = report(moves, fit(moves, alpha), threshold)
    scorer = tune(scorer, train_pools)
    moves = movements(scorer, lists)
    rules = fit(moves, alpha)
    scorer.config.prefix_rules = {t: asdict(r) for t, r in rules.items()}
    scorer.save_pretrained(scorer_dir)
    out = {"alpha": alpha, "list_k": LIST_K, "max_tokens": max_tokens, "threshold": threshold,
           "pools": {"head": len(train_pools), "rules": len(fit_pools)},
           "by_prefix": report(moves, rules, threshold), "without_head": untuned,
           "refusal_head": refusal_by_prefix(scorer, fit_pools)}
    (scorer_dir / "prefixes.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
