"""POST /v1/chat/completions: validate -> sample K with capture -> score -> decide -> respond.

The decision is `ranker.policy`'s; this module only carries it out (a resample included) and
records it in metrics and the audit log.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

from ranker import policy
from ranker.engine import CaptureError, Generation
from ranker.policy import SAFETY_SYSTEM_PROMPT, Decision
from server.api import metrics
from server.api.audit import AuditLog
from server.api.protocol import (
    APIError, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, Choice, Message,
    SRRInfo, Usage, chunk,
)
from server.api.serving import Serving, context_error

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    generation: Generation
    scores: list[float]  # empty: scoring failed
    probabilities: list[float]
    seconds: float


def sampling_params(req: ChatCompletionRequest, k: int, prompt_len: int, limit: int,
                    context_length: int) -> Any:
    """vLLM's SamplingParams for K candidates, or a 400 for what cannot fit or be sampled."""
    from vllm import SamplingParams

    max_tokens = req.max_completion_tokens or req.max_tokens or min(limit, context_length - prompt_len)
    if max_tokens > limit:
        raise APIError(400, f"max_tokens must be at most {limit}", param="max_tokens")
    if prompt_len + max_tokens > context_length:
        raise context_error(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
                            f"the context length {context_length}", "max_tokens")
    if req.min_tokens is not None and req.min_tokens > max_tokens:
        raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
    opt = {name: v for name, v in dict(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, stop=req.stop, seed=req.seed,
        min_tokens=req.min_tokens).items() if v is not None}
    opt.setdefault("temperature", 1.0)
    try:
        return SamplingParams(n=k, max_tokens=max_tokens, ignore_eos=req.ignore_eos, **opt)
    except Exception as e:  # noqa: BLE001 - vLLM's validation errors are client errors
        raise APIError(400, str(e)) from None


class ServingChat(Serving):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        s = self.settings
        self.audit = AuditLog(s.audit_log, s.log_text) if s.audit_log else None

    async def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        self.check_model(req.model)
        opted_out, k = self._candidates(req)
        prompt_ids = self.prompt_ids(req.messages)
        params = self._params(req, k, prompt_ids)
        t_start = time.perf_counter()
        scored = await self._generate_scored(prompt_ids, params)
        gen = scored.generation
        decision = policy.decide(self.policy, scored.scores, scored.probabilities,
                                 len(gen.candidates), opted_out)
        texts = [(c.text, c.finish_reason) for c in gen.candidates]
        completion_tokens = tokens(gen)
        if decision.resample:
            decision, texts, extra = await self._resample(req, k)
            completion_tokens += extra
        if decision.fail_closed:
            metrics.REQUESTS.labels(outcome=decision.outcome).inc()
            raise APIError(503, "scoring failed and the server is fail-closed", "server_error")
        choices = self._choices(req, decision, texts)
        response = ChatCompletionResponse(
            model=self.model_name, choices=choices, srr=self._info(req, scored, decision),
            usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                        total_tokens=len(prompt_ids) + completion_tokens))
        self._record(req, response, scored, decision, time.perf_counter() - t_start)
        return response

    def _candidates(self, req: ChatCompletionRequest) -> tuple[bool, int]:
        """(opted out of selection, K)."""
        s, opts = self.settings, req.srr
        opted_out = bool(opts and opts.mode == "off")
        if opted_out and not s.allow_opt_out:
            raise APIError(400, "srr.mode='off' is not allowed on this server", param="srr.mode")
        k = (opts.candidates if opts and opts.candidates else None) or max(s.candidates, req.n)
        if k > s.max_candidates:
            raise APIError(400, f"srr.candidates must be at most {s.max_candidates}",
                           param="srr.candidates")
        if req.n > k:
            raise APIError(400, f"n ({req.n}) must not exceed the candidates sampled ({k})", param="n")
        if opted_out or req.temperature == 0:
            k = req.n  # greedy decoding would return K identical candidates
        return opted_out, k

    def _params(self, req: ChatCompletionRequest, k: int, prompt_ids: list[int]) -> Any:
        return sampling_params(req, k, len(prompt_ids), self.settings.max_tokens,
                               self.engine.context_length)

    async def _generate_scored(self, prompt_ids: list[int], params: Any) -> Scored:
        """Candidates and their scores; scores empty after a capture or scorer failure (the
        policy then fails open or closed)."""
        try:
            gen = await self.engine.generate(prompt_ids, params)
        except CaptureError as e:
            gen, error = e.generation, e
        else:
            try:
                t0 = time.perf_counter()
                scores, probs = await self.score([c.features for c in gen.candidates])
                return Scored(gen, scores, probs, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - any scorer fault takes the policy's path
                error = e
        logger.error("scoring failed: %s", type(error).__name__)
        return Scored(gen, [], [], 0.0)

    async def _resample(self, req: ChatCompletionRequest, k: int
                        ) -> tuple[Decision, list[tuple[str, str | None]], int]:
        """K more candidates under the safety system prompt; the decision on them, their texts
        and the tokens they cost."""
        messages = [Message(role="system", content=SAFETY_SYSTEM_PROMPT)] + [
            m for m in req.messages if m.role not in ("system", "developer")]
        ids = self.prompt_ids(messages)
        again = await self._generate_scored(ids, self._params(req, k, ids))
        texts = [(c.text, c.finish_reason) for c in again.generation.candidates]
        return policy.resampled(self.policy, again.scores, again.probabilities), texts, tokens(again.generation)

    def _choices(self, req: ChatCompletionRequest, decision: Decision,
                 texts: list[tuple[str, str | None]]) -> list[Choice]:
        if not decision.order:  # the refusal
            texts, order = [(self.settings.refusal_text, "stop")] * req.n, range(req.n)
        else:
            order = decision.order[: req.n]
        return [Choice(index=j, message=ChatMessageOut(content=texts[i][0]), finish_reason=texts[i][1])
                for j, i in enumerate(order)]

    def _info(self, req: ChatCompletionRequest, scored: Scored, decision: Decision) -> SRRInfo:
        gen = scored.generation
        info = SRRInfo(
            candidates=len(gen.candidates), selected=decision.selected, scores=scored.scores,
            probabilities=scored.probabilities, layer=self.scorer.config.layers,
            scorer=self.scorer_name, threshold=self.policy.threshold, fallback=decision.fallback,
            mode=req.srr.mode if req.srr else "select")
        if req.srr and req.srr.return_candidates:
            info.candidate_texts = [c.text for c in gen.candidates]
            info.candidate_finish_reasons = [c.finish_reason for c in gen.candidates]
            info.candidate_token_ids = [c.token_ids for c in gen.candidates]
        return info

    def _record(self, req: ChatCompletionRequest, response: ChatCompletionResponse, scored: Scored,
                decision: Decision, seconds: float) -> None:
        gen = scored.generation
        if scored.scores:
            metrics.SCORING_SECONDS.observe(scored.seconds)
            metrics.SELECTED_SCORE.observe(max(scored.probabilities))
        metrics.REQUESTS.labels(outcome=decision.outcome).inc()
        metrics.CANDIDATES.observe(len(gen.candidates))
        metrics.GENERATION_SECONDS.observe(gen.generation_seconds)
        metrics.CAPTURE_SECONDS.observe(gen.capture_seconds)
        metrics.REQUEST_SECONDS.observe(seconds)
        if self.audit:
            self.audit.write(
                id=response.id, outcome=decision.outcome, candidates=len(gen.candidates),
                scores=scored.scores, probabilities=scored.probabilities, selected=decision.selected,
                fallback=decision.fallback, threshold=self.policy.threshold, model=self.model_name,
                scorer=self.scorer_name, seconds={"total": seconds, "generation": gen.generation_seconds,
                                                  "capture": gen.capture_seconds, "scoring": scored.seconds},
                prompt=self.audit.text(json.dumps([m.model_dump() for m in req.messages])),
                response=[self.audit.text(c.message.content) for c in response.choices])


def tokens(gen: Generation) -> int:
    return sum(len(c.token_ids) for c in gen.candidates)


def stream(result: ChatCompletionResponse, include_usage: bool) -> Iterator[str]:
    """Selection needs every candidate finished, so the winner is streamed after selection.

    Each returned choice streams as a role chunk, a content chunk and a finish chunk; the
    `srr` object rides on the last chunk (the usage chunk when asked for).
    """
    cid, created, model = result.id, result.created, result.model
    last = len(result.choices) - 1
    for c in result.choices:
        yield sse(chunk(cid, created, model, {"role": "assistant", "content": ""}, index=c.index))
        yield sse(chunk(cid, created, model, {"content": c.message.content}, index=c.index))
        extra = {}
        if c.index == last and not include_usage and result.srr is not None:
            extra["srr"] = result.srr.model_dump()
        yield sse(chunk(cid, created, model, {}, c.finish_reason, index=c.index, **extra))
    if include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "usage": result.usage.model_dump()}
        if result.srr is not None:
            body["srr"] = result.srr.model_dump()
        yield sse(body)
    yield "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
