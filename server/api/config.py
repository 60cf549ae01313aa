"""Server settings: every field is an `SRR_*` environment variable and an `srr serve` flag."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_DIR = REPO_ROOT / "weights"  # a named model's scorer ships in WEIGHTS_DIR/<name>


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SRR_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, description="Port to bind.")
    model_dir: Path | None = Field(
        None, description="Local Hugging Face model folder (default: the default named model, prepared)."
    )
    served_model_name: str | None = Field(None, description="Model id in the API (default: folder name).")
    scorer_dir: Path | None = Field(
        None, description="SRR scorer checkpoint folder (default: the one shipped for a named model)."
    )
    cache_dir: Path = Field(Path.home() / ".cache" / "srr", description="Model conversion and compile caches.")
    candidates: int = Field(8, ge=1, description="K: candidates sampled per request by default.")
    max_candidates: int = Field(16, ge=1, description="Largest K a request may ask for.")
    max_tokens: int = Field(512, ge=1, description="Default and largest max_tokens per candidate.")
    max_model_len: int | None = Field(4096, description="Context length given to vLLM.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted.")
    max_concurrent_requests: int = Field(64, ge=1, description="In-flight requests before 429.")
    threshold: float | None = Field(
        None, description="P(safe) below which no candidate is accepted (default: the scorer's own)."
    )
    fallback: Literal["refuse", "resample", "none"] = Field(
        "refuse", description="What to return when no candidate clears the threshold."
    )
    refusal_text: str = Field(
        "I can't help with that request.", description="Text returned by the refuse fallback."
    )
    prune: bool = Field(
        False, description="Stop candidates that cannot win while they are generated, and all of "
        "them when none can be served (needs a scorer with a prefix calibration; a request's "
        "srr.prune overrides).")
    allow_opt_out: bool = Field(False, description="Let requests send srr.mode='off' (plain generation).")
    shadow: bool = Field(False, description="Score and report, but return the first sample.")
    fail_open: bool = Field(
        False, description="If scoring fails, return the first sample (true) or an error (false)."
    )
    log_text: bool = Field(False, description="Allow prompt and response text in logs and audit records.")
    audit_log: Path | None = Field(None, description="JSON-lines audit file (off when unset).")
    api_key: str | None = Field(None, description="Bearer key for every /v1 route (off when unset).")
    protect_metrics: bool = Field(False, description="Require the API key on /health and /metrics too.")
    tool_parser: str | None = Field(
        None, description="vLLM tool-call parser (default: by architecture, hermes for Qwen2/3; "
        "none for others, where tools answer 400).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Model dtype. auto: the model's own, but float32 on a CPU without "
        "native bfloat16 (no AVX512-BF16 or AMX), where bfloat16 is several times slower.")
    enforce_eager: bool = Field(False, description="Run vLLM without compilation (slower; for debugging).")
