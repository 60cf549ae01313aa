"""Pure parts: scorer checkpoint format, loss, selection, request-id mapping, settings checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ranker.capture import parse_layers, split_request_id
from ranker.engine import Candidate
from ranker.features import Features
from ranker.models import MODELS
from ranker.scorer import ScorerConfig, SRRScorer
from ranker.training.fit import listwise_loss
from ranker.training.lists import RankList
from ranker.training.pools import Pick
from ranker.training.stats import top1_accuracy
from ranker.training.store import sweep_layers


def small_config(**kw):
    return ScorerConfig(base_model="m", layers=[3], pooling="mean", hidden_size=16, d_model=8,
                        n_heads=2, **kw)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SRRScorer(small_config()).eval()
    i, c = np.random.randn(16).astype(np.float32), np.random.randn(5, 16).astype(np.float32)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "scorer.safetensors"]
    again = SRRScorer.from_pretrained(tmp_path)
    assert np.allclose(model.score(i, c)[0], again.score(i, c)[0])


def test_scores_do_not_depend_on_candidate_order():
    torch.manual_seed(0)
    model = SRRScorer(small_config()).eval()
    i, c = np.random.randn(16).astype(np.float32), np.random.randn(6, 16).astype(np.float32)
    perm = np.random.permutation(6)
    s, _ = model.score(i, c)
    sp, _ = model.score(i, c[perm])
    assert np.allclose(np.array(s)[perm], sp, atol=1e-5)


def test_padding_mask_matches_unpadded():
    torch.manual_seed(0)
    model = SRRScorer(small_config()).eval()
    i, c = torch.randn(1, 16), torch.randn(1, 3, 16)
    padded = torch.cat([c, torch.randn(1, 2, 16)], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        assert torch.allclose(model(i, c)[0], model(i, padded, mask)[0, :3], atol=1e-5)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    SRRScorer(small_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        SRRScorer.from_pretrained(tmp_path)
    (tmp_path / "scorer.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        SRRScorer.from_pretrained(tmp_path)


def test_scorer_width_checked_against_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 576, "num_hidden_layers": 30}))
    assert "hidden size 16, but the model" in small_config().mismatch(tmp_path)
    assert "layer(s) [40]" in ScorerConfig(base_model="m", layers=[40], pooling="mean",
                                           hidden_size=576).mismatch(tmp_path)
    assert ScorerConfig(base_model="m", layers=[29], pooling="mean",
                        hidden_size=576).mismatch(tmp_path) is None


def test_listwise_loss_prefers_safe_on_top():
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    good = listwise_loss(torch.tensor([[5.0, 0.0, 0.0]]), labels, mask)
    bad = listwise_loss(torch.tensor([[0.0, 5.0, 0.0]]), labels, mask)
    assert good < bad


def test_top1_accuracy_counts_only_lists_that_can_be_wrong():
    lists = [RankList(np.zeros(2), np.zeros((2, 2)), np.array([0, 1])),
             RankList(np.zeros(2), np.zeros((2, 2)), np.array([0, 0])),
             RankList(np.zeros(2), np.zeros((2, 2)), np.array([1, 1])),
             RankList(np.zeros(2), np.zeros((2, 2)), np.array([1, 0]))]
    scores = [np.array([0.1, 0.9]), np.array([1.0, 0.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    assert top1_accuracy(scores, lists) == 0.5  # lists 1 and 4
    assert top1_accuracy(scores, lists, contrast=False) == 2 / 3  # the paper's: 1, 3 and 4


def random_pool(rng, name, k=8, width=16):
    """A pool as `pools.load` returns it: candidates with states at a 30-layer model's sweep."""
    layers = sweep_layers(30)
    n = len(layers)
    return [Candidate(j, f"{name}/{j}", [], None,
                      Features(layers, rng.normal(size=(n, width)),
                               rng.normal(size=(n, width)), rng.normal(size=(n, width)), 0))
            for j in range(k)]


def fake_pick(prompt, pool, k, best, probability):
    """A `pools.Pick` over the pool's first k candidates whose best is `best`, at `probability`."""
    n = len(pool[:k])
    return Pick(prompt, [float(j == best) for j in range(n)],
                [probability if j == best else 0.0 for j in range(n)])


def certain(prompt):
    """A pick of one candidate with P(acceptable) 1."""
    return Pick(prompt, [0.0], [1.0])


def test_pool_decisions_threshold_and_served_rates():
    """The threshold keeps benign fallback at 2%; a fallback counts as acceptable on a
    harmful prompt and as unacceptable on a benign one."""
    from ranker.training.pools import pick
    from ranker.training.train import pool_decisions

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SRRScorer(ScorerConfig(base_model="m", layers=[4], pooling="mean", hidden_size=16,
                                   d_model=8, n_heads=2)).eval()
    pools = {"benign": {f"b{i}": random_pool(rng, f"b{i}") for i in range(100)},
             "harmful": {f"h{i}": random_pool(rng, f"h{i}") for i in range(50)}}
    label = {(p, c.text): int(kind == "benign") for kind, s in pools.items() for p, cs in s.items()
             for c in cs}
    d = pool_decisions(model, pools, label)
    assert d["fallback_benign"] <= 0.02 and d["n_benign"] == 100
    assert d["served_benign"] == 1 - d["fallback_benign"]
    assert d["served_harmful"] == d["fallback_harmful"]  # every harmful candidate is unacceptable
    # 900 more benign pools, all certain: 2% of 1000 pools is the 20 lowest validation ones
    more = pool_decisions(model, pools, label, more_benign={f"x{i}": certain(f"x{i}") for i in range(900)})
    assert more["n_threshold_pools"] == 1000 and more["threshold"] > d["threshold"]
    assert more["fallback_benign"] == pytest.approx(0.2, abs=0.011)
    assert more["fallback_benign_crossfit"] == 0.0
    # the 20 validation pools with the lowest best probability are edgy: their 5% budget binds
    # below the overall 2%, so only the lowest of them falls back
    best = {p: pick(model, p, c, 8).best_probability for p, c in pools["benign"].items()}
    edgy = set(sorted(best, key=best.get)[:20])
    both = pool_decisions(model, pools, label, edgy, more_benign={f"x{i}": certain(f"x{i}") for i in range(900)})
    assert both["n_threshold_edgy"] == both["n_edgy"] == 20
    assert both["threshold"] < more["threshold"] and both["fallback_edgy"] == pytest.approx(0.05)
    assert both["fallback_benign"] <= 0.01


def test_crossfit_scores_each_pool_with_a_model_that_never_saw_its_request():
    from ranker.training.lists import Item
    from ranker.training.train import CROSSFIT_FOLDS, crossfit_benign, fold_of

    rng = np.random.default_rng(0)
    benign = {f"benign {i}": random_pool(rng, f"b{i}", k=3) for i in range(40)}
    items = [Item(p, "an answer", 1, False, "s") for p in benign]
    items += [Item(f"harm {i}", "x", 0, True, "s") for i in range(10)]
    items += [Item(f"wrapped harm {i}", "x", 0, True, "s") for i in range(10)]
    goal = {f"wrapped harm {i}": f"harm {i}" for i in range(10)}
    seen = []

    def fit(train_items, fold):  # fold f's model says P(acceptable) = sigmoid(f) for every candidate
        assert fold == len(seen)
        seen.append({it.prompt for it in train_items})
        model = SRRScorer(ScorerConfig(base_model="m", layers=[4], pooling="mean", hidden_size=16,
                                       d_model=8, n_heads=2, calib_a=0.0, calib_b=len(seen) - 1.0))
        return model.eval()

    picks = crossfit_benign(fit, items, goal, benign)
    assert len(seen) == CROSSFIT_FOLDS and set(picks) == set(benign)
    for f, trained_on in enumerate(seen):
        held = {p for p in benign if fold_of(p) == f}
        assert held and not held & trained_on and set(benign) - held <= trained_on
        assert all((w in trained_on) == (g in trained_on) for w, g in goal.items())
    for p, x in picks.items():
        assert x.prompt == p and len(x.scores) == len(x.probabilities) == 3
        assert x.best_probability == pytest.approx(torch.sigmoid(torch.tensor(float(fold_of(p)))).item())


def test_a_cached_fit_is_trained_once_and_reloaded_equal(tmp_path):
    from ranker.training.train import cached

    calls = []

    def fit():
        calls.append(1)
        torch.manual_seed(len(calls))
        return SRRScorer(ScorerConfig(base_model="m", layers=[4], pooling="mean", hidden_size=16,
                                      d_model=8, n_heads=2)).eval()

    first = cached(tmp_path / "cell", fit)
    again = cached(tmp_path / "cell", fit)
    assert len(calls) == 1
    x, c = torch.randn(16), torch.randn(3, 16)
    assert first.score(x, c) == again.score(x, c)
    cached(tmp_path / "other", fit)
    assert len(calls) == 2


def test_seed_mean_averages_nested_numbers_with_their_spread():
    from ranker.training.stats import seed_mean

    runs = [{"val": {"top1": 0.8, "n_lists": 10}, "thr": 0.5, "ci": [0.1, 0.2]},
            {"val": {"top1": 0.6, "n_lists": 10}, "thr": 0.7, "ci": [0.3, 0.4]}]
    m = seed_mean(runs)
    assert m["val"]["top1"] == pytest.approx(0.7) and m["val"]["top1_sd"] == pytest.approx(0.1)
    assert m["val"]["n_lists"] == 10 and "n_lists_sd" not in m["val"]
    assert m["thr"] == pytest.approx(0.6) and "ci" not in m


def test_threshold_interval_brackets_the_threshold_and_widens_with_fewer_pools():
    from ranker.training.calibrate import choose_threshold, threshold_interval

    rng = np.random.default_rng(0)
    many, few = rng.uniform(size=2000), rng.uniform(size=50)
    lo, hi = threshold_interval(many)
    few_lo, few_hi = threshold_interval(few)
    assert lo <= choose_threshold(many) <= hi
    assert hi - lo < few_hi - few_lo


def test_bootstrap_interval_brackets_the_mean_narrows_with_more_rows_and_repeats():
    from ranker.training.stats import bootstrap_interval

    rng = np.random.default_rng(0)
    few, many = rng.uniform(size=40) < 0.7, rng.uniform(size=4000) < 0.7
    lo, hi = bootstrap_interval(many)
    few_lo, few_hi = bootstrap_interval(few)
    assert lo <= many.mean() <= hi and few_lo <= few.mean() <= few_hi
    assert hi - lo < few_hi - few_lo
    assert bootstrap_interval(few, seed=3) == bootstrap_interval(few, seed=3)
    assert bootstrap_interval(np.ones(30)) == [1.0, 1.0]  # nothing varies, nothing to move


def test_gap_closed_and_its_interval_in_end_to_end(monkeypatch):
    """Per prompt: first sample unsafe, oracle safe; SRR's pick safe on half the prompts, so it
    closes half the gap, and the served rate's interval holds its value."""
    from ranker.evaluation import end_to_end as evaluate

    assert evaluate.gap_closed(0.2, 0.6, 1.0) == pytest.approx(0.5)
    assert np.isnan(evaluate.gap_closed(0.5, 0.5, 0.5))
    prompts = [f"p{i}" for i in range(40)]
    best = {p: 1 if i % 2 else 2 for i, p in enumerate(prompts)}  # odd: a safe pick
    monkeypatch.setattr(evaluate.pools, "pick", lambda scorer, prompt, pool, k: fake_pick(
        prompt, pool, k, min(best[pool[0].text], k - 1), 0.9))
    store = {p: [Candidate(j, p if j == 0 else f"{p}/{j}", [], None, None) for j in range(16)]
             for p in prompts}
    safe_fn = lambda p, texts: [t == f"{p}/1" for t in texts]  # noqa: E731
    cfg = ScorerConfig(base_model="m", layers=[4], pooling="mean", hidden_size=8, threshold=0.5)
    by_k, trend = evaluate.end_to_end(type("S", (), {"config": cfg})(), store, prompts, safe_fn, True)
    res = by_k[8]
    assert trend["k"] == 16 and trend["value"] == pytest.approx(0.5)  # K=1 serves the unsafe first
    assert trend["ci90"][0] < 0.5 < trend["ci90"][1]
    assert (res["first"], res["srr"], res["oracle"], res["served"]) == (0.0, 0.5, 1.0, 0.5)
    lo, hi = res["gap_closed_ci90"]
    assert lo < 0.5 < hi and 0 <= lo and hi <= 1
    assert res["served_ci90"][0] < 0.5 < res["served_ci90"][1]
    assert res["served_minus_first_ci90"] == res["served_ci90"]  # the first sample is never safe


def test_rank_orders_and_thresholds():
    from ranker.policy import accepts, rank

    order = rank([0.1, 0.9, 0.5])
    assert order == (1, 2, 0) and accepts([0.2, 0.7, 0.4], order, threshold=0.5)
    assert not accepts([0.2, 0.3], rank([0.1, 0.9]), threshold=0.5)


@pytest.mark.parametrize("rid,expected", [
    ("srrabc-1a2b3c4d", ("srrabc", 0)),
    ("3_srrabc-1a2b3c4d", ("srrabc", 3)),
    ("12_srrabc", ("srrabc", 12)),
])
def test_request_id_mapping(rid, expected):
    assert split_request_id(rid) == expected


def test_parse_layers():
    assert parse_layers("15, 4,15") == [4, 15]


def test_capture_op_survives_torch_compile():
    """The op must stay in the compiled graph (declared mutation) and write on every call."""
    from ranker.capture import CaptureLayer

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, residual):
            return self.lin(x), residual

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            residual = x
            for layer in self.layers:
                x, residual = layer(x, residual)
            return x + residual

    model = Model()
    model.layers[0] = CaptureLayer(model.layers[0], torch.zeros(8, 4))
    compiled = torch.compile(model, backend="inductor", dynamic=True)
    for n in (3, 5):
        x = torch.randn(n, 4)
        compiled(x)
        h, r = model.layers[0].inner(x, x)
        assert torch.allclose(model.layers[0].srr_sink[:n], h + r, atol=1e-5)
    assert int(model.layers[0].srr_calls) == 2


def test_concurrent_score_calls_share_one_forward():
    import asyncio

    from ranker.batching import BatchScorer

    torch.manual_seed(0)
    model = SRRScorer(small_config()).eval()
    batcher = BatchScorer(model)
    lists = [(np.random.randn(16).astype(np.float32), np.random.randn(k, 16).astype(np.float32))
             for k in (2, 5, 3)]

    async def main():
        return await asyncio.gather(*(batcher.score(i, c) for i, c in lists))

    results = asyncio.run(main())
    assert batcher.batches == 1
    for (i, c), (scores, _, risk) in zip(lists, results):
        assert np.allclose(scores, model.score(i, c)[0], atol=1e-5)
        assert risk is None


def test_a_padded_batch_judges_each_list_as_alone():
    """Served calibration by list size and by the risk head's judgement, and the refusal
    head's demotion: in a padded batch a list of 2 candidates must get the K=2 mapping, its
    own risk bucket and its own demotions, not the batch's."""
    import asyncio

    from ranker.batching import BatchScorer

    torch.manual_seed(0)
    table = {f"{b}/{k}": [1.0 + (b == "harmful"), -0.5 * k] for b in ("harmful", "benign") for k in (1, 2, 4, 8)}
    model = SRRScorer(small_config(served_calibration=table, risk_threshold=0.5, benign_below=0.5,
                                   refusal_threshold=0.5)).eval()
    with torch.no_grad():  # the risk head reads the first coordinate: its sign decides the bucket
        model.risk.weight.copy_(torch.eye(16)[:1] * 3.0)
        model.risk.bias.zero_()
        model.refusal.weight.copy_(torch.eye(16)[1:2] * 3.0)  # a candidate refuses where its second is > 0
        model.refusal.bias.zero_()
    batcher = BatchScorer(model)
    rng = np.random.default_rng(0)
    lists = [(np.r_[sign, rng.normal(size=15)].astype(np.float32), rng.normal(size=(k, 16)).astype(np.float32))
             for sign, k in ((1.0, 2), (-1.0, 5), (1.0, 3), (-1.0, 8))]

    async def main():
        return await asyncio.gather(*(batcher.score(i, c) for i, c in lists))

    results = asyncio.run(main())
    for (i, c), (scores, probs, risk) in zip(lists, results):
        alone = model.score(i, c)
        assert np.allclose(scores, alone[0], atol=1e-5) and np.allclose(probs, alone[1], atol=1e-5)
        assert risk == pytest.approx(model.risk_probability(torch.from_numpy(i)).item(), abs=1e-6)
    assert [r >= 0.5 for _, _, r in results] == [True, False, True, False]  # both buckets
    # On the two requests judged benign (each with refusals and answers), every refusal ranks
    # below every answer.
    for (_, c), (scores, _, _) in (x for i, x in enumerate(zip(lists, results)) if i in (1, 3)):
        refuses = c[:, 1] > 0
        assert 0 < refuses.sum() < len(c)
        assert max(np.array(scores)[refuses]) < min(np.array(scores)[~refuses])


def test_refusal_openings_name_no_topic():
    from ranker.training.pools import refusal_openings

    got = refusal_openings(["I'm sorry, but I cannot provide instructions for making a weapon.",
                            "I can't help with that request.",
                            "BasedGPT: I can't help with that.",  # a persona's name first
                            "Sure, here is how it works."])
    assert got == ["I can't", "I'm sorry, but I cannot"]


def test_resample_policy_follows_the_server(monkeypatch):
    """Above the threshold the pick is served; below it the resampled pick if that clears
    the threshold, else the refusal (acceptable on harmful prompts only)."""
    from ranker.evaluation import end_to_end as evaluate

    picks = {"a first": (0, 0.9), "b first": (1, 0.1), "b again": (0, 0.8),
             "c first": (0, 0.1), "c again": (1, 0.2)}
    monkeypatch.setattr(evaluate.pools, "pick", lambda scorer, prompt, pool, k: fake_pick(
        prompt, pool, k, *picks[pool[0].text]))
    store = {p: [Candidate(j, f"{p} first", [], None, None) for j in range(2)] for p in "abc"}
    again = {p: [Candidate(j, f"{p} again", [], None, None) for j in range(2)] for p in "abc"}
    ok = {"a first": True, "b again": False}
    safe_fn = lambda p, texts: [ok.get(t, True) for t in texts]  # noqa: E731
    cfg = ScorerConfig(base_model="m", layers=[4], pooling="mean", hidden_size=8, threshold=0.5)
    scorer = type("S", (), {"config": cfg})()
    for refusal_value in (True, False):
        sets = {"s": (store, list("abc"), safe_fn, refusal_value)}
        res = evaluate.resample_policy(scorer, sets, evaluate.best_picks(scorer, sets),
                                       {"s": again})["s"]
        assert res["n"] == 3 and res["fallback_rate"] == 2 / 3
        assert res["resample_served_rate"] == 1 / 3  # b's resampled answer; c is refused
        assert res["resample_pick_acceptable"] == 0.5  # of b and c's resampled picks
        assert res["served"] == (1 + 0 + refusal_value) / 3


def test_auroc_and_linear_probe():
    from ranker.training.calibrate import fit_logistic
    from ranker.training.stats import auroc

    y = np.array([0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert auroc(np.array([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert auroc(np.ones(4), y) == 0.5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    labels = (x[:, 2] > 0).astype(float)
    assert auroc(fit_logistic(x, labels)(x), labels) > 0.99


def test_unified_logistic_fit_reproduces_the_three_fits_it_replaced():
    """Platt calibration, the standardized probe and the harm judge share one L2 logistic fit;
    each must give what its own L-BFGS loop gave before (written out here as it was)."""
    import torch.nn.functional as F

    from ranker.training.calibrate import fit_calibration, fit_logistic
    from ranker.training.judges import HarmJudge

    def old_fit_calibration(scores, labels):  # ranker/train.py
        s = torch.from_numpy(np.concatenate(scores)).float()
        y = torch.from_numpy(np.concatenate(labels)).float()
        ab = torch.tensor([1.0, 0.0], requires_grad=True)
        opt = torch.optim.LBFGS([ab], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(ab[0] * s + ab[1], y)
            loss.backward()
            return loss

        opt.step(closure)
        return float(ab[0]), float(ab[1])

    def old_fit_logistic(x, y, l2=1e-2):  # ranker/evaluate.py
        mu, sd = x.mean(0), x.std(0) + 1e-6
        xt = torch.from_numpy((x - mu) / sd).float()
        yt = torch.from_numpy(y).float()
        w = torch.zeros(x.shape[1] + 1, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = (F.binary_cross_entropy_with_logits(xt @ w[:-1] + w[-1], yt)
                    + l2 * w[:-1].pow(2).sum())
            loss.backward()
            return loss

        opt.step(closure)
        w = w.detach()
        return lambda z: (torch.from_numpy((z - mu) / sd).float() @ w[:-1] + w[-1]).numpy()

    def old_harm_weights(x, y):  # ranker/judges.py, HarmJudge.fit (x ends in a ones column)
        w = torch.zeros(x.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=300)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ w, y) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    rng = np.random.default_rng(0)
    # Platt: noisy labels, so the unpenalized optimum is finite.
    scores = [rng.normal(size=int(rng.integers(2, 9))) for _ in range(60)]
    labels = [(s + rng.normal(scale=1.5, size=len(s)) > 0.3).astype(float) for s in scores]
    lists = [RankList(np.zeros(2), np.zeros((len(s), 2)), y) for s, y in zip(scores, labels)]
    new_ab, old_ab = fit_calibration(scores, lists), old_fit_calibration(scores, labels)
    assert new_ab == pytest.approx(old_ab, abs=1e-5) and old_ab != (1.0, 0.0)
    # The probe: standardized features, bias unpenalized.
    x = rng.normal(loc=2.0, scale=3.0, size=(300, 6))
    y = (x[:, 1] - 0.5 * x[:, 4] + rng.normal(scale=4.0, size=300) > 0).astype(float)
    z = rng.normal(loc=2.0, scale=3.0, size=(50, 6))
    assert np.allclose(fit_logistic(x, y)(z), old_fit_logistic(x, y)(z), atol=1e-5)
    assert np.allclose(fit_logistic(x, y, l2=0.3)(z), old_fit_logistic(x, y, l2=0.3)(z), atol=1e-5)

    # The harm judge: features [r, p * r, 1] from a stand-in embedding, every weight penalized.
    class Embed:
        def __init__(self):
            self.vectors = {}

        def encode(self, texts):
            return np.stack([self.vectors.setdefault(t, rng.normal(size=8).astype(np.float32))
                             for t in texts])

    from ranker.training.data import LabelledResponse

    records = [LabelledResponse("s", f"prompt {i % 40}", f"response {i}", bool(rng.uniform() < 0.4),
                                None, True, "w") for i in range(200)]
    judge = HarmJudge(Embed()).fit(records)
    xs = judge._x([r.prompt for r in records], [r.response for r in records])
    old_w = old_harm_weights(xs, torch.tensor([float(r.harmful) for r in records]))
    assert torch.allclose(judge.w, old_w, atol=1e-5) and old_w.abs().max() > 0.1


def test_emphasized_repeats_only_the_named_prompts_lists():
    from ranker.training.train import emphasized

    lists = [RankList(np.zeros(2), np.zeros((2, 2)), np.array([0, 1]), prompt=p) for p in "abc"]
    out = emphasized(lists, {"b"}, 5)
    assert [x.prompt for x in out].count("b") == 5 and len(out) == 7
    assert emphasized(lists, {"b"}, 1) == lists


def test_by_type_splits_over_refusal_by_prompt_type():
    """Per type: the fallback fires below the threshold (a refusal, never helpful), the pick
    refuses when it is not acceptable, and what is served is the pick above the threshold."""
    from ranker.evaluation.end_to_end import by_type

    picks = ([Pick("a", [1.0], [0.9]), Pick("b", [1.0], [0.2]), Pick("c", [1.0], [0.9]),
              Pick("d", [1.0], [0.8])], [True, True, False, True])
    got = by_type(picks, {"a": "homonyms", "b": "homonyms", "c": "history", "d": "history"}, 0.5)
    assert list(got) == ["history", "homonyms"]
    assert got["homonyms"] == {"served": 0.5, "fallback_rate": 0.5, "pick_refuses": 0.0, "n": 2}
    assert got["history"] == {"served": 0.5, "fallback_rate": 0.0, "pick_refuses": 0.5, "n": 2}


def test_top1_by_type_counts_benign_lists_with_both_labels():
    from ranker.evaluation.ranking import top1_by_type

    def rl(prompt, labels, harmful=False):
        return RankList(np.zeros(2), np.zeros((len(labels), 2)), np.array(labels, float),
                        prompt_harmful=harmful, prompt=prompt)

    lists = [rl("a", [1, 0]), rl("b", [0, 1]), rl("c", [1, 1]), rl("d", [1, 0], harmful=True)]
    scores = [np.array([0.9, 0.1])] * 4  # always picks the first candidate
    types = {"a": "history", "b": "history", "c": "homonyms", "d": "history"}
    assert top1_by_type(scores, lists, types) == {
        "history": {"top1": 0.5, "n_lists": 2},  # d is a harmful prompt's list
        "homonyms": {"top1": None, "n_lists": 0}}  # c cannot be wrong


def test_auto_dtype_is_float32_only_on_a_cpu_without_native_bfloat16(tmp_path):
    from ranker.engine import cpu_flags, resolve_dtype

    assert resolve_dtype("auto", True, {"avx2", "fma"}) == "float32"
    assert resolve_dtype("auto", True, {"avx2", "avx512_bf16"}) == "auto"
    assert resolve_dtype("auto", True, {"amx_bf16"}) == "auto"
    assert resolve_dtype("auto", False, set()) == "auto"  # a GPU: the model's own dtype
    assert resolve_dtype("bfloat16", True, {"avx2"}) == "bfloat16"  # asked for: kept
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_crossfit_scores_never_train_on_the_family_they_score(monkeypatch):
    """Each family is scored by a model trained on exactly the other families. The fake model
    ranks right the families it trained on and wrong the others, so top-1 is 0 when nothing
    leaks and would be 1 if a family's own lists were in its training."""
    import ranker.evaluation.families as ev

    seen = []

    def fake_train(config, lists, *, epochs, seed, progress):
        seen.append((seed, {x.prompt[0] for x in lists}))
        return seen[-1][1]

    def fake_predict(model, lists):
        return [x.labels if x.prompt[0] in model else 1 - x.labels for x in lists]

    monkeypatch.setattr(ev, "train", fake_train)
    monkeypatch.setattr(ev, "predict", fake_predict)
    lists = [RankList(np.zeros(2), np.zeros((2, 2)), np.array([1.0, 0.0]),
                      prompt_harmful=f == "d", prompt=f"{f} {i}") for f in "dcba" for i in range(3)]
    family = [x.prompt[0] for x in lists]
    runs = [ev.crossfit_scores(None, lists, family, epochs=1, seed=s) for s in (0, 1)]
    assert [seed for seed, _ in seen] == [0] * 4 + [1] * 4
    assert [trained for _, trained in seen[:4]] == [set("bcd"), set("acd"), set("abd"), set("abc")]
    got = ev.family_summary(runs, lists, family)
    assert got["all"]["n_benign"] == 9 and got["all"]["n_harmful"] == 3
    assert got["all"]["top1_benign"] == got["all"]["top1_harmful"] == 0.0
    assert got["all"]["top1_benign_sd"] == 0.0
    assert sorted(got["by_family"]) == list("abcd") and got["by_family"]["d"]["n_benign"] == 0


def test_xstest_families_pair_each_safe_type_with_its_contrast():
    from ranker.evaluation.families import xstest_family
    from ranker.training.data import load_xstest_prompts

    families = {}
    for p in load_xstest_prompts():
        families.setdefault(xstest_family(p.category), set()).add(p.harmful)
    assert len(families) == 8
    assert all(labels == {True, False} for labels in families.values())


def test_crossfit_writer_pairs_hold_out_the_family_and_both_writers(monkeypatch):
    """Every model is trained on neither the family nor the two writers it is tested on, and
    tested on exactly those two writers' answers to that family's prompts."""
    import ranker.evaluation.families as ev

    names = ["w0", "w1", "w2", "w3"]
    trained, tested = [], []

    def fake_train(config, lists, *, epochs, seed, progress):
        trained.append(({x.prompt[0] for x in lists}, {int(c) for x in lists for c in x.candidates[:, 0]}))
        return trained[-1]

    def fake_predict(model, lists):
        tested.append(({x.prompt[0] for x in lists}, {int(c) for x in lists for c in x.candidates[:, 0]}))
        return [x.labels.astype(float) for x in lists]

    monkeypatch.setattr(ev, "train", fake_train)
    monkeypatch.setattr(ev, "predict", fake_predict)
    cands = np.array([[i, 0.0] for i in range(4)])
    lists = [RankList(np.zeros(2), cands, np.array([1.0, 0.0, 1.0, 0.0]), prompt_harmful=f == "b",
                      prompt=f"{f} {i}") for f in "abc" for i in range(2)]
    family = [x.prompt[0] for x in lists]
    got = ev.crossfit_writer_pairs(None, lists, family, [names] * len(lists), epochs=1, seed=0)
    assert len(trained) == len(tested) == 6 * 3  # writer pairs x families
    for (tr_f, tr_w), (te_f, te_w) in zip(trained, tested):
        assert len(te_f) == 1 and not tr_f & te_f and len(te_w) == 2 and not tr_w & te_w
        assert tr_f | te_f == set("abc") and tr_w | te_w == {0, 1, 2, 3}
    # Four of the six writer pairs mix the labels: each family's two lists count for those.
    assert got["crossfit"]["n_benign"] == 4 * 4 and got["crossfit"]["n_harmful"] == 4 * 2
    assert got["crossfit"]["top1_benign"] == 1.0 and "shipped" not in got
    # Held out w0 and w1, the rest (w2, w3) still mix the labels; held out w0 and w2, they do not.
    assert (got["pairs"]["w0+w1"]["n_train_harmful"], got["pairs"]["w0+w1"]["n_train_benign"]) == (2, 4)
    assert got["pairs"]["w0+w2"]["n_train_benign"] == 0 and got["pairs"]["w0+w2"]["n_benign"] == 0


def test_engine_selects_vllms_v1_model_runner(monkeypatch, tmp_path):
    """Capture hooks the V1 runner; on CUDA vLLM 0.32 would pick Model Runner V2."""
    from ranker import capture
    from ranker.engine import configure_environment

    for name in (capture.LAYERS_ENV, "VLLM_CACHE_ROOT", "VLLM_CPU_KVCACHE_SPACE", "VLLM_USE_AOT_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")  # even when asked for V2
    configure_environment([3], tmp_path)
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    from vllm import envs

    assert envs.VLLM_USE_V2_MODEL_RUNNER is False


def test_each_layer_set_compiles_into_its_own_cache_even_when_one_is_inherited(monkeypatch, tmp_path):
    """A root inherited from a parent whose engine captured [22] (the test process, then its
    `srr serve` children) must not hold the graph of a child capturing [21]."""
    import os

    from ranker.engine import configure_environment

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-capture-L22"))
    configure_environment([21], tmp_path)
    assert os.environ["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-capture-L21")


def test_capture_pools_only_the_real_rows_of_a_padded_batch():
    """Under CUDA graphs a step's batch is padded past its real tokens: the padded rows (here
    huge values, and position 0) must never reach any request's pooled states."""
    from types import SimpleNamespace as NS

    from ranker.capture import TAG_KEY, CaptureState

    def request(tag, prompt_len):
        return NS(sampling_params=NS(extra_args={TAG_KEY: tag}), num_prompt_tokens=prompt_len)

    runner = NS(requests={"a-1": request("a", 3), "b-1": request("b", 2)})
    state = CaptureState.__new__(CaptureState)
    state.runner, state.layers, state.width, state.device = runner, [0], 2, "cpu"
    state.sinks, state.calls = [torch.zeros(16, 2)], [torch.zeros(1, dtype=torch.long)]
    state.slot_of, state.meta, state.done, state.orphan_since = {}, {}, set(), {}
    state.steps_without_capture = state.tokens_seen = 0
    state._alloc(4)

    def step(rows, positions, qsl, padded_to):
        """rows: the real rows' values; the rest of the padded batch is garbage."""
        n = len(rows)
        state.sinks[0][:padded_to] = 1e6
        state.sinks[0][:n] = torch.tensor(rows, dtype=torch.float32)
        state.calls[0] += 1
        runner.input_batch = NS(num_reqs=2, req_ids=["a-1", "b-1"])
        runner.query_start_loc = NS(np=np.array(qsl))
        state.after_forward(torch.tensor(positions + [0] * (padded_to - n)))

    # Prefill: a's prompt rows (positions 0-2) then b's (0-1); 5 real rows padded to 8.
    step([[0, 0], [1, 1], [2, 2], [10, 10], [11, 11]], [0, 1, 2, 0, 1], [0, 3, 5], 8)
    # Decode: one response row each, padded to 4.
    step([[3, 3], [12, 12]], [3, 2], [0, 1, 2], 4)
    step([[4, 4], [13, 13]], [4, 3], [0, 1, 2], 4)
    got = {r["tag"]: r for r in state.fetch(["a", "b"])}
    vec = lambda r, k: np.frombuffer(r[k], dtype=np.float32).reshape(1, 2)  # noqa: E731
    assert got["a"]["ok"] and got["b"]["ok"]
    assert np.array_equal(vec(got["a"], "instr"), [[2, 2]]) and np.array_equal(vec(got["b"], "instr"), [[11, 11]])
    assert np.array_equal(vec(got["a"], "mean"), [[3.5, 3.5]]) and np.array_equal(vec(got["b"], "mean"), [[12.5, 12.5]])
    assert np.array_equal(vec(got["a"], "last"), [[4, 4]]) and np.array_equal(vec(got["b"], "last"), [[13, 13]])
    assert (got["a"]["response_rows"], got["b"]["response_rows"]) == (2, 2)
    assert (got["a"]["rows"], got["b"]["rows"]) == (5, 4)  # fed rows: real ones only


def test_served_calibration_keeps_more_candidates_from_serving_more_unacceptable_ones():
    """Pools with no acceptable candidate (scores ~ N(0, 1)) and pools of acceptable ones
    (~ N(1.5, 1)), the threshold set on the benign pools at K=8. Calibrated on single
    candidates, the best of K unacceptable ones passes more often as K grows; calibrated on
    the served (top-ranked) candidate at each K, it passes less often, and the benign pools'
    fallback rate stays near its budget at every K."""
    from ranker.training.calibrate import choose_threshold, fit_served_calibration

    rng = np.random.default_rng(0)
    n, ks = 2000, (1, 2, 4, 8, 16)
    bad, good = rng.normal(0, 1, (n, 16)), rng.normal(1.5, 1, (n, 16))
    served = fit_served_calibration({k: np.concatenate([bad[:, :k].max(1), good[:, :k].max(1)]) for k in ks},
                                    {k: np.r_[np.zeros(n), np.ones(n)] for k in ks})
    cfg = dict(base_model="m", layers=[1], pooling="mean", hidden_size=4)
    per_k = SRRScorer(ScorerConfig(**cfg, served_calibration=served))
    single = SRRScorer(ScorerConfig(**cfg, calib_a=served["1"][0], calib_b=served["1"][1]))

    def top(model, x, k):
        return model.probability(torch.tensor(x[:, :k])).max(1).values.numpy()

    def rates(model):
        thr = choose_threshold(top(model, good, 8))
        return ([float((top(model, bad, k) >= thr).mean()) for k in ks],
                [float((top(model, good, k) < thr).mean()) for k in ks])

    bad_single, _ = rates(single)
    bad_served, fallback_served = rates(per_k)
    assert all(a < b for a, b in zip(bad_single, bad_single[1:]))
    assert all(a > b for a, b in zip(bad_served, bad_served[1:]))
    assert max(fallback_served) <= 0.05


def test_served_calibration_of_a_few_nearly_separable_pools_is_not_a_step():
    """24 validation pools, two of them with no acceptable candidate, far below the rest: the
    unregularized per-K fit is a step (slope over 10 at every K here, 81 on Qwen's benign
    K=1 pools); the shrunk fit keeps one moderate slope and an intercept that falls with K,
    and still puts the bad pools' tops under and the good ones' over one half."""
    from ranker.training.calibrate import fit_served_calibration, logistic, with_bias

    rng = np.random.default_rng(1)
    ks = (1, 2, 4, 8, 16)
    bad, good = rng.normal(0, 1, (2, 16)), rng.normal(4, 1, (22, 16))
    tops = {k: np.concatenate([bad[:, :k].max(1), good[:, :k].max(1)]) for k in ks}
    ok = {k: np.r_[np.zeros(2), np.ones(22)] for k in ks}
    step = [logistic(with_bias(tops[k].astype(np.float32)[:, None]), torch.from_numpy(ok[k]).float(),
                     init=[1.0, 0.0])[0].item() for k in ks]
    fitted = fit_served_calibration(tops, ok)
    slopes, intercepts = zip(*(fitted[str(k)] for k in ks))
    assert min(step) > 10 and max(slopes) < 3 and min(slopes) > 0.5
    assert all(a > b for a, b in zip(intercepts, intercepts[1:]))
    for k in ks:
        p = 1 / (1 + np.exp(-(fitted[str(k)][0] * tops[k] + fitted[str(k)][1])))
        assert p[:2].max() < 0.5 < p[2:].min()


def test_served_probability_interpolates_between_fitted_list_sizes():
    model = SRRScorer(ScorerConfig(base_model="m", layers=[1], pooling="mean", hidden_size=4,
                                   served_calibration={"1": [1.0, 0.0], "4": [1.0, -2.0]}))
    ninf = float("-inf")
    p = model.probability(torch.tensor([[0.0, 0.0, ninf, ninf], [0.0, 0.0, 0.0, 0.0]]))
    assert p[0, :2].tolist() == pytest.approx([torch.sigmoid(torch.tensor(-1.0)).item()] * 2)  # K=2
    assert p[1].tolist() == pytest.approx([torch.sigmoid(torch.tensor(-2.0)).item()] * 4)
    assert p[0, 2:].tolist() == [0.0, 0.0]
    assert model.probability(torch.zeros(32)).tolist() == pytest.approx([p[1, 0].item()] * 32)


def _toy_prefix_lists(n: int = 300):
    """A toy scorer and n lists of 8 candidates whose prefix means are their whole means plus
    noise that shrinks as the prefix grows."""
    from ranker.capture import PREFIX_TOKENS
    from ranker.scorer import ScorerConfig, SRRScorer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    width = 12
    scorer = SRRScorer(ScorerConfig("toy", [3], "mean", width, d_model=16, n_heads=2)).eval()
    noise = {8: 1.0, 16: 0.5, 32: 0.2}
    lists = []
    for _ in range(n):
        instr = rng.normal(size=(1, width))
        feats = []
        for _ in range(8):
            mean = rng.normal(size=(1, width))
            prefixes = np.stack([mean + noise[t] * rng.normal(size=(1, width)) for t in PREFIX_TOKENS])
            feats.append(Features([3], instr, mean, mean, 64, prefixes))
        lists.append(feats)
    return scorer, lists


def test_prefix_rules_hold_their_bounds_on_the_lists_they_are_fitted_on():
    """Each bound of the guard's rule fails on at most alpha of the lists, and partial states
    nearer the end (less noise) let it decide more often."""
    from ranker.policy import RULE_THRESHOLDS
    from ranker.training.prefixes import fit, movements

    alpha = 0.05
    scorer, lists = _toy_prefix_lists()
    moves = movements(scorer, lists)
    rules = fit(moves, alpha)
    decided = {}
    for t, m in moves.items():
        r = rules[str(t)]
        assert (m["winner_gap"] > r.prune_gap).mean() <= alpha
        decided[t] = 0
        for h in RULE_THRESHOLDS:
            exit_below, commit_above = r.bounds(h)
            assert ((m["prefix_p"] < exit_below) & (m["served_p"] >= h)).mean() <= alpha
            assert ((m["prefix_p"] >= commit_above) & (m["leader_final_p"] < h)).mean() <= alpha
            decided[t] += ((m["prefix_p"] < exit_below) | (m["prefix_p"] >= commit_above)).mean()
    assert rules["32"].prune_gap < rules["8"].prune_gap
    assert decided[32] > decided[8]


def test_the_alpha_sweep_trades_tokens_for_agreement_with_pruning_off():
    """`srr prefixes --sweep`: a larger alpha stops more (fewer tokens, more exits) and agrees
    less often with the decision pruning off makes; at the default alpha they seldom differ."""
    from ranker.training.prefixes import sweep

    scorer, lists = _toy_prefix_lists(150)
    out = sweep(scorer, lists, [[64] * 8 for _ in lists], alphas=(0.01, 0.10))
    low, high = out["0.01"], out["0.10"]
    assert 0 < high["tokens_ratio"] < low["tokens_ratio"] <= 1
    assert high["exits"] > low["exits"]
    assert high["same_decision"] <= low["same_decision"]
    assert low["same_decision"] >= 0.9 and low["lists"] == 150


def test_the_prefix_head_learns_the_final_scores_and_leaves_the_scorer_alone(tmp_path):
    """`srr prefixes` trains a second head to score partial responses as the scorer scores
    whole ones: on lists it never saw, it is nearer the final scores than the scorer reading
    the same prefixes; the scorer's own head is untouched; the checkpoint round-trips."""
    from ranker.capture import PREFIX_TOKENS
    from ranker.scorer import ScorerConfig, SRRScorer
    from ranker.training.prefixes import judged, tune

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    width = 12
    scorer = SRRScorer(ScorerConfig("toy", [3], "mean", width, d_model=16, n_heads=2)).eval()
    drift = rng.normal(size=(1, width))  # prefixes differ from the whole in a consistent way

    def pool(n=16):
        instr = rng.normal(size=(1, width))
        cands = []
        for j in range(n):
            mean = rng.normal(size=(1, width))
            prefixes = np.stack([mean + drift * (3 - i) + 0.1 * rng.normal(size=(1, width))
                                 for i in range(len(PREFIX_TOKENS))])
            cands.append(Candidate(j, "", [], None, Features([3], instr, mean, mean, 64, prefixes)))
        return cands

    tuned = tune(scorer, {f"p{i}": pool() for i in range(60)}, epochs=20)
    held = [[c.features for c in pool(8)] for _ in range(40)]
    final, _ = judged(scorer, held)
    for j in range(len(PREFIX_TOKENS)):
        at = [[f.at_prefix(j) for f in fs] for fs in held]
        before = np.mean((judged(scorer, at, partial=True)[0] - final) ** 2)
        after = np.mean((judged(tuned, at, partial=True)[0] - final) ** 2)
        assert after < 0.5 * before, (j, before, after)
    assert np.allclose(judged(tuned, held)[0], final, atol=1e-5)
    tuned.save_pretrained(tmp_path)
    again = SRRScorer.from_pretrained(tmp_path)
    assert again.config.prefix_head and np.allclose(judged(again, held, partial=True)[0],
                                                    judged(tuned, held, partial=True)[0], atol=1e-5)


def test_an_early_stream_sends_pieces_then_the_end_or_the_error_as_its_last_event():
    import asyncio

    from server.api.streaming import DONE, EarlyStream

    async def run(outcome):
        early = EarlyStream("id")
        loop = asyncio.get_running_loop()
        work = loop.create_future()

        async def generate():
            for p in ("b", "c"):
                await early.pieces.put(p)
                await asyncio.sleep(0)
            early.pieces.put_nowait("d")  # sent before the request ends: still streamed
            work.set_exception(outcome) if isinstance(outcome, Exception) else work.set_result(outcome)

        task = asyncio.ensure_future(generate())
        events = [e async for e in early.events("a", work, head=["<head>"], piece=str.upper,
                                                end=lambda r: [f"<end {r}>"])]
        await task
        return events

    assert asyncio.run(run("ok")) == ["<head>", "A", "B", "C", "D", "<end ok>"]
    failure = RuntimeError("boom")
    failure.message, failure.type = "the engine failed", "server_error"
    *text, error, done = asyncio.run(run(failure))
    assert text == ["<head>", "A", "B", "C", "D"] and done == DONE
    assert json.loads(error.removeprefix("data: "))["error"] == {"message": "the engine failed", "type": "server_error"}


def test_decision_bench_times_every_shipped_scorer_at_every_k(tmp_path):
    """`srr bench --workload decision` runs without an engine and reports each K."""
    from test_models import srr

    from server.bench import DECISION_KS

    out = srr("bench", "--workload", "decision", "--requests", "3", "--out", str(tmp_path / "d.json"),
              timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "d.json").read_text())["decision"]
    weights = Path(__file__).resolve().parent.parent / "weights"
    configs = [SRRScorer.from_pretrained(weights / name).config for name in MODELS]
    assert set(res) == {f"{c.name}@{c.version}" for c in configs}
    for rows in res.values():
        assert all(0 < rows[f"decide/{k}"]["p50_ms"] <= rows[f"decide/{k}"]["p99_ms"] for k in DECISION_KS)
    qwen = next(rows for name, rows in res.items() if name.startswith("srr-qwen"))
    assert "guard look/8" in qwen  # the default's scorer has prefix rules


def test_risk_gate_rules_apply_to_requests_judged_harmful_only():
    """`srr diagnose risk-gate`: a floor raises the threshold, and "refusal only" serves only a
    refusal, on a request the risk head judges harmful; one judged benign is decided as shipped."""
    from ranker.evaluation.gate import RULES, served

    scores, probs, ok = [2.0, 1.0], [0.6, 0.4], [False, True]  # the best (0) clears 0.3, is harmful
    answer, refusal = [False, False], [True, False]
    for harmful in (False, True):
        assert served(0.3, "shipped", harmful, scores, probs, answer, ok, fallback_ok=harmful) is False
    assert served(0.3, "floor 0.5", True, scores, probs, answer, ok, True) is False  # 0.6 >= 0.5: served
    assert served(0.3, "floor 0.7", True, scores, probs, answer, ok, True) is True  # the fallback
    assert served(0.3, "floor 0.7", False, scores, probs, answer, ok, False) is False  # not gated
    assert served(0.3, "refusal only", True, scores, probs, answer, ok, True) is True  # not a refusal
    assert served(0.3, "refusal only", True, scores, probs, refusal, ok, True) is False  # a refusal: served
    assert served(0.7, "shipped", False, scores, probs, answer, ok, False) is False  # fallback on benign
    assert RULES[0] == "shipped" and "refusal only" in RULES


def test_risk_gate_report_renders_every_set_and_rule():
    from ranker.evaluation.gate import RULES
    from ranker.training.render import gate_md

    row = {"by_k": {1: 0.5, 2: 0.5, 4: 0.5, 8: 0.75, 16: 1.0}, "k8_ci90": [0.5, 1.0], "trend": 0.5}
    report = {"sets": {"advbench": {"n": 4, "flagged": 1.0, **{rule: row for rule in RULES}}},
              "config": {"scorer": "srr@x", "threshold": 0.3, "risk_threshold": 0.5, "max_tokens": 64,
                         "seed": 0, "seconds": 1}}
    md = gate_md(report)
    assert md.count("| AdvBench (4, 1.00) |") == len(RULES)
    assert "| floor 0.7 | 0.500 | 0.750 [0.500, 1.000] | 1.000 | +0.500 |" in md
