"""Judge-free ranking on held-out labelled lists: the shipped scorer beside baselines
(text-only, refusal keyword), ablations (MLP), held-out writers and attacks, calibration,
and a prompt-state probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ranker.scorer import ScorerConfig, SRRScorer
from ranker.training import judges
from ranker.training.calibrate import fit_logistic
from ranker.training.dataset import SEED
from ranker.training.embed import MiniLM
from ranker.training.fit import predict, train
from ranker.training.lists import Item, RankList, make_lists, trainable
from ranker.training.render import SERVED
from ranker.training.stats import auroc, by_kind, expected_calibration_error, top1_accuracy
from ranker.training.store import pair_key


# The text-only baseline: the same ranker over MiniLM embeddings of prompt and response.
TEXT_RANKER = ScorerConfig(base_model="all-MiniLM-L6-v2", layers=[0], pooling="mean",
                           hidden_size=MiniLM.dim)


def top1_by_type(scores, lists: list[RankList], types: dict[str, str]) -> dict[str, dict]:
    """Judge-free top-1 on benign-prompt lists, per prompt type: over lists holding both
    labels (n_lists; top1 None where a type has none)."""
    groups: dict[str, list] = {}
    for s, x in zip(scores, lists):
        if x.prompt_harmful is False and x.prompt in types:
            groups.setdefault(types[x.prompt], []).append((s, x))
    out = {}
    for t, v in sorted(groups.items()):
        n = len(trainable([x for _, x in v]))
        out[t] = {"top1": top1_accuracy(*map(list, zip(*v))) if n else None, "n_lists": n}
    return out


def prompt_probe(ds, scorer) -> dict:
    """Can the serving model's state at the scorer's layer tell a harmful request from a
    benign one? A linear probe on the last prompt token's state: trained on the training
    split's prompts (harmful vs benign), tested on XSTest's prompts (unsafe vs safe); and,
    as the ceiling of what the states hold, 5-fold cross-validated within XSTest."""
    cfg = scorer.config

    def prompts(part):
        seen = {}
        for it in ds.parts[part]:
            key = pair_key(it.prompt, it.response)
            if it.prompt not in seen and key in ds.store.items and it.prompt_harmful is not None:
                x = ds.store.get(key).select(cfg.layers, cfg.pooling)[0]
                seen[it.prompt] = (x, float(it.prompt_harmful))
        xs, ys = zip(*seen.values())
        return np.stack(xs), np.array(ys)

    xtr, ytr = prompts("train")
    xte, yte = prompts("xstest")
    transfer = auroc(fit_logistic(xtr, ytr)(xte), yte)
    folds = np.random.default_rng(SEED).permutation(len(yte)) % 5
    cv = np.zeros(len(yte))
    for f in range(5):
        cv[folds == f] = fit_logistic(xte[folds != f], yte[folds != f])(xte[folds == f])
    out = {"train_to_xstest_auroc": transfer, "xstest_5fold_auroc": auroc(cv, yte),
           "n_train": len(ytr), "n_xstest": len(yte), "n_xstest_unsafe": int(yte.sum())}
    if scorer.risk is not None:  # the shipped risk head, on the same XSTest prompts
        with torch.no_grad():
            p = scorer.risk_probability(torch.from_numpy(xte)).numpy()
        flagged = scorer.judged_harmful(torch.from_numpy(p)).numpy()
        out.update(risk_head_xstest_auroc=auroc(p, yte), risk_head_flags_unsafe=float(flagged[yte == 1].mean()),
                   risk_head_flags_safe=float(flagged[yte == 0].mean()))
    return out


class MLPScorer(SRRScorer):
    """Ablation: the same projection, then an MLP on [instruction, candidate], no attention."""

    def __init__(self, config: ScorerConfig):
        super().__init__(config)
        d = config.d_model
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * d, 4 * d), torch.nn.GELU(),
                                       torch.nn.Dropout(config.dropout), torch.nn.Linear(4 * d, 1))

    def forward(self, instruction, candidates, mask=None):
        i = self.proj((instruction - self.feat_mean) / self.feat_std)
        c = self.proj((candidates - self.feat_mean) / self.feat_std)
        s = self.mlp(torch.cat([i.unsqueeze(1).expand_as(c), c], -1)).squeeze(-1)
        return s if mask is None else s.masked_fill(~mask, float("-inf"))


def text_lists(items: list[Item], embed: MiniLM) -> list[RankList]:
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.prompt, []).append(it)
    prompts = sorted(groups)
    pe = dict(zip(prompts, embed.encode(prompts)))
    out = []
    for p in prompts:
        its = groups[p]
        out.append(RankList(pe[p], embed.encode([it.response for it in its]),
                            np.array([it.label for it in its]), its[0].source, its[0].prompt_harmful,
                            prompt=p))
    return out


def keyword_scores(items: list[Item], lists_order: list[str]) -> list[np.ndarray]:
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.prompt, []).append(it)
    return [np.array([float(judges.is_refusal(it.response)) for it in groups[p]]) for p in lists_order]


def ranking_section(ds, scorer: SRRScorer, sweep: dict, epochs: int) -> dict:
    """Baselines and ablations on the shipped scorer's held-out lists. The layer x pooling
    rows are `srr train`'s sweep (same split, listwise loss only), read from training.json."""
    cfg = scorer.config
    base = dict(base_model=cfg.base_model, hidden_size=cfg.hidden_size)
    held = ("test", "xstest")
    out: dict = {}
    lists = {n: make_lists(ds.parts[n], ds.store, cfg.layers, cfg.pooling) for n in held}
    out["srr (shipped)"] = {n: by_kind(predict(scorer, lists[n]), lists[n], intervals=True)
                            for n in held}
    if scorer.refusal is not None:  # the ranking the server serves: with the risk and refusal heads
        out[SERVED] = {n: by_kind(predict(scorer, lists[n], served=True), lists[n], intervals=True)
                       for n in held}
    # The refusal-keyword picker: ranks refusals first, whatever the prompt.
    for n in held:
        order = sorted({it.prompt for it in ds.parts[n]})
        out.setdefault("refusal keyword", {})[n] = by_kind(keyword_scores(ds.parts[n], order), lists[n])
    embed = MiniLM()
    tl = {n: text_lists(ds.parts[n], embed) for n in ("train", *held)}
    text = train(TEXT_RANKER, tl["train"], epochs=epochs, seed=SEED, progress=False)
    out["text-only (MiniLM, same ranker)"] = {n: by_kind(predict(text, tl[n]), tl[n], intervals=True)
                                              for n in held}
    for key, res in sweep.items():
        out[key.replace("-", " ")] = {n: res[n] for n in held}
    tr = make_lists(ds.parts["train"], ds.store, cfg.layers, cfg.pooling)
    mlp = train(ScorerConfig(layers=cfg.layers, pooling=cfg.pooling, **base), tr, epochs=epochs,
                seed=SEED, progress=False, model_cls=MLPScorer)
    out[f"MLP scorer L{cfg.layers[0]} {cfg.pooling}"] = {
        n: by_kind(predict(mlp, lists[n]), lists[n]) for n in held}
    return out


def held_out_section(ds, scorer: SRRScorer, epochs: int) -> dict:
    """JailbreakBench with one target model (writer) or one attack held out of training:
    train without it, test on its answers to held-out test prompts (each list: that writer's
    or attack's answers plus the borrowed refusal), harmful-prompt lists with both labels."""
    cfg = scorer.config
    base = dict(base_model=cfg.base_model, hidden_size=cfg.hidden_size,
                layers=cfg.layers, pooling=cfg.pooling)
    jbb = [it for it in ds.parts["test"] if it.source.startswith("jbb/")]
    out: dict = {}
    for what, key in (("writer", lambda it: it.writer), ("attack", lambda it: it.source.removesuffix("+refusal"))):
        for value in sorted({key(it) for it in jbb if it.writer}):
            train_items = [it for it in ds.parts["train"]
                           if not (it.source.startswith("jbb/") and key(it) == value)]
            test_prompts = {it.prompt for it in jbb if it.writer and key(it) == value}
            test_items = [it for it in ds.parts["test"] if it.prompt in test_prompts
                          and (it.writer is None or key(it) == value)]
            m = train(ScorerConfig(**base), make_lists(train_items, ds.store, cfg.layers, cfg.pooling),
                      epochs=epochs, seed=SEED, progress=False)
            tl = make_lists(test_items, ds.store, cfg.layers, cfg.pooling)
            shipped = by_kind(predict(scorer, tl), tl)  # trained with it: the in-distribution reference
            res = by_kind(predict(m, tl), tl)
            out[f"{what}: {value}"] = {"held_out": res["top1_harmful"], "seen": shipped["top1_harmful"],
                                       "n": res["n_harmful"]}
    return out


def calibration_section(ds, scorer: SRRScorer, plot: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = scorer.config
    res = {}
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    for name in ("test", "xstest"):
        lists = make_lists(ds.parts[name], ds.store, cfg.layers, cfg.pooling)
        probs = np.concatenate([scorer.candidate_probability(torch.from_numpy(s)).numpy()
                                for s in predict(scorer, lists)])
        labels = np.concatenate([x.labels for x in lists]).astype(float)
        res[name] = {"ece": expected_calibration_error(probs, labels)}
        edges = np.linspace(0, 1, 11)
        idx = np.clip(np.digitize(probs, edges) - 1, 0, 9)
        xs = [probs[idx == b].mean() for b in range(10) if (idx == b).any()]
        ys = [labels[idx == b].mean() for b in range(10) if (idx == b).any()]
        ax.plot(xs, ys, "o-", label=f"{name} (ECE {res[name]['ece']:.3f})")
    ax.set_xlabel("predicted P(acceptable)")
    ax.set_ylabel("observed share acceptable")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    return res
