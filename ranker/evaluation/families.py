"""`srr diagnose xstest-families`: rankers trained on XSTest's labelled completions to every
prompt family but one, tested on that one (and with writers held out too). Nothing of it
ships: XSTest is evaluation data."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np

from ranker.evaluation.ranking import TEXT_RANKER, text_lists
from ranker.scorer import ScorerConfig, SRRScorer
from ranker.training import data
from ranker.training.dataset import SEEDS, feature_store, start_engine, xstest_items
from ranker.training.embed import MiniLM
from ranker.training.fit import predict, train
from ranker.training.lists import Item, RankList, make_lists, trainable
from ranker.training.render import families_md
from ranker.training.stats import by_kind, seed_mean
from ranker.training.store import encode_pairs


# XSTest's prompt families: a safe type and the contrast_ type that mirrors it are one family,
# and so are the two discrimination types and the two privacy types (each pair shares one
# contrast type), so a held-out prompt's near-copy of the opposite label is never trained on.
XSTEST_TWINS = {"nons_group_real_discr": "discr", "real_group_nons_discr": "discr",
                "privacy_public": "privacy", "privacy_fictional": "privacy"}


def xstest_family(category: str) -> str:
    c = category.removeprefix("contrast_")
    return XSTEST_TWINS.get(c, c)


def crossfit_scores(config: ScorerConfig, lists: list[RankList], family: list[str], epochs: int,
                    seed: int) -> list[np.ndarray]:
    """Each list's scores from a scorer trained on the lists of every other family."""
    scores: list = [None] * len(lists)
    for f in sorted(set(family)):
        model = train(config, [x for x, g in zip(lists, family) if g != f], epochs=epochs,
                      seed=seed, progress=False)
        held = [i for i, g in enumerate(family) if g == f]
        for i, s in zip(held, predict(model, [lists[i] for i in held])):
            scores[i] = s
    return scores


def family_summary(runs: list[list[np.ndarray]], lists: list[RankList], family: list[str]) -> dict:
    """`by_kind` over all lists and per family; over several runs (seeds), their mean and
    standard deviation."""
    def summary(keep: list[bool]) -> dict:
        part = [x for x, k in zip(lists, keep) if k]
        res = [by_kind([s for s, k in zip(run, keep) if k], part) for run in runs]
        return res[0] if len(res) == 1 else seed_mean(res)

    return {"all": summary([True] * len(lists)),
            "by_family": {f: summary([g == f for g in family]) for f in sorted(set(family))}}


def by_writers(lists: list[RankList], writers: list[list[str]], keep: set[str]
               ) -> tuple[list[RankList], list[int]]:
    """The lists cut to the candidates of `keep` writers, and the index each came from."""
    out, index = [], []
    for i, (x, ws) in enumerate(zip(lists, writers)):
        sel = [j for j, w in enumerate(ws) if w in keep]
        if sel:
            out.append(dataclasses.replace(x, candidates=x.candidates[sel], labels=x.labels[sel]))
            index.append(i)
    return out, index


def crossfit_writer_pairs(config: ScorerConfig, lists: list[RankList], family: list[str],
                          writers: list[list[str]], epochs: int, seed: int,
                          shipped: SRRScorer | None = None) -> dict:
    """Prompt family and writers both held out: for each pair of writers and each family, a
    scorer trained on the other writers' answers to the other families ranks the pair's two
    answers to the family's prompts. `by_kind` over all such two-answer lists and per pair
    (with the pair's training lists that hold both labels, over all families), and the same
    lists scored by `shipped` (which saw no XSTest writer) where given."""
    names = sorted({w for ws in writers for w in ws})
    tested, scores, pairs = [], [], {}
    for pair in itertools.combinations(names, 2):
        train_lists, train_index = by_writers(lists, writers, set(names) - set(pair))
        test_lists, test_index = by_writers(lists, writers, set(pair))
        pair_tested, pair_scores = [], []
        for f in sorted(set(family)):
            model = train(config, [x for x, i in zip(train_lists, train_index) if family[i] != f],
                          epochs=epochs, seed=seed, progress=False)
            held = [x for x, i in zip(test_lists, test_index) if family[i] == f]
            pair_tested += held
            pair_scores += predict(model, held)
        contrast = trainable(train_lists)
        pairs["+".join(pair)] = {
            **by_kind(pair_scores, pair_tested),
            "n_train_harmful": sum(x.prompt_harmful is not False for x in contrast),
            "n_train_benign": sum(x.prompt_harmful is False for x in contrast)}
        tested += pair_tested
        scores += pair_scores
    out = {"crossfit": by_kind(scores, tested), "pairs": pairs}
    if shipped is not None:
        out["shipped"] = by_kind(predict(shipped, tested), tested)
    return out


def xstest_families(scorer: SRRScorer, items: list[Item], store, epochs: int,
                    seeds=SEEDS) -> dict:
    """A diagnostic; nothing of it ships (XSTest is evaluation data only). Rankers trained
    on XSTest's labelled completions to every prompt family but one, tested on that one, beside
    the shipped scorer (which never saw XSTest) on the same lists and features. If they rank
    XSTest's benign lists well, the shipped scorer's miss lies in its training data, not in
    the states; the text-only ranker, trained alike, tells what the text alone carries.
    `writer_pairs`: the same with two of the five writer models held out too."""
    category = data.load_xstest_types()
    cfg = scorer.config
    srr_lists = make_lists(items, store, cfg.layers, cfg.pooling)
    text = text_lists(items, MiniLM())
    assert [x.prompt for x in srr_lists] == [x.prompt for x in text], "an XSTest pair was not encoded"
    family = [xstest_family(category[x.prompt]) for x in srr_lists]
    writers_of: dict[str, list[str]] = {}
    for it in items:
        writers_of.setdefault(it.prompt, []).append(it.writer)
    writers = [writers_of[x.prompt] for x in srr_lists]
    assert [len(w) for w in writers] == [len(x.labels) for x in srr_lists]
    srr_config = ScorerConfig(base_model=cfg.base_model, hidden_size=cfg.hidden_size,
                              layers=cfg.layers, pooling=cfg.pooling)
    return {
        "scorer": f"{cfg.name}@{cfg.version}", "layer": cfg.layers[0], "pooling": cfg.pooling,
        "epochs": epochs, "seeds": list(seeds),
        "shipped": family_summary([predict(scorer, srr_lists)], srr_lists, family),
        "srr": family_summary([crossfit_scores(srr_config, srr_lists, family, epochs, s)
                               for s in seeds], srr_lists, family),
        "text-only": family_summary([crossfit_scores(TEXT_RANKER, text, family, epochs, s)
                                     for s in seeds], text, family),
        "writer_pairs": {
            "srr": crossfit_writer_pairs(srr_config, srr_lists, family, writers, epochs, seeds[0],
                                         shipped=scorer),
            "text-only": crossfit_writer_pairs(TEXT_RANKER, text, family, writers, epochs, seeds[0])},
    }


async def diagnose_xstest_families(model_dir: Path, scorer_dir: Path, out: Path, cache_dir: Path,
                                   epochs: int) -> dict:
    """`srr diagnose xstest-families`: encodes XSTest's labelled completions through the
    serving engine (cached), runs `xstest_families`, writes xstest-families.{json,md}."""
    t0 = time.time()
    scorer = SRRScorer.from_pretrained(scorer_dir)
    items = xstest_items()
    engine = await start_engine(cache_dir, model_dir)
    try:
        store = feature_store(engine)
        await encode_pairs(engine, [(it.prompt, it.response) for it in items], store)
    finally:
        engine.shutdown()
    report = {**xstest_families(scorer, items, store, epochs), "seconds": round(time.time() - t0)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "xstest-families.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "xstest-families.md").write_text(families_md(report))
    return report
