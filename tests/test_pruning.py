"""Pruning, early exit and early streaming through the chat handler and the HTTP server, on
the real engine (vLLM serving SmolLM2-135M-Instruct). The guard's rules are set so that each
behaviour is certain (a fitted calibration is measured in `srr prefixes`, not here)."""

from __future__ import annotations

import copy
import json
import shutil

import httpx
import pytest

from ranker.batching import BatchScorer
from ranker.capture import PREFIX_TOKENS
from ranker.policy import RULE_THRESHOLDS
from server.api.config import Settings
from server.api.protocol import APIError, ChatCompletionRequest, completion_id
from server.api.serving_chat import ServingChat
from server.api.streaming import EarlyStream

from conftest import SCORER_DIR, ServerProcess, metric

K, TOKENS = 4, PREFIX_TOKENS[-1] + 16
ASK = [{"role": "user", "content": "Describe a walk along a river."}]
NEVER = 1e9


def rule(prune_gap: float, exit_below: float, commit_above: float) -> dict:
    return {"prune_gap": prune_gap, "exit_below": {f"{t:.2f}": exit_below for t in RULE_THRESHOLDS},
            "commit_above": {f"{t:.2f}": commit_above for t in RULE_THRESHOLDS}}


PRUNE = rule(0.0, 0.0, 2.0)  # all but the leader
EXIT = rule(NEVER, 2.0, 2.0)  # no one can be served
COMMIT = rule(NEVER, 0.0, 0.0)  # the leader will be


def with_rules(scorer, rule: dict | None, at: int = PREFIX_TOKENS[0]):
    s = copy.deepcopy(scorer)
    s.config.prefix_rules = {} if rule is None else {str(at): rule}
    return s


def chat(engine, scorer, srr=None, early=None, n=1, **settings):
    handler = ServingChat(Settings(**settings), engine, scorer, BatchScorer(scorer))
    req = ChatCompletionRequest(model=engine.served_model_name, messages=ASK, max_tokens=TOKENS, n=n,
                                ignore_eos=True, srr={"candidates": K, "return_candidates": True, **(srr or {})})
    return engine.run(handler.create(req, early))


def test_pruning_stops_the_candidates_behind_and_serves_the_one_left(engine, scorer):
    r = chat(engine, with_rules(scorer, PRUNE), prune=True, threshold=0.0)
    info = r.srr
    assert sum(info.pruned) == K - 1 and info.decided is None
    (left,) = [i for i, p in enumerate(info.pruned) if not p]
    assert info.selected == left and r.choices[0].message.content == info.candidate_texts[left]
    assert info.candidate_tokens[left] == TOKENS
    assert all(n < TOKENS for n, p in zip(info.candidate_tokens, info.pruned) if p)
    assert [f == "abort" for f in info.candidate_finish_reasons] == info.pruned
    assert r.usage.completion_tokens == sum(info.candidate_tokens) < K * TOKENS


def test_early_exit_answers_the_fallback_before_the_candidates_end(engine, scorer):
    r = chat(engine, with_rules(scorer, EXIT), prune=True, threshold=0.5)
    info = r.srr
    assert info.decided == "exit" and info.decided_at_tokens == PREFIX_TOKENS[0]
    assert all(info.pruned) and info.selected is None and info.fallback == "refuse"
    assert r.choices[0].message.content == Settings().refusal_text
    assert r.usage.completion_tokens == sum(info.candidate_tokens) < K * TOKENS


def test_a_commit_streams_the_winner_as_it_is_generated(engine, scorer):
    early = EarlyStream(completion_id())
    r = chat(engine, with_rules(scorer, COMMIT), early=early, prune=True, threshold=0.5)
    pieces = []
    while not early.pieces.empty():
        pieces.append(early.pieces.get_nowait())
    info = r.srr
    assert info.decided == "commit" and info.decided_at_tokens == PREFIX_TOKENS[0]
    assert sum(info.pruned) == K - 1 and not info.pruned[info.selected]
    assert r.id == early.id
    assert len(pieces) > 2 and "".join(pieces) == r.choices[0].message.content == info.candidate_texts[info.selected]


def test_the_request_overrides_the_server_setting(engine, scorer):
    off = chat(engine, with_rules(scorer, EXIT), {"prune": False}, prune=True, threshold=0.5)
    assert not any(off.srr.pruned) and off.srr.decided is None
    assert off.srr.candidate_tokens == [TOKENS] * K
    on = chat(engine, with_rules(scorer, EXIT), {"prune": True}, prune=False, threshold=0.5)
    assert on.srr.decided == "exit"


def test_n_best_are_never_pruned_away(engine, scorer):
    r = chat(engine, with_rules(scorer, PRUNE), n=2, prune=True, threshold=0.0)
    assert not any(r.srr.pruned) and len(r.choices) == 2


def test_pruning_with_a_scorer_that_has_no_prefix_calibration_is_a_400(engine, scorer):
    with pytest.raises(APIError) as e:
        chat(engine, with_rules(scorer, None), {"prune": True})
    assert e.value.status == 400 and e.value.param == "srr.prune"


def test_serve_refuses_to_prune_with_a_scorer_that_cannot(model_dir, tmp_path):
    from test_models import srr

    shutil.copytree(SCORER_DIR, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["prefix_rules"] = {}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = srr("serve", "--scorer-dir", str(tmp_path), "--prune", timeout=300)
    assert out.returncode != 0 and "srr prefixes" in out.stderr


@pytest.fixture(scope="module")
def committing_server(tmp_path_factory):
    """`srr serve --prune` with a scorer whose rule commits at the first checkpoint."""
    folder = tmp_path_factory.mktemp("scorer")
    shutil.copytree(SCORER_DIR, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["prefix_rules"] = {str(PREFIX_TOKENS[0]): COMMIT}
    (folder / "config.json").write_text(json.dumps(config))
    with ServerProcess(args=["--scorer-dir", str(folder), "--prune", "--threshold", "0.5",
                             "--max-tokens", str(TOKENS)]) as srv:
        yield srv


def test_the_http_stream_begins_at_the_commit(committing_server):
    from openai import OpenAI

    base = committing_server.base
    commits = metric(base, "srr_early_commits_total")
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    chunks = list(client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=TOKENS, stream=True,
        extra_body={"ignore_eos": True, "srr": {"candidates": K, "return_candidates": True}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    srr = chunks[-1].model_extra["srr"]
    assert srr["decided"] == "commit" and sum(srr["pruned"]) == K - 1
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    assert text == srr["candidate_texts"][srr["selected"]]
    assert len({c.id for c in chunks}) == 1
    assert metric(base, "srr_early_commits_total") == commits + 1
    assert metric(base, "srr_pruned_candidates_total") >= K - 1
    # A stream that fails validation is still a JSON error, not a stream.
    bad = httpx.post(base + "/v1/chat/completions", json={"model": "nope", "messages": ASK, "stream": True})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"


def test_a_completion_stream_begins_at_the_commit(committing_server):
    from openai import OpenAI

    client = OpenAI(base_url=committing_server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    chunks = list(client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="A walk along a river, described:", max_tokens=TOKENS,
        stream=True, extra_body={"ignore_eos": True, "srr": {"candidates": K, "return_candidates": True}}))
    srr = chunks[-1].model_extra["srr"]
    assert srr["decided"] == "commit" and sum(srr["pruned"]) == K - 1
    assert len([c for c in chunks if c.choices[0].text]) > 2
    assert "".join(c.choices[0].text for c in chunks) == srr["candidate_texts"][srr["selected"]]
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1].usage.completion_tokens == sum(srr["candidate_tokens"])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_a_response_stream_begins_at_the_commit(committing_server):
    from openai import OpenAI

    client = OpenAI(base_url=committing_server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    events = list(client.responses.create(
        model="SmolLM2-135M-Instruct", input=ASK[0]["content"], max_output_tokens=TOKENS, stream=True,
        extra_body={"seed": 0, "srr": {"candidates": K, "return_candidates": True}}))
    final = events[-1].response
    srr = final.model_dump()["srr"]
    assert srr["decided"] == "commit" and sum(srr["pruned"]) == K - 1
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 2 and "".join(deltas) == final.output_text == srr["candidate_texts"][srr["selected"]]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress",
                                            "response.output_item.added", "response.content_part.added"]
    assert {e.response.id for e in events if hasattr(e, "response")} == {final.id}
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {final.output[0].id}
    assert final.usage.output_tokens == sum(srr["candidate_tokens"])
