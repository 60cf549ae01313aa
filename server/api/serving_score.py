"""POST /v1/srr/score: the scores the server would give supplied candidates for a prompt.

The candidates go through the engine's encode path (same capture, same pooling as
generation), so a text scores as it would if the model had sampled it.
"""

from __future__ import annotations

from ranker.engine import ContextLengthError
from server.api.protocol import APIError, ScoreRequest, ScoreResponse
from server.api.serving import Serving, context_error


class ServingScore(Serving):
    async def create(self, req: ScoreRequest) -> ScoreResponse:
        self.check_model(req.model)
        limit = self.settings.max_candidates
        if len(req.candidates) > limit:
            raise APIError(400, f"at most {limit} candidates per request (SRR_MAX_CANDIDATES)",
                           param="candidates")
        prompt_ids = self.prompt_ids(req.messages)
        try:
            features = await self.engine.encode(prompt_ids, req.candidates)
        except ContextLengthError as e:
            raise context_error(str(e), "candidates") from None
        scores, probs, risk = await self.score(features)
        return ScoreResponse(model=self.model_name, scores=scores, probabilities=probs, request_risk=risk,
                             layer=self.scorer.config.layers, scorer=self.scorer_name,
                             threshold=self.policy.threshold)
