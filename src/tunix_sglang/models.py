"""Loading a Hugging Face style model directory into Tunix: config, weights, tokenizer.

The one place where a checkpoint's config.json becomes a Tunix ModelConfig, so the trainer
computes the function the checkpoint ships (rope_theta, tied embeddings, head_dim...).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

from tunix_sglang.errors import UserError

SHARD_INDEX = "model.safetensors.index.json"
# model_type -> (Tunix package, model class name)
ARCHITECTURES = {
    "qwen3": ("tunix.models.qwen3", "Qwen3"),
    "qwen2": ("tunix.models.qwen2", "Qwen2"),
    "llama": ("tunix.models.llama3", "Llama3"),
}


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """A validated model directory and its parsed config.json."""

    path: Path
    hf_config: dict[str, Any]

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]


def inspect_model_dir(path: str | Path) -> ModelDir:
    """Check that `path` is a loadable model directory; one-line UserError otherwise."""
    p = Path(path).expanduser()
    fix = "pass --local-model-dir a Hugging Face model directory (config.json, *.safetensors)"
    if not p.is_dir():
        raise UserError(f"--local-model-dir {p}: not a directory; {fix}")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"--local-model-dir {p}: config.json is missing; {fix}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e}); {fix}") from None
    mt = cfg.get("model_type")
    if mt not in ARCHITECTURES:
        raise UserError(
            f"{cfg_path}: model_type {mt!r} is not supported; use one of "
            f"{sorted(ARCHITECTURES)}"
        )
    if not list(p.glob("*.safetensors")):
        raise UserError(f"--local-model-dir {p}: no *.safetensors weights; {fix}")
    missing = missing_weight_files(p)
    if missing:
        raise UserError(f"--local-model-dir {p}: {len(missing)} weight files its "
                        f"{SHARD_INDEX} lists are missing (first: {missing[0]}); {fix}")
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        raise UserError(f"--local-model-dir {p}: no tokenizer files; {fix}")
    missing = [
        k
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if k not in cfg
    ]
    if missing:
        raise UserError(f"{cfg_path}: missing fields {missing}; {fix}")
    return ModelDir(p, cfg)


def missing_weight_files(path: Path) -> list[str]:
    """Shards a sharded checkpoint's index names that are not in `path` (an interrupted copy
    or download: Tunix's loader would leave their parameters unset and fail much later)."""
    index = path / SHARD_INDEX
    if not index.is_file():
        return []
    try:
        files = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [SHARD_INDEX + " (unreadable)"]
    return sorted(f for f in files if not (path / f).is_file())


def tunix_model_config(md: ModelDir, dtype: str = "float32"):
    """Tunix ModelConfig from config.json, every shipped field honoured."""
    import jax.numpy as jnp

    c = md.hf_config
    pkg, _ = ARCHITECTURES[md.model_type]
    model_lib = importlib.import_module(pkg + ".model")
    heads = c["num_attention_heads"]
    common = dict(
        num_layers=c["num_hidden_layers"],
        vocab_size=c["vocab_size"],
        embed_dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"],
        num_heads=heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        num_kv_heads=c.get("num_key_value_heads", heads),
        rope_theta=c.get("rope_theta", 10000.0),
        norm_eps=c.get("rms_norm_eps", 1e-6),
    )
    tied = bool(c.get("tie_word_embeddings", False))
    jdtype = getattr(jnp, dtype)
    if md.model_type == "llama":
        return model_lib.ModelConfig(**common, weight_tying=tied)
    return model_lib.ModelConfig(
        **common, use_tied_embedding=tied, dtype=jdtype, param_dtype=jdtype
    )


def load_model(md: ModelDir, mesh, dtype: str = "float32"):
    """Tunix nnx model with the directory's safetensors weights, sharded on `mesh`."""
    import jax.numpy as jnp

    from tunix_sglang import compat

    compat.apply_all()
    pkg, _ = ARCHITECTURES[md.model_type]
    params = importlib.import_module(pkg + ".params")
    cfg = tunix_model_config(md, dtype)
    return params.create_model_from_safe_tensors(
        str(md.path), cfg, mesh=mesh, dtype=getattr(jnp, dtype)
    )


def abstract_params(md: ModelDir, dtype: str = "float32"):
    """The Tunix model's parameters as shapes only (nnx.State of ShapeDtypeStruct)."""
    from flax import nnx

    from tunix_sglang import compat

    compat.apply_all()
    pkg, cls = ARCHITECTURES[md.model_type]
    model_cls = getattr(importlib.import_module(pkg + ".model"), cls)
    cfg = tunix_model_config(md, dtype)
    return nnx.state(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)


def load_tokenizer(md: ModelDir):
    """The directory's Hugging Face tokenizer (must have a chat template and an EOS)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(md.path))
    except Exception as e:  # transformers raises many types here
        raise UserError(f"{md.path}: tokenizer could not be loaded ({e})") from None
    if tok.eos_token_id is None:
        raise UserError(f"{md.path}: tokenizer has no eos_token; set it in tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
