"""The SRR scorer (arXiv 2505.15710): projection, one Transformer block, cosine over tau.

Input per list: the instruction vector and K candidate vectors, pooled from the serving
model's residual stream. One shared linear projection to width d, one post-LayerNorm
Transformer encoder block with no positional encoding over [instruction, c_1..c_K] (so it is
order-free over candidates), then score_i = cos(out_instruction, out_i) / tau.

Scores rank candidates within a list. For the threshold and fallback policy they are mapped
to P(acceptable) by a Platt fit (a * score + b) on validation lists; see ranker/training/calibrate.py.

Checkpoints are folders (`save_pretrained` / `from_pretrained`): `scorer.safetensors` and
`config.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ranker.features import Pooling
from ranker.models import shape

WEIGHTS_FILE = "scorer.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ScorerConfig:
    base_model: str
    layers: list[int]
    pooling: Pooling
    hidden_size: int  # width of the serving model's residual stream
    base_model_revision: str | None = None
    d_model: int = 256
    n_heads: int = 4
    dropout: float = 0.1
    tau: float = 0.1
    calib_a: float = 1.0  # P(acceptable) = sigmoid(calib_a * score + calib_b)
    calib_b: float = 0.0
    # Per list size K, [a, b] for the candidate served from K (see `probability`); keyed
    # "K", or "harmful/K" and "benign/K" by the risk head's judgement of the request.
    served_calibration: dict[str, list[float]] = field(default_factory=dict)
    # The risk head's P(harmful request) from which a request is judged harmful; None: no head.
    risk_threshold: float | None = None
    # The risk head's P(harmful request) under which a request is judged benign with
    # confidence (few harmful validation requests fall under it; ranker/training/risk.py).
    benign_below: float | None = None
    # The refusal head's P(a candidate refuses) from which it is judged a refusal; None: no
    # head. With both heads, a refusal ranks below every answer on a request judged benign
    # with confidence (`judge`).
    refusal_threshold: float | None = None
    # The guard's rule per prefix length ("8", "16", "32"), fields of ranker.policy.PrefixRule,
    # fitted by `srr prefixes` (ranker/training/prefixes.py); empty: the scorer cannot prune.
    prefix_rules: dict[str, dict] = field(default_factory=dict)
    # A second projection and block that score a list of partial responses as the first
    # scores the whole ones (trained by `srr prefixes`): what the guard reads.
    prefix_head: bool = False
    threshold: float = 0.5  # on P(acceptable); chosen on validation
    name: str = "srr"
    version: str = "0"
    training: dict = field(default_factory=dict)  # data hashes, command, seed

    @property
    def input_dim(self) -> int:
        return self.hidden_size * len(self.layers)

    def mismatch(self, model_dir: Path) -> str | None:
        """Why this scorer cannot read the states of the model in model_dir; None if it can."""
        width, depth = shape(model_dir)
        if width != self.hidden_size:
            return (f"the scorer expects hidden size {self.hidden_size}, but the model in "
                    f"{model_dir} has {width}: use a scorer trained for this model")
        if bad := [layer for layer in self.layers if not 0 <= layer < depth]:
            return f"the scorer reads layer(s) {bad}, but the model in {model_dir} has {depth} layers"
        return None


class SRRScorer(nn.Module):
    def __init__(self, config: ScorerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        # Residual-stream features have a few huge dimensions; standardize with training stats.
        self.register_buffer("feat_mean", torch.zeros(config.input_dim))
        self.register_buffer("feat_std", torch.ones(config.input_dim))
        self.proj = nn.Linear(config.input_dim, d)
        self.block = nn.TransformerEncoderLayer(
            d, config.n_heads, 4 * d, config.dropout, batch_first=True, norm_first=False
        )
        # The request-level risk signal: logistic on the standardized instruction vector.
        self.risk = nn.Linear(config.input_dim, 1) if config.risk_threshold is not None else None
        # The candidate-level refusal signal: logistic on a standardized candidate vector.
        self.refusal = nn.Linear(config.input_dim, 1) if config.refusal_threshold is not None else None
        if config.prefix_head:
            self.prefix_proj = nn.Linear(config.input_dim, d)
            self.prefix_block = nn.TransformerEncoderLayer(
                d, config.n_heads, 4 * d, config.dropout, batch_first=True, norm_first=False
            )

    def forward(self, instruction: torch.Tensor, candidates: torch.Tensor,
                mask: torch.Tensor | None = None, partial: bool = False) -> torch.Tensor:
        """instruction [B, D], candidates [B, K, D], mask [B, K] (True = real) -> scores [B, K].
        `partial`: the candidates are partial responses (prefix means): read by the prefix
        head where the scorer has one."""
        proj, block = ((self.prefix_proj, self.prefix_block) if partial and self.config.prefix_head
                       else (self.proj, self.block))
        x = torch.cat([instruction.unsqueeze(1), candidates], dim=1)
        x = proj((x - self.feat_mean) / self.feat_std)
        pad = None
        if mask is not None:
            keep = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
            pad = ~keep
        h = block(x, src_key_padding_mask=pad)
        scores = F.cosine_similarity(h[:, :1], h[:, 1:], dim=-1) / self.config.tau
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores

    def candidate_probability(self, scores: torch.Tensor) -> torch.Tensor:
        """P(acceptable) of a candidate taken alone (Platt on held-out lists' candidates)."""
        return torch.sigmoid(self.config.calib_a * scores + self.config.calib_b)

    def risk_probability(self, instruction: torch.Tensor) -> torch.Tensor | None:
        """P(the request asks for harm), [..., D] -> [...]; None without a risk head."""
        if self.risk is None:
            return None
        return torch.sigmoid(self.risk((instruction - self.feat_mean) / self.feat_std).squeeze(-1))

    def refusal_probability(self, candidates: torch.Tensor) -> torch.Tensor | None:
        """P(the candidate refuses), [..., D] -> [...]; None without a refusal head."""
        if self.refusal is None:
            return None
        return torch.sigmoid(self.refusal((candidates - self.feat_mean) / self.feat_std).squeeze(-1))

    def judged_harmful(self, risk: torch.Tensor) -> torch.Tensor:
        """Whether requests of this `risk_probability` are judged harmful (the risk threshold)."""
        return risk >= self.config.risk_threshold

    def probability(self, scores: torch.Tensor, risk: torch.Tensor | None = None) -> torch.Tensor:
        """What the threshold is compared with, per candidate: [..., K] -> [..., K]; masked
        candidates are -inf. `risk`: the request's `risk_probability` ([...]).

        With a served calibration, the mapping is the one fitted for a list of this size
        (the row's finite scores) and, with a risk head, for requests judged as this one
        is; so the top candidate's value is P(the served candidate is acceptable). Sizes
        between fitted ones interpolate a and b in log2 K, sizes outside take the nearest.
        Without one (scorers before 0.8.0), `candidate_probability`."""
        table = self.config.served_calibration
        if not table:
            return self.candidate_probability(scores)
        if "harmful/1" not in table:
            return self._served(scores, table)
        if risk is None:
            raise ValueError("this scorer's calibration depends on the request's risk: pass risk")
        bucket = lambda name: {k.split("/")[1]: v for k, v in table.items() if k.startswith(name + "/")}  # noqa: E731
        risky = self.judged_harmful(risk).unsqueeze(-1)
        return torch.where(risky, self._served(scores, bucket("harmful")), self._served(scores, bucket("benign")))

    @staticmethod
    def _served(scores: torch.Tensor, table: dict[str, list[float]]) -> torch.Tensor:
        ks, ab = zip(*sorted((int(k), v) for k, v in table.items()))
        ab = np.array(ab)
        size = np.log2(np.maximum(torch.isfinite(scores).sum(-1, keepdim=True).numpy(), 1))
        a, b = (torch.from_numpy(np.interp(size, np.log2(ks), ab[:, i])).float() for i in (0, 1))
        return torch.sigmoid(a * scores + b)

    @torch.no_grad()
    def judge(self, instruction: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor | None = None,
              partial: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the server ranks and decides on: (scores [B, K], probabilities [B, K], risk [B]
        or None). The scorer's scores, except that with risk and refusal heads, on a request
        judged benign with confidence (P(harmful) under `benign_below`) every candidate judged
        a refusal drops by the whole cosine range (2 / tau), below every answer: a needless
        refusal loses to a helpful answer, and the calibration judges it unacceptable. Other
        requests keep the scorer's ranking, which puts safe candidates first."""
        scores = self(instruction, candidates, mask, partial)
        risk = self.risk_probability(instruction)
        refusing = self.refusal_probability(candidates)
        if risk is not None and refusing is not None:
            sure_benign = (risk < self.config.benign_below).unsqueeze(-1)
            demote = (refusing >= self.config.refusal_threshold) & sure_benign
            scores = scores - demote.float() * (2.0 / self.config.tau)
        return scores, self.probability(scores, risk), risk

    def score(self, instruction, candidates) -> tuple[list[float], list[float]]:
        """One list, numpy or tensors: instruction [D], candidates [K, D] -> (scores, P)."""
        self.eval()
        i = torch.as_tensor(instruction, dtype=torch.float32).unsqueeze(0)
        c = torch.as_tensor(candidates, dtype=torch.float32).unsqueeze(0)
        s, p, _ = self.judge(i, c)
        return s[0].tolist(), p[0].tolist()

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "SRRScorer":
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"scorer checkpoint {folder} has no {name}")
        config = ScorerConfig(**json.loads((folder / CONFIG_FILE).read_text()))
        model = cls(config)
        state = load_file(folder / WEIGHTS_FILE)
        expected = model.state_dict()
        bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
        if bad:
            raise ValueError(f"scorer checkpoint {folder} does not match its config: {bad[:3]}")
        model.load_state_dict(state)
        return model.eval()
