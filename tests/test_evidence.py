"""The shipped scorer's card and evaluation report are what the code writes from its evidence,
and they describe the checkpoint that ships: a retrain without `srr eval` fails here."""

from __future__ import annotations

import json
from pathlib import Path

from ranker.scorer import SRRScorer
from ranker.training import dataset
from ranker.training.render import families_md, model_card_md, report_md

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "smollm2-135m-instruct"
CONSTANTS = {"BASE_MODEL": SRRScorer.from_pretrained(SHIPPED).config.base_model,
             **{name: getattr(dataset, name)
                for name in ("POOL_K", "POOL_TOKENS", "PREFILLED", "DNA_PROMPTS", "SPLIT")}}


def test_model_card_is_written_from_the_training_report():
    report = json.loads((SHIPPED / "training.json").read_text())
    assert (SHIPPED / "README.md").read_text() == model_card_md(report, CONSTANTS)


def test_a_reduced_run_says_so_on_its_card():
    report = json.loads((SHIPPED / "training.json").read_text())
    report["training"]["scale"] = 0.08
    assert "**A reduced run**: trained on a seeded 8% share" in model_card_md(report, CONSTANTS)
    report["training"]["scale"] = 1.0
    assert "reduced run" not in model_card_md(report, CONSTANTS)


def test_training_report_describes_the_shipped_checkpoint():
    config = SRRScorer.from_pretrained(SHIPPED).config
    chosen = json.loads((SHIPPED / "training.json").read_text())["chosen"]
    assert (config.layers, config.pooling) == ([chosen["layer"]], chosen["pooling"])
    assert (config.calib_a, config.calib_b, config.threshold) == (
        chosen["calib_a"], chosen["calib_b"], chosen["threshold"])


def test_evaluation_report_is_of_the_shipped_checkpoint():
    report = json.loads((SHIPPED / "eval" / "report.json").read_text())
    config = SRRScorer.from_pretrained(SHIPPED).config
    assert report["config"]["scorer"] == f"{config.name}@{config.version}"
    assert report["config"]["threshold"] == config.threshold
    assert (SHIPPED / "eval" / "report.md").read_text() == report_md(report)


def test_xstest_families_diagnostic_is_of_the_shipped_checkpoint():
    report = json.loads((SHIPPED / "eval" / "xstest-families.json").read_text())
    config = SRRScorer.from_pretrained(SHIPPED).config
    assert report["scorer"] == f"{config.name}@{config.version}"
    assert (report["layer"], report["pooling"]) == (config.layers[0], config.pooling)
    assert (SHIPPED / "eval" / "xstest-families.md").read_text() == families_md(report)
