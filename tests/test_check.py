"""`srr check` on both named models, and the scorer `srr serve` picks for a model (or
refuses). Each check starts its own engines in a subprocess; no engine of this process is
alive meanwhile."""

from __future__ import annotations

import json

import pytest

from conftest import SCORER_DIR, SUITE_MODEL
from test_models import srr


def test_serve_picks_the_scorer_shipped_for_a_named_model(model_dir, tmp_path):
    from server.cli import scorer_dir_of

    assert scorer_dir_of(None, model_dir) == SCORER_DIR
    assert scorer_dir_of(tmp_path / "mine", model_dir) == tmp_path / "mine"
    with pytest.raises(SystemExit, match="--scorer-dir"):
        scorer_dir_of(None, tmp_path / "some-other-model")


def test_serve_refuses_a_scorer_of_another_model():
    from ranker import models

    qwen = models.prepare("qwen2.5-coder-0.5b-instruct")
    out = srr("serve", "--model-dir", str(qwen), "--scorer-dir",
              str(SCORER_DIR), timeout=300)
    assert out.returncode != 0
    assert "hidden size 576" in out.stderr and "has 896" in out.stderr


def test_check_passes_on_the_default_model_with_its_shipped_scorer():
    """Qwen2.5-Coder-0.5B-Instruct and weights/qwen2.5-coder-0.5b-instruct."""
    out = srr("check", "--k", "3", "--max-tokens", "16")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    table = out.stdout
    for check in ("scorer fits the model", "capture op fires in the compiled graph",
                  "scorer scores the candidates", "states match transformers",
                  "request latency, with / without capture"):
        assert any(line.startswith("ok") and check in line for line in table.splitlines()), table


def test_check_fails_on_a_scorer_that_does_not_fit(tmp_path):
    import shutil

    scorer = tmp_path / "scorer"
    shutil.copytree(SCORER_DIR, scorer,
                    ignore=shutil.ignore_patterns("eval"))
    config = json.loads((scorer / "config.json").read_text())
    config["layers"] = [40]
    (scorer / "config.json").write_text(json.dumps(config))
    out = srr("check", "--model-dir", SUITE_MODEL, "--scorer-dir", str(scorer), timeout=300)
    assert out.returncode == 1
    assert "FAIL  scorer fits the model" in out.stdout and "layer(s) [40]" in out.stdout


def test_check_passes_on_a_model_without_a_scorer(tmp_path):
    """A model of the user's own has no scorer before `srr train`: check captures at the
    training sweep's layers and skips the scorer's rows."""
    from ranker import models

    mine = tmp_path / "my-model"  # not a named model's folder: no shipped scorer
    mine.symlink_to(models.prepare(SUITE_MODEL))
    out = srr("check", "--model-dir", str(mine), "--k", "3", "--max-tokens", "16", "--no-baseline")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "with / without capture" not in out.stdout  # --no-baseline: no plain engine
    assert "none given: capture checked at the training sweep [4, 7, 11, 15, 18, 22, 26]" in out.stdout
    assert "ok    capture op fires in the compiled graph" in out.stdout
    assert "ok    states match transformers" in out.stdout
