"""What every endpoint shares over one engine and scorer: the model check, the prompt's
tokens and scoring a list of candidates (one `Serving` per endpoint builds on it)."""

from __future__ import annotations

from ranker.batching import BatchScorer
from ranker.engine import Engine
from ranker.features import Features, stack
from ranker.policy import Policy
from ranker.scorer import SRRScorer
from server.api.config import Settings
from server.api.protocol import APIError, Message
from server.api.tools import template_messages


class Serving:
    def __init__(self, settings: Settings, engine: Engine, scorer: SRRScorer, batch: BatchScorer):
        self.settings = settings
        self.engine = engine
        self.scorer = scorer
        self.batch = batch
        cfg = scorer.config
        self.policy = Policy(
            threshold=settings.threshold if settings.threshold is not None else cfg.threshold,
            fallback=settings.fallback, shadow=settings.shadow, fail_open=settings.fail_open)
        self.scorer_name = f"{cfg.name}@{cfg.version}"

    @property
    def model_name(self) -> str:
        return self.engine.served_model_name

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. Available: {self.model_name}",
                           param="model", code="model_not_found")

    def prompt_ids(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        try:
            ids = self.engine.prompt_ids(template_messages(messages), tools)
        except Exception as e:  # the chat template rejects some role orders
            raise APIError(400, f"messages could not be formatted: {type(e).__name__}",
                           param="messages") from None
        return self.fitting(ids, "messages")

    def fitting(self, ids: list[int], param: str) -> list[int]:
        """The prompt's ids, or a 400 `context_length_exceeded` when they fill the context."""
        if len(ids) >= self.engine.context_length:
            raise context_error(f"The prompt is {len(ids)} tokens; this model's context length "
                                f"is {self.engine.context_length}.", param)
        return ids

    async def score(self, features: list[Features], partial: bool = False
                    ) -> tuple[list[float], list[float], float | None]:
        """(scores, probabilities, the request's risk: None without a risk head). `partial`:
        features of partial responses (the guard's)."""
        cfg = self.scorer.config
        return await self.batch.score(*stack(features, cfg.layers, cfg.pooling), partial)


def context_error(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")
