"""Each shipped scorer's card and evaluation report are what the code writes from its evidence,
and they describe the checkpoint that ships: a retrain without `srr eval` fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ranker.models import MODELS
from ranker.scorer import SRRScorer
from ranker.training import dataset
from ranker.training.render import families_md, gate_md, lengths_md, model_card_md, report_md

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
SHIPPED = WEIGHTS / "smollm2-135m-instruct"
# every named model ships a scorer (weights/<name>), each with its card and evaluation report
each_shipped = pytest.mark.parametrize("shipped", [WEIGHTS / name for name in MODELS], ids=list(MODELS))


def constants(shipped: Path) -> dict:
    return {"BASE_MODEL": SRRScorer.from_pretrained(shipped).config.base_model,
            **{name: getattr(dataset, name)
               for name in ("POOL_K", "POOL_TOKENS", "PREFILLED", "DNA_PROMPTS", "SPLIT")}}


@each_shipped
def test_model_card_is_written_from_the_training_report(shipped):
    report = json.loads((shipped / "training.json").read_text())
    assert (shipped / "README.md").read_text() == model_card_md(report, constants(shipped))


def test_a_reduced_run_says_so_on_its_card():
    report = json.loads((SHIPPED / "training.json").read_text())
    known = constants(SHIPPED)
    report["training"]["scale"] = 0.08
    assert "**A reduced run**: trained on a seeded 8% share" in model_card_md(report, known)
    report["training"]["scale"] = 1.0
    assert "reduced run" not in model_card_md(report, known)


@each_shipped
def test_training_report_describes_the_shipped_checkpoint(shipped):
    config = SRRScorer.from_pretrained(shipped).config
    chosen = json.loads((shipped / "training.json").read_text())["chosen"]
    assert (config.layers, config.pooling) == ([chosen["layer"]], chosen["pooling"])
    assert (config.calib_a, config.calib_b, config.threshold) == (
        chosen["calib_a"], chosen["calib_b"], chosen["threshold"])


@each_shipped
def test_evaluation_report_is_of_the_shipped_checkpoint(shipped):
    report = json.loads((shipped / "eval" / "report.json").read_text())
    config = SRRScorer.from_pretrained(shipped).config
    assert report["config"]["scorer"] == f"{config.name}@{config.version}"
    assert report["config"]["threshold"] == config.threshold
    assert (shipped / "eval" / "report.md").read_text() == report_md(report)


def test_xstest_families_diagnostic_is_of_the_shipped_checkpoint():
    report = json.loads((SHIPPED / "eval" / "xstest-families.json").read_text())
    config = SRRScorer.from_pretrained(SHIPPED).config
    assert report["scorer"] == f"{config.name}@{config.version}"
    assert (report["layer"], report["pooling"]) == (config.layers[0], config.pooling)
    assert (SHIPPED / "eval" / "xstest-families.md").read_text() == families_md(report)


@each_shipped
def test_risk_gate_diagnostic_is_of_the_shipped_checkpoint(shipped):
    report = json.loads((shipped / "eval" / "risk-gate.json").read_text())
    config = SRRScorer.from_pretrained(shipped).config
    assert report["config"]["scorer"] == f"{config.name}@{config.version}"
    assert (report["config"]["threshold"], report["config"]["risk_threshold"]) == (
        config.threshold, config.risk_threshold)
    assert (shipped / "eval" / "risk-gate.md").read_text() == gate_md(report)


def test_length_check_is_of_the_default_models_shipped_checkpoint():
    default = WEIGHTS / "qwen2.5-coder-0.5b-instruct"
    report = json.loads((default / "eval" / "lengths.json").read_text())
    config = SRRScorer.from_pretrained(default).config
    assert report["config"]["scorer"] == f"{config.name}@{config.version}"
    assert report["config"]["threshold"] == config.threshold and report["config"]["lengths"] == [64, 256]
    assert (default / "eval" / "lengths.md").read_text() == lengths_md(report)
