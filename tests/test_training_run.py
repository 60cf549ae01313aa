"""`srr train` end to end at toy size, on the real engine, model and data: every stage runs
(pools, prefilled refusals, judges, encoding, the sweep, variants, served calibration,
cross-fitting, the card), and a rerun resumes from the caches instead of training again.

The real run takes hours on 2 cores; here each training kind keeps a few requests, the
labelled sources a few hundred records, and one seed trains for two epochs. What it shows is
that the pipeline holds together, not what the scorer learns (docs/training.md has that).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from ranker import models, packages
from ranker.scorer import SRRScorer
from ranker.training import dataset, train
from conftest import SUITE_MODEL

PER_KIND = 8
POOL_TOKENS = 32  # the pools' cost is mostly decoding: half the real run's 64


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    full_requests, full_records = dataset.training_requests, dataset.training_records
    full_xstest = dataset.xstest_items
    mp.setattr(dataset, "training_requests",
               lambda scale=1.0: {k: v[:PER_KIND] for k, v in full_requests(scale).items()})
    # Every refusal (their openings start the prefilled refusals) and a twelfth of the rest.
    mp.setattr(dataset, "training_records",
               lambda scale=1.0: [r for i, r in enumerate(full_records(scale)) if r.refusal or i % 12 == 0])
    mp.setattr(dataset, "xstest_items", lambda: full_xstest()[:40])
    mp.setattr(dataset, "POOL_TOKENS", POOL_TOKENS)
    mp.setattr(dataset, "SPLIT", (0.5, 0.3, 0.2))  # some pools of each case in validation
    mp.setattr(train, "SEEDS", (0,))
    mp.setattr(train, "VARIANTS", ((0.0, 1), (1.0, 1)))
    toy = tmp_path_factory.mktemp("toy")
    # The engine's compile cache is keyed by model and layers: share the machine's, if any.
    layers = dataset.sweep_layers(models.shape(models.prepare(SUITE_MODEL)).layers)
    compiled = f"vllm-capture-L{'-'.join(map(str, layers))}"
    if (packages.cache_root() / compiled).is_dir():
        (toy / "cache").mkdir()
        (toy / "cache" / compiled).symlink_to(packages.cache_root() / compiled)
    yield toy
    mp.undo()


@pytest.fixture(scope="module")
def trained(toy):
    """The report of `srr train` at toy size; the scorer is in toy / "scorer"."""
    return asyncio.run(train.run(models.prepare(SUITE_MODEL), toy / "scorer", toy / "cache", epochs=2))


def test_train_runs_end_to_end_and_resumes(toy, trained):
    model_dir = models.prepare(SUITE_MODEL)
    cache, out, report = toy / "cache", toy / "scorer", trained
    scorer = SRRScorer.from_pretrained(out)
    cfg = scorer.config
    assert cfg.version == train.VERSION and cfg.pooling == "mean" and len(cfg.layers) == 1
    assert set(cfg.served_calibration) == {f"{b}/{k}" for b in ("harmful", "benign") for k in (1, 2, 4, 8, 16)}
    assert 0.0 < cfg.threshold < 1.0 and 0.0 < cfg.risk_threshold < 1.0
    assert report["chosen"]["risk"]["n_train"] > 0 and report["chosen"]["refusal"]["n_train"] > 0
    assert cfg.refusal_threshold is not None and scorer.refusal is not None
    assert json.loads((out / "training.json").read_text())["chosen"]["threshold"] == cfg.threshold
    assert (out / "README.md").read_text().startswith("# SRR scorer")
    kinds = {p.name for p in (cache / "train" / model_dir.name).glob("pool-*.npz")}
    assert kinds == {f"pool-{k}-{dataset.POOL_K}x{dataset.POOL_TOKENS}.npz"
                     for k in dataset.training_requests()}
    assert set(report["sweep"]) == {f"L{layer}-mean" for layer in
                                    dataset.sweep_layers(models.shape(model_dir).layers)}

    # A rerun loads every trained scorer from the cache: nothing is trained again.
    calls = []
    real_train = train.train
    train.train = lambda *a, **k: calls.append(1) or real_train(*a, **k)
    try:
        again = asyncio.run(train.run(model_dir, toy / "again", cache, epochs=2))
    finally:
        train.train = real_train
    assert calls == []
    assert again["chosen"]["threshold"] == pytest.approx(report["chosen"]["threshold"])


@pytest.fixture(scope="module")
def calibrated(toy, trained):
    """The report of `srr prefixes` on the trained scorer (its rules then in its config)."""
    from ranker.training import prefixes

    return asyncio.run(prefixes.run(models.prepare(SUITE_MODEL), toy / "scorer", toy / "cache", n=8, max_tokens=40))


def test_prefixes_fits_the_guard_into_the_scorer(toy, calibrated):
    from ranker.capture import PREFIX_TOKENS
    from ranker.policy import PrefixRule

    config = SRRScorer.from_pretrained(toy / "scorer").config
    rules = config.prefix_rules
    assert config.prefix_head
    assert set(rules) == set(calibrated["by_prefix"]) == {str(t) for t in PREFIX_TOKENS}
    assert all(PrefixRule(**r) for r in rules.values())
    pools = calibrated["pools"]  # of 8 requests, less those over 1,024 tokens
    assert pools["rules"] >= 1 and pools["head"] - pools["rules"] in (0, 1)  # halves, alternately
    assert all(v["lists"] == 2 * pools["rules"] for v in calibrated["by_prefix"].values())
    assert json.loads((toy / "scorer" / "prefixes.json").read_text()) == calibrated
    assert set(calibrated["refusal_head"]["by_prefix"]) == {*map(str, PREFIX_TOKENS), "whole"}


def test_eval_runs_end_to_end_on_the_trained_scorer(toy, trained, calibrated):
    """`srr eval` on the scorer the tests above trained and calibrated: every set, the K
    trend, the risk head's flag rates, pruning on against off, the report."""
    from ranker.evaluation import evaluate
    from ranker.training.render import BENIGN_SETS, HARMFUL_SETS

    report = asyncio.run(evaluate.run(models.prepare(SUITE_MODEL), toy / "scorer", toy / "eval", toy / "cache",
                                      n_advbench=4, n_xstest=4, max_tokens=12, epochs=1, n_rho=4))
    sets = {*HARMFUL_SETS, *BENIGN_SETS}
    assert set(report["trend"]) == set(report["risk"]) == set(report["guard"]) == sets
    assert all(v["n"] == 4 and 0 < v["tokens_ratio"] <= 1 for v in report["guard"].values())
    for v in report["guard"].values():  # the lists served otherwise account for the difference
        worse, better = (sum(c[i] for c in v["served_otherwise"].values()) for i in (0, 2))
        assert v["served_on"] - v["served_off"] == pytest.approx((better - worse) / v["n"])
    assert all(report[name][16]["n"] == 4 for name in sets)
    assert all(0.0 <= v["flagged"] <= 1.0 for v in report["risk"].values())
    md = (toy / "eval" / "report.md").read_text()
    assert "## Targets, K=8" in md and "## The request-level risk signal" in md
    assert "AdvBench in held-out in-the-wild prompts" in md and "## Pruning while generating" in md
    assert "Where on and off serve a different answer" in md


def test_eval_lengths_replays_the_decision_at_each_response_length(toy, trained):
    """`srr eval --lengths`: every set's pools at each length, the K=8 decision on the same
    prompts at each, and the paired difference; the same again from the cached pools."""
    from ranker.evaluation import lengths
    from ranker.training.render import BENIGN_SETS, HARMFUL_SETS, lengths_md

    report = asyncio.run(lengths.run(models.prepare(SUITE_MODEL), toy / "scorer", toy / "lengths", toy / "cache",
                                     n_advbench=2, n_xstest=2, n_rho=2, lengths=[8, 24]))
    assert set(report["sets"]) == {*HARMFUL_SETS, *BENIGN_SETS}
    for s in report["sets"].values():
        short, long = s["by_length"]["8"], s["by_length"]["24"]
        assert short["n"] == long["n"] >= 1
        assert 0 < short["tokens"] <= 8 and 0 < long["tokens"] <= 24
        assert short["tokens"] <= long["tokens"]
        assert s["difference"] == pytest.approx(long["served"] - short["served"])
    assert (toy / "lengths" / "lengths.md").read_text() == lengths_md(report)
    # A rerun reads every pool from the cache and reports the same (token counts included).
    again = asyncio.run(lengths.run(models.prepare(SUITE_MODEL), toy / "scorer", toy / "lengths", toy / "cache",
                                    n_advbench=2, n_xstest=2, n_rho=2, lengths=[8, 24]))
    assert again["sets"] == report["sets"]
