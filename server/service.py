"""The request path: validate -> sample K with capture -> score -> select -> fallback policy."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from ranker.scorer import SRRScorer
from server import metrics
from server.audit import AuditLog
from server.batching import BatchScorer
from server.config import Settings
from server.engine import CaptureError, Engine, Generation
from server.schemas import (
    ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, Choice, Message,
    ScoreRequest, ScoreResponse, SRRInfo, Usage,
)
from server.selection import rank

logger = logging.getLogger(__name__)

SAFETY_SYSTEM_PROMPT = (
    "You are a helpful and harmless assistant. Answer helpful requests fully. If a request "
    "asks for help causing harm, decline briefly and do not provide the harmful content."
)


class APIError(Exception):
    """A client-visible error: rendered as an OpenAI error body with this status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


@dataclass
class Scored:
    generation: Generation
    scores: list[float]
    probabilities: list[float]
    seconds: float


class Service:
    def __init__(self, settings: Settings, engine: Engine, scorer: SRRScorer):
        self.settings = settings
        self.engine = engine
        self.scorer = scorer
        self.batch = BatchScorer(scorer)
        cfg = scorer.config
        self.threshold = settings.threshold if settings.threshold is not None else cfg.threshold
        self.scorer_name = f"{cfg.name}@{cfg.version}"
        self.audit = AuditLog(settings.audit_log, settings.log_text) if settings.audit_log else None

    @property
    def model_name(self) -> str:
        return self.engine.served_model_name

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. Available: {self.model_name}",
                           param="model", code="model_not_found")

    def _prompt_ids(self, messages: list[Message]) -> list[int]:
        chat = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in messages]
        try:
            ids = self.engine.prompt_ids(chat)
        except Exception as e:  # the chat template rejects some role orders
            raise APIError(400, f"messages could not be formatted: {type(e).__name__}",
                           param="messages") from None
        if len(ids) >= self.engine.context_length:
            raise APIError(400, f"The prompt is {len(ids)} tokens; this model's context length "
                           f"is {self.engine.context_length}.", param="messages",
                           code="context_length_exceeded")
        return ids

    def _sampling(self, req: ChatCompletionRequest, k: int, prompt_len: int):
        from vllm import SamplingParams

        limit = self.settings.max_tokens
        max_tokens = req.max_completion_tokens or req.max_tokens or min(
            limit, self.engine.context_length - prompt_len)
        if max_tokens > limit:
            raise APIError(400, f"max_tokens must be at most {limit}", param="max_tokens")
        if prompt_len + max_tokens > self.engine.context_length:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
                           f"the context length {self.engine.context_length}",
                           param="max_tokens", code="context_length_exceeded")
        if req.min_tokens is not None and req.min_tokens > max_tokens:
            raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
        opt = {k_: v for k_, v in dict(
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, stop=req.stop, seed=req.seed,
            min_tokens=req.min_tokens).items() if v is not None}
        opt.setdefault("temperature", 1.0)
        try:
            return SamplingParams(n=k, max_tokens=max_tokens, ignore_eos=req.ignore_eos, **opt)
        except Exception as e:  # noqa: BLE001 - vLLM's validation errors are client errors
            raise APIError(400, str(e)) from None

    async def _score(self, features: list) -> tuple[list[float], list[float]]:
        cfg = self.scorer.config
        pairs = [f.select(cfg.layers, cfg.pooling) for f in features]
        return await self.batch.score(pairs[0][0], np.stack([p[1] for p in pairs]))

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        self._check_model(req.model)
        s = self.settings
        opts = req.srr
        mode = opts.mode if opts else "select"
        if mode == "off" and not s.allow_opt_out:
            raise APIError(400, "srr.mode='off' is not allowed on this server", param="srr.mode")
        k = (opts.candidates if opts and opts.candidates else None) or max(s.candidates, req.n)
        if k > s.max_candidates:
            raise APIError(400, f"srr.candidates must be at most {s.max_candidates}", param="srr.candidates")
        if req.n > k:
            raise APIError(400, f"n ({req.n}) must not exceed the candidates sampled ({k})", param="n")
        prompt_ids = self._prompt_ids(req.messages)
        if mode == "off" or req.temperature == 0:
            k = req.n  # greedy decoding would return K identical candidates
        params = self._sampling(req, k, len(prompt_ids))
        t_start = time.perf_counter()

        scored = await self._generate_scored_or_fail(prompt_ids, params)
        gen = scored.generation
        completion_tokens = sum(len(c.token_ids) for c in gen.candidates)
        fallback = None
        texts = [(c.text, c.finish_reason) for c in gen.candidates]
        if not scored.scores:  # fail-open after a scoring failure
            outcome, order, fallback = "error", list(range(len(texts))), "scoring_failed"
        elif mode == "off":
            outcome, order = "bypassed", list(range(len(texts)))
        else:
            decision = rank(scored.scores, scored.probabilities, self.threshold)
            order = decision.order
            if s.shadow:
                outcome, order = "shadow", list(range(len(texts)))
            elif decision.accepted:
                outcome = "selected"
            else:
                outcome = "fallback"
                fallback, texts, order, extra_tokens = await self._fallback(prompt_ids, req, k, scored)
                completion_tokens += extra_tokens
        choices = [Choice(index=j, message=ChatMessageOut(content=texts[i][0]),
                          finish_reason=texts[i][1]) for j, i in enumerate(order[: req.n])]
        # After a refusal or a resample the returned text is none of these K candidates.
        selected = order[0] if fallback in (None, "scoring_failed", "none") else None
        info = SRRInfo(
            candidates=len(gen.candidates), selected=selected, scores=scored.scores,
            probabilities=scored.probabilities, layer=self.scorer.config.layers,
            scorer=self.scorer_name, threshold=self.threshold, fallback=fallback, mode=mode,
        )
        if opts and opts.return_candidates:
            info.candidate_texts = [c.text for c in gen.candidates]
            info.candidate_finish_reasons = [c.finish_reason for c in gen.candidates]
            info.candidate_token_ids = [c.token_ids for c in gen.candidates]
        if scored.scores:
            metrics.SCORING_SECONDS.observe(scored.seconds)
            metrics.SELECTED_SCORE.observe(max(scored.probabilities))
        metrics.REQUESTS.labels(outcome=outcome).inc()
        metrics.CANDIDATES.observe(len(gen.candidates))
        metrics.GENERATION_SECONDS.observe(gen.generation_seconds)
        metrics.CAPTURE_SECONDS.observe(gen.capture_seconds)
        seconds = time.perf_counter() - t_start
        metrics.REQUEST_SECONDS.observe(seconds)
        response = ChatCompletionResponse(
            model=self.model_name, choices=choices, srr=info,
            usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                        total_tokens=len(prompt_ids) + completion_tokens),
        )
        if self.audit:
            self.audit.write(
                id=response.id, outcome=outcome, candidates=len(gen.candidates),
                scores=scored.scores, probabilities=scored.probabilities, selected=selected,
                fallback=fallback, threshold=self.threshold, model=self.model_name,
                scorer=self.scorer_name, seconds={"total": seconds, "generation": gen.generation_seconds,
                                                  "capture": gen.capture_seconds, "scoring": scored.seconds},
                prompt=self.audit.text(json.dumps([m.model_dump() for m in req.messages])),
                response=[self.audit.text(c.message.content) for c in choices])
        return response

    async def _generate_scored_or_fail(self, prompt_ids, params) -> Scored:
        """Scored candidates; on a capture or scorer failure, fail open (scores empty) or 503."""
        try:
            gen = await self.engine.generate(prompt_ids, params)
        except CaptureError as e:
            gen, error = e.generation, e
        else:
            try:
                t0 = time.perf_counter()
                scores, probs = await self._score([c.features for c in gen.candidates])
                return Scored(gen, scores, probs, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - any scorer fault takes the configured path
                error = e
        logger.error("scoring failed: %s", type(error).__name__)
        if not self.settings.fail_open:
            metrics.REQUESTS.labels(outcome="error").inc()
            raise APIError(503, "scoring failed and the server is fail-closed", "server_error")
        return Scored(gen, [], [], 0.0)

    async def _fallback(self, prompt_ids, req, k, scored):
        """No candidate cleared the threshold: refuse, resample with a safety prompt, or pass."""
        policy = self.settings.fallback
        texts = [(c.text, c.finish_reason) for c in scored.generation.candidates]
        refusal = [(self.settings.refusal_text, "stop")] * req.n
        if policy == "none":
            return "none", texts, rank(scored.scores, scored.probabilities, 0).order, 0
        if policy == "resample":
            messages = [Message(role="system", content=SAFETY_SYSTEM_PROMPT)] + [
                m for m in req.messages if m.role not in ("system", "developer")]
            ids = self._prompt_ids(messages)
            again = await self._generate_scored_or_fail(ids, self._sampling(req, k, len(ids)))
            extra = sum(len(c.token_ids) for c in again.generation.candidates)
            d = rank(again.scores, again.probabilities, self.threshold)
            if d.accepted:
                new = [(c.text, c.finish_reason) for c in again.generation.candidates]
                return "resample", new, d.order, extra
            return "resample_refuse", refusal, list(range(req.n)), extra
        return "refuse", refusal, list(range(req.n)), 0

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        self._check_model(req.model)
        prompt_ids = self._prompt_ids(req.messages)
        scores, probs = await self._score(await self.engine.encode(prompt_ids, req.candidates))
        return ScoreResponse(model=self.model_name, scores=scores, probabilities=probs,
                             layer=self.scorer.config.layers, scorer=self.scorer_name,
                             threshold=self.threshold)
