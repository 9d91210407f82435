"""The embedded default model: a tiny Qwen3-architecture checkpoint built locally.

It is an ordinary Hugging Face style model directory (config.json, model.safetensors,
tokenizer files with a Qwen-style chat template), so it goes through exactly the loading
code a real checkpoint does. Nothing is downloaded: the tokenizer is trained here on a
fixed corpus and the weights are seeded random numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

# ChatML, as Qwen ships it (without the tool-calling branches).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Whole tokens for the answer format, so a tiny model can learn it in few steps.
FORMAT_TOKENS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]
# Bump when build_tokenizer changes, so cached models are rebuilt.
TOKENIZER_VERSION = 2

_CORPUS_WORDS = (
    "system user assistant You are given a problem Think about the problem and provide "
    "your reasoning Place it between and Then provide the final answer a number "
    "has apples oranges books pencils marbles cookies coins stickers cards toys eggs "
    "buys gives away sells finds loses gets more each box boxes bag bags day days week "
    "How many does have now left in total altogether per cost costs dollars spent earns "
    "Tom Anna Ben Lisa Sam Mia Max Zoe Leo Eva he she they it the of to and is are was "
    "were with for from on at by then so first next after total equals plus minus times "
    "divided half twice three four five six seven eight nine ten hundred thousand "
    "What If Each There + - * / = . , ? ! : ; ( ) $ % 0 1 2 3 4 5 6 7 8 9 10 12 15 20 "
    "25 30 40 50 60 70 80 90 100 #### "
)


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the embedded model; every other config field is Qwen3-0.6B's."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 2048
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + CHAT_TEMPLATE
        blob += f"tokenizer v{TOKENIZER_VERSION}\n"
        blob += "\n".join(tokenizer_corpus())
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "tunix-sglang" / "models"


def tokenizer_corpus() -> list[str]:
    """Text the tokenizer learns its merges from: the task's own prompts and answers."""
    from tunix_sglang import data

    texts = [data.SYSTEM_PROMPT, _CORPUS_WORDS]
    for p in data.synthetic_problems(400, seed=12345):
        texts += [p.question, data.sft_completion(p)]
    return texts


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # One token per digit, as Qwen's own tokenizer does: a number then looks the same in the
    # question, the reasoning and the answer tag, which a tiny model can learn to copy.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(FORMAT_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_tokens(FORMAT_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _hf_config(spec: TinyModelSpec, tokenizer) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.num_hidden_layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def random_qwen3_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Seeded random weights under Hugging Face Qwen3 names and layouts ([out, in])."""
    rng = np.random.default_rng(seed)
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def lin(out_dim: int, in_dim: int) -> np.ndarray:
        return rng.normal(0.0, 0.02 * 4, size=(out_dim, in_dim)).astype(np.float32)

    w = {
        "model.embed_tokens.weight": rng.normal(0, 0.5, (cfg["vocab_size"], d)).astype(
            np.float32
        ),
        "model.norm.weight": np.ones(d, np.float32),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = lin(h * hd, d)
        w[p + "self_attn.k_proj.weight"] = lin(kv * hd, d)
        w[p + "self_attn.v_proj.weight"] = lin(kv * hd, d)
        w[p + "self_attn.o_proj.weight"] = lin(d, h * hd)
        w[p + "self_attn.q_norm.weight"] = np.ones(hd, np.float32)
        w[p + "self_attn.k_norm.weight"] = np.ones(hd, np.float32)
        w[p + "mlp.gate_proj.weight"] = lin(f, d)
        w[p + "mlp.up_proj.weight"] = lin(f, d)
        w[p + "mlp.down_proj.weight"] = lin(d, f)
        w[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(cfg["vocab_size"], d)
    return w


def write_model_dir(path: Path, spec: TinyModelSpec) -> Path:
    """Write config.json, model.safetensors and the tokenizer into `path`."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids > vocab_size {spec.vocab_size}")
    cfg = _hf_config(spec, tokenizer)
    tokenizer.save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]})
    )
    save_file(random_qwen3_weights(cfg, spec.seed), str(path / "model.safetensors"))
    return path


def ensure_tiny_model(spec: TinyModelSpec | None = None, cache_dir: Path | None = None) -> Path:
    """Return the cached tiny model directory, building it once (atomically) if missing."""
    spec = spec or TinyModelSpec()
    root = cache_dir or default_cache_dir()
    final = root / f"tiny-qwen3-{spec.fingerprint()}"
    if (final / "model.safetensors").exists():
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    write_model_dir(tmp, spec)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return final
