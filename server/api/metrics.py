"""The server's own Prometheus series. vLLM registers its `vllm:*` series in the same
default registry, so `/metrics` serves both."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)

REQUESTS = Counter("srr_requests", "Chat requests by outcome", ["outcome"])
CANDIDATES = Histogram("srr_candidates", "Candidates sampled per request", buckets=(1, 2, 4, 8, 16, 32))
REQUEST_SECONDS = Histogram("srr_request_seconds", "End-to-end request time", buckets=LATENCY)
GENERATION_SECONDS = Histogram("srr_generation_seconds", "vLLM generation time per request", buckets=LATENCY)
CAPTURE_SECONDS = Histogram("srr_capture_seconds", "Fetching captured states per request", buckets=LATENCY)
SCORING_SECONDS = Histogram(
    "srr_scoring_seconds", "Scorer time per request",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
)
SELECTED_SCORE = Histogram(
    "srr_selected_score", "P(acceptable) of the best candidate",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
IN_FLIGHT = Gauge("srr_requests_in_flight", "Requests being served")
PRUNED = Counter("srr_pruned_candidates", "Candidates the guard stopped before their end")
EARLY_EXITS = Counter("srr_early_exits", "Requests the guard sent to the fallback before the candidates ended")
EARLY_COMMITS = Counter("srr_early_commits", "Requests whose winner the guard chose before the candidates ended")
TOKENS_SAVED = Counter(
    "srr_tokens_saved", "max_tokens minus the tokens generated, per stopped candidate (an upper "
    "bound: it might have ended sooner)")
