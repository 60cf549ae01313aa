"""What the generating endpoints (chat, completions) share: sample K candidates with capture,
score them, decide with `ranker.policy`, carry out a resample, and record the request in
metrics and the audit log. Each endpoint turns the `Selection` into its own response."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm.exceptions import VLLMClientError

from ranker import policy
from ranker.capture import PREFIX_TOKENS
from ranker.engine import Candidate, CaptureError, Generation, Guard
from ranker.policy import Decision, PrefixRule, Verdict
from server.api import metrics
from server.api.audit import AuditLog
from server.api.protocol import APIError, ResponseFormat, SamplingRequest, SRRInfo
from server.api.serving import Serving, context_error

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    generation: Generation
    scores: list[float]  # empty: scoring failed
    probabilities: list[float]
    seconds: float
    risk: float | None = None  # the scorer's P(harmful request); None without a risk head


@dataclass
class Selection:
    scored: Scored  # the first K candidates, as scored
    decision: Decision  # the final one (on the resampled candidates after a resample)
    candidates: list[Candidate]  # what decision.order indexes
    completion_tokens: int  # every candidate sampled, a resample's included
    prompt_tokens: int
    max_tokens: int  # per candidate


def sampling_params(req: SamplingRequest, k: int, prompt_len: int, limit: int,
                    context_length: int, schema: dict | None = None) -> Any:
    """vLLM's SamplingParams for K candidates, or a 400 for what cannot fit or be sampled.
    `schema`: a JSON schema every candidate must follow (a required or named tool call)."""
    from vllm import SamplingParams

    max_tokens = req.completion_limit() or min(limit, context_length - prompt_len)
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
    if (top := req.top_logprobs_count()) is not None:
        opt["logprobs"] = top  # vLLM returns the sampled token's besides
    if req.logit_bias:
        opt["logit_bias"] = {int(t): b for t, b in req.logit_bias.items()}
    if (constraint := structured_outputs(req.structure(), schema)) is not None:
        opt["structured_outputs"] = constraint
    try:
        return SamplingParams(n=k, max_tokens=max_tokens, ignore_eos=req.ignore_eos, **opt)
    except Exception as e:  # noqa: BLE001 - vLLM's validation errors are client errors
        raise APIError(400, str(e)) from None


def structured_outputs(fmt: ResponseFormat | None, schema: dict | None) -> Any:
    """vLLM's structured-output constraint that every candidate obeys: a response_format's,
    else a tool call's JSON schema; None when neither is asked for."""
    from vllm.sampling_params import StructuredOutputsParams

    if fmt is not None and fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt is not None:
        return StructuredOutputsParams(json=fmt.json_schema.schema_)
    return None if schema is None else StructuredOutputsParams(json=schema)


def token_logprobs(c: Candidate, top: int) -> list[tuple[tuple[str, float], list[tuple[str, float]]]]:
    """Per sampled token: (token, logprob) and the `top` most likely alternatives, from vLLM's
    logprobs. -inf (a token a constraint or logit_bias ruled out) is not JSON: -9999, as OpenAI."""
    def entry(lp) -> tuple[str, float]:
        return lp.decoded_token or "", max(lp.logprob, -9999.0)

    return [(entry(step[tid]), [entry(lp) for _, lp in sorted(step.items(), key=lambda x: x[1].rank)[:top]])
            for tid, step in zip(c.token_ids, c.logprobs or [])]


class ServingGenerate(Serving):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        s = self.settings
        self.audit = AuditLog(s.audit_log, s.log_text) if s.audit_log else None

    async def select(self, req: SamplingRequest, prompt_ids: list[int],
                     resample_ids: Callable[[], list[int]], schema: dict | None = None,
                     on_text: Callable[[str], None] | None = None) -> Selection:
        """K candidates, scored and decided; `resample_ids`: the prompt under the safety
        system prompt, for the resample fallback; `schema`: a JSON schema every candidate
        follows (a required or named tool call); `on_text`: receives the winner's text as it
        is generated, once the guard commits to it."""
        opted_out, k = self.candidates(req)
        params = self.params(req, k, prompt_ids, schema)
        guard = self.guard(req, k) if not opted_out else None
        scored = await self.generate_scored(prompt_ids, params, guard, on_text)
        gen = scored.generation
        stopped = [c.index for c in gen.candidates if c.pruned]
        committed = next((c.index for c in gen.candidates if not c.pruned), None) \
            if gen.decided == "commit" else None
        decision = policy.decide(self.policy, scored.scores, scored.probabilities,
                                 len(gen.candidates), opted_out, stopped, committed)
        cands, completion_tokens = gen.candidates, tokens(gen)
        if decision.resample:
            ids = resample_ids()
            again = await self.generate_scored(ids, self.params(req, k, ids, schema))
            decision = policy.resampled(self.policy, again.scores, again.probabilities)
            cands = again.generation.candidates
            completion_tokens += tokens(again.generation)
        if decision.fail_closed:
            metrics.REQUESTS.labels(outcome=decision.outcome).inc()
            raise APIError(503, "scoring failed and the server is fail-closed", "server_error")
        return Selection(scored, decision, cands, completion_tokens, len(prompt_ids), params.max_tokens)

    def candidates(self, req: SamplingRequest) -> tuple[bool, int]:
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

    def guard(self, req: SamplingRequest, k: int) -> Guard | None:
        """The guard for one request's K candidates, or None when it does not prune."""
        prune = self.settings.prune if not req.srr or req.srr.prune is None else req.srr.prune
        rules = self.scorer.config.prefix_rules
        if not prune or self.policy.shadow or k == 1 or req.n > 1:  # n > 1: n must survive
            return None
        if not rules:
            raise APIError(400, f"the scorer {self.scorer_name} has no prefix calibration: it "
                           "cannot prune (srr prefixes fits one)", param="srr.prune")

        async def guard(j: int, feats, running: list[int]) -> Verdict:
            rule = rules.get(str(PREFIX_TOKENS[j]))
            if rule is None or sorted(feats) != list(range(k)):
                return Verdict()
            try:
                scores, probs, _ = await self.score([feats[i] for i in range(k)], partial=True)
            except Exception as e:  # noqa: BLE001 - a failed look stops nothing
                logger.error("scoring a prefix failed: %s", type(e).__name__)
                return Verdict()
            return policy.guard(PrefixRule(**rule), self.policy, scores, probs, running)

        return guard

    def params(self, req: SamplingRequest, k: int, prompt_ids: list[int],
               schema: dict | None = None) -> Any:
        return sampling_params(req, k, len(prompt_ids), self.settings.max_tokens,
                               self.engine.context_length, schema)

    async def generate_scored(self, prompt_ids: list[int], params: Any, guard: Guard | None = None,
                              on_text: Callable[[str], None] | None = None) -> Scored:
        """Candidates and their scores; scores empty after a capture or scorer failure (the
        policy then fails open or closed)."""
        try:
            gen = await self.engine.generate(prompt_ids, params, guard, on_text)
        except CaptureError as e:
            gen, error = e.generation, e
        except (ValueError, VLLMClientError) as e:  # vLLM's request validation (a bad schema, ...)
            raise APIError(400, str(e)) from None
        else:
            try:
                t0 = time.perf_counter()
                scores, probs, risk = await self.score([c.features for c in gen.candidates])
                return Scored(gen, scores, probs, time.perf_counter() - t0, risk)
            except Exception as e:  # noqa: BLE001 - any scorer fault takes the policy's path
                error = e
        logger.error("scoring failed: %s", type(error).__name__)
        return Scored(gen, [], [], 0.0)

    def info(self, req: SamplingRequest, sel: Selection) -> SRRInfo:
        gen, scored, decision = sel.scored.generation, sel.scored, sel.decision
        info = SRRInfo(
            candidates=len(gen.candidates), selected=decision.selected, scores=scored.scores,
            probabilities=scored.probabilities, request_risk=scored.risk, layer=self.scorer.config.layers,
            scorer=self.scorer_name, threshold=self.policy.threshold, fallback=decision.fallback,
            mode=req.srr.mode if req.srr else "select",
            candidate_tokens=[len(c.token_ids) for c in gen.candidates],
            pruned=[c.pruned for c in gen.candidates], decided=gen.decided,
            decided_at_tokens=gen.decided_at, decided_seconds=gen.decided_seconds)
        if req.srr and req.srr.return_candidates:
            info.candidate_texts = [c.text for c in gen.candidates]
            info.candidate_finish_reasons = [c.finish_reason for c in gen.candidates]
            info.candidate_token_ids = [c.token_ids for c in gen.candidates]
        return info

    def record(self, response_id: str, sel: Selection, seconds: float, prompt: str,
               responses: list[str]) -> None:
        scored, decision = sel.scored, sel.decision
        gen = scored.generation
        if scored.scores:
            metrics.SCORING_SECONDS.observe(scored.seconds)
            metrics.SELECTED_SCORE.observe(max(scored.probabilities))
        metrics.REQUESTS.labels(outcome=decision.outcome).inc()
        metrics.CANDIDATES.observe(len(gen.candidates))
        stopped = [c for c in gen.candidates if c.pruned]
        metrics.PRUNED.inc(len(stopped))
        metrics.TOKENS_SAVED.inc(sum(max(0, sel.max_tokens - len(c.token_ids)) for c in stopped))
        if gen.decided == "exit":
            metrics.EARLY_EXITS.inc()
        elif gen.decided == "commit":
            metrics.EARLY_COMMITS.inc()
        metrics.GENERATION_SECONDS.observe(gen.generation_seconds)
        metrics.CAPTURE_SECONDS.observe(gen.capture_seconds)
        metrics.REQUEST_SECONDS.observe(seconds)
        if self.audit:
            self.audit.write(
                id=response_id, outcome=decision.outcome, candidates=len(gen.candidates),
                scores=scored.scores, probabilities=scored.probabilities, request_risk=scored.risk,
                selected=decision.selected,
                fallback=decision.fallback, threshold=self.policy.threshold, model=self.model_name,
                scorer=self.scorer_name, seconds={"total": seconds, "generation": gen.generation_seconds,
                                                  "capture": gen.capture_seconds, "scoring": scored.seconds},
                prompt=self.audit.text(prompt), response=[self.audit.text(r) for r in responses])


def tokens(gen: Generation) -> int:
    return sum(len(c.token_ids) for c in gen.candidates)
