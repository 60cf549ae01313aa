"""Capture inside compiled vLLM matches Hugging Face transformers' hidden states.

The residual stream after decoder layer L is `output_hidden_states[L + 1]` in transformers
(index 0 is the embeddings). Measured noise floor (docs/capture.md): ~0.7% relative error
against HF float32, ~1% against HF bf16; the wrong index or the hidden part alone is 30-100%
off, so these tolerances separate right from wrong.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

TOL_F32 = 0.03
TOL_BF16 = 0.04


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return {dt: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
            for dt in (torch.float32, torch.bfloat16)}


def reference(model, ids: list[int], prompt_len: int, layer: int):
    """(instruction, mean, last) from transformers for prompt + fed response tokens."""
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]
    hs = hs.float().numpy()
    instr = hs[prompt_len - 1]
    if len(ids) == prompt_len:
        return instr, instr, instr
    return instr, hs[prompt_len:].mean(0), hs[-1]


ERRORS: dict[tuple[str, str], list[float]] = {}  # (vector, HF dtype) -> relative errors


@pytest.fixture(scope="module", autouse=True)
def parity_summary():
    """Prints the parity figures after this module's tests (run with -s); each one was held
    to its tolerance where it was measured."""
    yield
    for (name, dtype), errs in sorted(ERRORS.items()):
        print(f"\nparity {name:11} vs HF {dtype:8}: n={len(errs):3} median {np.median(errs):.4f} "
              f"max {max(errs):.4f}", end="")


def check(features, hf, prompt_ids, fed_ids, layer, li=0):
    for dtype, tol in ((torch.float32, TOL_F32), (torch.bfloat16, TOL_BF16)):
        ref = reference(hf[dtype], prompt_ids + fed_ids, len(prompt_ids), layer)
        got = (features.instruction[li], features.mean[li], features.last[li])
        for name, g, r in zip(("instruction", "mean", "last"), got, ref):
            ERRORS.setdefault((name, str(dtype).split(".")[-1]), []).append(rel(g, r))
            assert rel(g, r) < tol, f"{name} vs HF {dtype}: {rel(g, r):.4f}"


def sampling(**kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=1.0, **kw)


def chat(engine, text):
    return engine.prompt_ids([{"role": "user", "content": text}])


def test_op_fires_in_compiled_mode(engine):
    info = engine.run(engine.info())
    assert not engine.llm.vllm_config.model_config.enforce_eager
    assert info["op_calls"] > 0 and info["steps_without_capture"] == 0


def test_engine_runs_the_resolved_dtype(engine):
    from vllm.platforms import current_platform

    from ranker.engine import cpu_flags, resolve_dtype

    want = resolve_dtype("auto", current_platform.is_cpu(), cpu_flags())
    assert engine.dtype == want
    expected = torch.bfloat16 if want == "auto" else getattr(torch, want)  # SmolLM2 is bf16
    assert engine.llm.vllm_config.model_config.dtype == expected


def test_scorer_decides_alike_on_bfloat16_and_float32_states(engine, hf, scorer):
    """The shipped scorer was trained on bfloat16 states, and `auto` serves float32 on a CPU
    without native bfloat16 (resolve_dtype). On the same candidates, states in either precision
    (transformers, the capture's reference above) must give the same pick and about the same
    P(acceptable)."""
    ids = chat(engine, "How do I kill a Python process that hangs?")
    gen = engine.run(engine.generate(ids, sampling(n=6, max_tokens=32, seed=0)))
    layer, pooled = scorer.config.layers[0], 1 if scorer.config.pooling == "mean" else 2
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        refs = [reference(hf[dtype], ids + c.token_ids[:-1], len(ids), layer) for c in gen.candidates]
        out[dtype] = [np.array(v) for v in scorer.score(refs[0][0], np.stack([r[pooled] for r in refs]))]
    (s32, p32), (s16, p16) = out[torch.float32], out[torch.bfloat16]
    assert np.argmax(s32) == np.argmax(s16)
    assert np.abs(p32 - p16).mean() < 0.02, np.abs(p32 - p16)


def test_one_request_matches_hf(engine, hf):
    ids = chat(engine, "Name three uses of copper.")
    gen = engine.run(engine.generate(ids, sampling(n=1, max_tokens=24)))
    (c,) = gen.candidates
    assert c.features.response_rows == len(c.token_ids) - 1  # the last sampled token is never fed
    check(c.features, hf, ids, c.token_ids[:-1], engine.layers[0])


def test_k_candidates_each_match_hf(engine, hf):
    ids = chat(engine, "Write a short note to a neighbour about a lost cat.")
    gen = engine.run(engine.generate(ids, sampling(n=4, max_tokens=20)))
    assert sorted(c.index for c in gen.candidates) == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in gen.candidates}) > 1  # really different samples
    for c in gen.candidates:
        check(c.features, hf, ids, c.token_ids[:-1], engine.layers[0])


def test_concurrent_requests_of_different_lengths(engine, hf):
    prompts = ["Hi", "Explain in detail how a refrigerator moves heat from inside to outside, "
               "including the role of the compressor and the refrigerant.", "What is 2+2?"]
    lengths = [5, 30, 12]

    async def many():
        return await asyncio.gather(*(
            engine.generate(chat(engine, p), sampling(n=2, max_tokens=m))
            for p, m in zip(prompts, lengths)))

    gens = engine.run(many())
    for p, gen in zip(prompts, gens):
        ids = chat(engine, p)
        for c in gen.candidates:
            check(c.features, hf, ids, c.token_ids[:-1], engine.layers[0])


def test_prefix_cache_hit_keeps_parity(engine, hf):
    # Longer than one 128-token KV block, so the repeat reuses cached blocks.
    long = "Summarize the following list of facts about rivers. " + " ".join(
        f"Fact {i}: rivers carry sediment and shape valleys over time." for i in range(30))
    ids = chat(engine, long)
    first = engine.run(engine.generate(ids, sampling(n=1, max_tokens=8)))
    second = engine.run(engine.generate(ids, sampling(n=1, max_tokens=8)))
    c2 = second.candidates[0]
    assert second.rows[0] < len(ids) + len(c2.token_ids) - 1, "expected a prefix-cache hit"
    for gen in (first, second):
        c = gen.candidates[0]
        check(c.features, hf, ids, c.token_ids[:-1], engine.layers[0])


def test_encode_path_equals_capture(engine, hf):
    ids = chat(engine, "Give one tip for sleeping better.")
    gen = engine.run(engine.generate(ids, sampling(n=3, max_tokens=16)))
    feats = engine.run(engine.encode(ids, [c.token_ids[:-1] for c in gen.candidates]))
    for c, f in zip(gen.candidates, feats):
        assert f.response_rows == c.features.response_rows
        for a, b in ((f.instruction, c.features.instruction), (f.mean, c.features.mean),
                     (f.last, c.features.last)):
            assert rel(a, b) < 0.02
        check(f, hf, ids, c.token_ids[:-1], engine.layers[0])
    # Text in: a text gets the features of its own tokens.
    text = "Keep your bedroom dark and cool, and go to bed at the same time."
    (by_text,) = engine.run(engine.encode(ids, [text]))
    (by_ids,) = engine.run(engine.encode(ids, [engine.tokenizer.encode(text, add_special_tokens=False)]))
    assert by_text.response_rows == by_ids.response_rows > 0
    assert rel(by_text.mean, by_ids.mean) < 0.02 and rel(by_text.last, by_ids.last) < 0.02


def test_prefix_means_match_hf_and_the_encode_path(engine, hf):
    """The mean over a candidate's first t response rows, kept while it is generated, is the
    mean HF computes over those rows, and the one encoding the whole response keeps."""
    from ranker.capture import PREFIX_TOKENS

    ids = chat(engine, "Describe a walk through a forest in autumn.")
    gen = engine.run(engine.generate(ids, sampling(n=2, max_tokens=PREFIX_TOKENS[-1] + 6, ignore_eos=True)))
    layer = engine.layers[0]
    for c in gen.candidates:
        fed = c.token_ids[:-1]
        assert c.features.prefixes.shape == (len(PREFIX_TOKENS), len(engine.layers), engine.hidden_size)
        for j, t in enumerate(PREFIX_TOKENS):
            _, ref, _ = reference(hf[torch.float32], ids + fed[:t], len(ids), layer)
            assert rel(c.features.prefixes[j][0], ref) < TOL_F32, f"prefix {t}"
        (enc,) = engine.run(engine.encode(ids, [fed]))
        assert rel(enc.prefixes, c.features.prefixes) < 0.02
    # Shorter than a prefix length: the full mean stands there.
    short = engine.run(engine.generate(ids, sampling(n=1, max_tokens=5, ignore_eos=True))).candidates[0]
    assert all(np.array_equal(p, short.features.mean) for p in short.features.prefixes)


def test_missing_capture_is_an_error_not_zeros(engine):
    from ranker.engine import CaptureError

    with pytest.raises(CaptureError):
        engine.run(engine._fetch("srr-never-generated", 1))


def test_forwards_equal_plain_generation(engine):
    """No second pass: rows fed per candidate = its prompt rows (minus cache hits) + T - 1."""
    ids = chat(engine, "List four colours of the rainbow, one per line, and say why rainbows form.")
    gen = engine.run(engine.generate(ids, sampling(n=1, max_tokens=12, ignore_eos=True)))
    c = gen.candidates[0]
    assert len(c.token_ids) == 12
    assert gen.rows[0] == len(ids) + 11


def test_prefilled_refusal_continues_the_opening(engine, tmp_path):
    """Training's on-topic refusals: the model's own continuation of a refusal opening."""
    import json

    from ranker.training import pools

    prompt = "Name three uses of copper."
    out = engine.run(pools.prefilled(engine, [prompt], ["I cannot"], 1, 8, tmp_path / "p.json"))
    (text,) = out[prompt]
    assert text.startswith("I cannot") and len(text) > len("I cannot")
    assert json.loads((tmp_path / "p.json").read_text()) == out  # cached for the next run

    # A resumed run keeps what is cached and draws each new prompt's opening as a fresh run would.
    other, openings = "Name three uses of tin.", ["I cannot", "I'm sorry, but", "No."]
    resumed = engine.run(pools.prefilled(engine, [prompt, other], openings, 1, 8, tmp_path / "p.json"))
    alone = engine.run(pools.prefilled(engine, [other], openings, 1, 8, tmp_path / "q.json"))
    assert resumed[prompt] == out[prompt]
    assert [o for o in openings if resumed[other][0].startswith(o)] == \
        [o for o in openings if alone[other][0].startswith(o)]


def test_sampled_pool_equals_its_reload(engine, tmp_path):
    """A run that samples a pool trains on exactly what a rerun loads from the cache."""
    from ranker.training import pools

    prompt = "Name three uses of copper."
    fresh = engine.run(pools.sample(engine, [prompt], 2, 8, tmp_path / "pool.npz"))
    again = pools.load(tmp_path / "pool.npz")
    assert [c.text for c in fresh[prompt]] == [c.text for c in again[prompt]]
    for a, b in zip(fresh[prompt], again[prompt]):
        assert a.features.layers == b.features.layers == engine.layers
        assert a.features.response_rows == b.features.response_rows > 0
        for name in ("instruction", "mean", "last", "prefixes"):
            x, y = getattr(a.features, name), getattr(b.features, name)
            assert x.dtype == y.dtype == np.float16 and np.array_equal(x, y)


def test_a_too_long_encode_among_many_raises_and_leaks_nothing(engine):
    """16 concurrent encodes, one past the context: a ContextLengthError before anything is
    submitted (it once hung the offline path), and the engine serves on with no open state."""
    from ranker.engine import ContextLengthError

    ids = chat(engine, "Give one tip for sleeping better.")
    fits = engine.context_length - 1 - len(ids)
    responses = [f"Tip number {i}: keep a routine." for i in range(15)] + [[11] * (fits + 1)]
    with pytest.raises(ContextLengthError, match="context"):
        engine.run(engine.encode(ids, responses), timeout=60)
    (f,) = engine.run(engine.encode(ids, [[11] * fits]), timeout=300)  # the longest that fits
    assert f.response_rows == fits
    assert engine.run(engine.info())["open"] == 0
