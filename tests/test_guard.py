"""The guard on the real engine: candidates are stopped one by one, all at once, or all but
a winner, at the prefix checkpoints, and what the guard reads there is what capture keeps."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.capture import PREFIX_TOKENS
from ranker.policy import Verdict

MAX = PREFIX_TOKENS[-1] + 24


def params(n: int, **kw):
    from vllm import SamplingParams

    return SamplingParams(n=n, temperature=1.0, max_tokens=MAX, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def ids(engine):
    return engine.prompt_ids([{"role": "user", "content": "Describe a walk along a beach."}])


class Recorder:
    """A guard that returns the verdicts it is given, checkpoint by checkpoint, and keeps
    what it was shown."""

    def __init__(self, *verdicts: Verdict):
        self.verdicts = list(verdicts)
        self.seen: list[tuple[int, dict, list[int]]] = []

    async def __call__(self, j, feats, running):
        self.seen.append((j, feats, running))
        return self.verdicts[j] if j < len(self.verdicts) else Verdict()


def test_candidate_i_is_the_request_seeded_seed_plus_i(engine, ids):
    """As vLLM's own n: candidate i of a seeded request is a lone request seeded seed + i.
    A few tokens only: a batch of 3 and a batch of 1 may round logits differently, and a
    long enough sample would then part ways at a near-tie (seen once, after 22 tokens)."""
    from vllm import SamplingParams

    short = lambda n, seed: SamplingParams(n=n, temperature=1.0, max_tokens=6, ignore_eos=True, seed=seed)  # noqa: E731
    k = engine.run(engine.generate(ids, short(3, 11)))
    alone = [engine.run(engine.generate(ids, short(1, 11 + i))).candidates[0] for i in range(3)]
    assert [c.token_ids for c in k.candidates] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in k.candidates}) == 3


def test_a_guard_that_stops_nothing_stops_nothing(engine, ids):
    guard = Recorder()
    watched = engine.run(engine.generate(ids, params(3, seed=3), guard=guard))
    assert all(len(c.token_ids) == MAX and c.finish_reason == "length" for c in watched.candidates)
    assert [j for j, _, _ in guard.seen] == list(range(len(PREFIX_TOKENS)))
    # What the guard read at each checkpoint is the prefix mean capture kept.
    for j, feats, running in guard.seen:
        assert running == [0, 1, 2]
        for i, f in feats.items():
            assert f.response_rows == PREFIX_TOKENS[j]
            np.testing.assert_allclose(f.mean, watched.candidates[i].features.prefixes[j], rtol=1e-5, atol=1e-5)
    assert watched.decided is None and not any(c.pruned for c in watched.candidates)


def test_pruned_candidates_stop_early_and_the_rest_run_on(engine, ids):
    gen = engine.run(engine.generate(ids, params(4, seed=5), guard=Recorder(Verdict(prune=frozenset({1, 2})))))
    for c in gen.candidates:
        if c.index in (1, 2):
            assert c.pruned and c.finish_reason == "abort"
            assert PREFIX_TOKENS[0] < len(c.token_ids) < MAX
        else:
            assert not c.pruned and len(c.token_ids) == MAX and c.finish_reason == "length"
    assert gen.decided is None
    # A pruned candidate's features are what it had when stopped: still fetched and finite.
    assert all(np.isfinite(c.features.mean).all() for c in gen.candidates)


def test_exit_stops_every_candidate_at_once(engine, ids):
    gen = engine.run(engine.generate(ids, params(4), guard=Recorder(Verdict(exit=True))))
    assert gen.decided == "exit" and gen.decided_at == PREFIX_TOKENS[0]
    assert all(c.pruned and len(c.token_ids) < MAX for c in gen.candidates)
    assert engine.run(engine.info())["open"] == 0  # nothing left behind in the worker


def test_commit_streams_the_winner_from_the_decision_on(engine, ids):
    pieces: list[str] = []
    guard = Recorder(Verdict(), Verdict(commit=2))
    gen = engine.run(engine.generate(ids, params(4), guard=guard, on_text=pieces.append))
    assert gen.decided == "commit" and gen.decided_at == PREFIX_TOKENS[1]
    winner = gen.candidates[2]
    assert not winner.pruned and len(winner.token_ids) == MAX
    assert "".join(pieces) == winner.text and len(pieces) > 2  # streamed piece by piece
    assert all(c.pruned for c in gen.candidates if c.index != 2)
    assert len(guard.seen) == 2  # nothing left to decide after a commit
