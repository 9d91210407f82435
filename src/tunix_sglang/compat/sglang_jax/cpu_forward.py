"""sglang-jax 0.0.2's forward pass on CPU: attention per sequence, the output head's layout.

Three fixes of the registry (`tunix_sglang.compat.FIXES`): `native_decode_attention`,
`native_prefill_attention`, `cpu_lm_head_layout`. Each checks the installed code, keeps the
original in `ORIGINALS` and has a test of equal outputs and of the cost it removes
(tests/compat/test_sglang_jax_cpu_forward.py).

Attention. The native backend (`NativeAttention` -> `forward_attention`) attends the whole
padded batch at once: every query of the batch against every key slot of the batch (rows x
max_req_len), masking out the pairs of different sequences. Cost and memory grow with
batch x total length: decode with the square of the batch, and prefill (EXTEND) with prompt
tokens x (rows x max_req_len), which asked for 25.5 GB at batch 128 x 552-token contexts.
Both fixes compute the same attention over each sequence's own keys, so that work and
memory grow with the sum of the sequence lengths.

Output head. `LogitsProcessor._get_logits` computes `hidden @ embedding.T` with the head's
weight stored [vocab, hidden] (the input embedding's layout, shared when tied). XLA's CPU
dot contracts it on its minor dimension, which it does not do in place: every call re-packs
the whole head (Qwen3-0.6B-shaped head, 151,936 x 1,024, 16 rows: 0.86-1.2 s per call
against 0.19-0.27 s from a [hidden, vocab] copy, the same logits bit for bit). On CPU the
engine keeps that copy (`LogitsWeight`, a derived model variable, not a parameter: weight
sync never writes it) and refreshes it whenever a forward sees a new head weight array (a
sync, a load). Cost: one more copy of the head in host memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tunix_sglang.compat.base import ORIGINALS, source_of
from tunix_sglang.engine.weight_map import path_names

# Static per-sequence widths tried, from max_req_len down by halves (one branch each).
ATTENTION_WIDTHS = 4
MIN_ATTENTION_WIDTH = 16
# Prefill: the largest score block one step of the per-sequence loop may hold (bytes).
PREFILL_BLOCK_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------
# Shared: static widths, and one gather of a sequence's keys and values
# ---------------------------------------------------------------------------------------

def attention_widths(width: int) -> list[int]:
    """Static per-sequence key widths (ascending): max_req_len, then halves (>= 16), at most
    ATTENTION_WIDTHS of them. Each is one compiled branch; a batch runs the smallest that
    holds its longest sequence, so early steps of long rollouts do not pay for the longest
    context the engine allows."""
    out = [width]
    while len(out) < ATTENTION_WIDTHS and -(-out[-1] // 2) >= MIN_ATTENTION_WIDTH:
        out.append(-(-out[-1] // 2))
    return sorted(out)


def branch_for(widths: list[int], seq_lengths: Any) -> Any:
    """Index of the smallest width that holds every sequence (traced)."""
    import jax.numpy as jnp

    longest = jnp.max(seq_lengths)
    return jnp.minimum(jnp.searchsorted(jnp.asarray(widths), longest), len(widths) - 1)


def gather_kv(kv_fused: Any, loc: Any, starts: Any, lengths: Any, width: int):
    """Keys, values [n, width, kv_heads, head_dim] of n sequences, and which are real [n, width].

    `kv_fused` is the layer's KV buffer as sglang-jax keeps it: [slots, 2 x kv_heads,
    head_dim], K heads at even and V heads at odd positions; sequence i's slots are
    loc[starts[i]:][:lengths[i]] (slot 0 = padding). K and V are sliced out of the buffer here,
    inside the width branch that runs: sliced before the branches (as the backend hands them
    to `forward_attention`) XLA materialised them by a slower path (measured 2-4x the decode
    attention time at batch 128).
    """
    import jax.numpy as jnp

    offs = jnp.arange(width)[None, :]
    slot = loc[jnp.clip(starts[:, None] + offs, 0, loc.shape[0] - 1)]
    ok = (offs < lengths[:, None]) & (slot > 0)
    safe = jnp.where(ok, slot, kv_fused.shape[0])  # out of range: filled with zeros
    k = jnp.take(kv_fused[:, 0::2], safe, axis=0, mode="fill", fill_value=0)
    v = jnp.take(kv_fused[:, 1::2], safe, axis=0, mode="fill", fill_value=0)
    return k, v, ok


# ---------------------------------------------------------------------------------------
# Decode: each sequence's one query against its own keys
# ---------------------------------------------------------------------------------------

def decode_attends_whole_batch(fn: Callable) -> bool:
    """True when the native backend's decode attention scores each sequence's query against
    all keys of the padded batch and masks the others out (`_apply_decode_mask`)."""
    return "_apply_decode_mask" in source_of(fn)


def decode_attention_per_sequence(q: Any, kv_fused: Any, seq_lengths: Any, loc: Any,
                                  num_heads: int, num_kv_heads: int,
                                  scale: Any = None) -> Any:
    """Decode attention over each sequence's own keys only.

    Same result as the native backend's decode path: `loc` lists the KV slots of the
    sequences one after another (`seq_lengths` each, slot 0 = padding), in a buffer of
    rows x max_req_len slots, so no sequence has more than len(loc) // rows keys. The keys
    are gathered per sequence ([rows, width, kv_heads, head_dim], `width` the smallest of
    `attention_widths` that holds the longest sequence) and the query heads are grouped
    onto their KV head instead of repeating the KV heads. Work and memory: O(rows x width)
    instead of O(rows^2 x max_req_len).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    rows = q.shape[0]
    head_dim = q.shape[-1] // num_heads if q.ndim == 2 else q.shape[-1]
    group = num_heads // num_kv_heads
    qh = q.reshape(rows, num_kv_heads, group, head_dim)
    starts = jnp.cumsum(seq_lengths) - seq_lengths
    if scale is None:
        scale = 1.0 / jnp.sqrt(head_dim)

    def attend(width):
        k, v, valid = gather_kv(kv_fused, loc, starts, seq_lengths, width)
        logits = jnp.einsum("bgqd,blgd->bgql", qh, k) * scale
        logits = jnp.where(valid[:, None, None, :], logits,
                           jnp.asarray(jnp.finfo(logits.dtype).min, logits.dtype))
        out = jnp.einsum("bgql,blgd->bgqd", jax.nn.softmax(logits, axis=-1), v)
        return out.reshape(rows, num_heads * head_dim)

    widths = attention_widths(loc.shape[0] // rows)
    return lax.switch(branch_for(widths, seq_lengths),
                      [functools.partial(attend, w) for w in widths])


# ---------------------------------------------------------------------------------------
# Prefill (EXTEND): each sequence's new tokens against its own keys
# ---------------------------------------------------------------------------------------

def extend_attends_whole_batch(fn: Callable) -> bool:
    """True when the native backend's EXTEND attention scores every query token of the
    batch against every key slot of the batch (`_apply_extend_mask`'s block diagonal)."""
    return "_apply_extend_mask" in source_of(fn)


def rows_per_block(rows: int, width: int, num_heads: int) -> int:
    """The most sequences (a divisor of `rows`) whose [heads, width, width] float32 scores
    fit in PREFILL_BLOCK_BYTES (at least one)."""
    fit = max(1, PREFILL_BLOCK_BYTES // (num_heads * width * width * 4))
    return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= fit)


def prefill_attention_per_sequence(q: Any, kv_fused: Any, seq_lengths: Any, loc: Any,
                                   extend_prefix_lens: Any, extend_seq_lens: Any,
                                   num_heads: int, num_kv_heads: int, scale: Any = None,
                                   is_causal: bool = True) -> Any:
    """Prefill (EXTEND) attention of each sequence's new tokens over its own keys.

    Same result as the native backend's EXTEND path: the new tokens of the sequences are
    packed one after another in `q` (`extend_seq_lens` each, then padding), their KV slots
    listed one sequence after another in `loc` (`seq_lengths` each: prefix then new
    tokens; slot 0 = padding), in a buffer of rows x max_req_len slots. New token i of
    sequence b sits at position extend_prefix_lens[b] + i and (causal) sees keys 0 to that
    position. Each sequence's queries and keys are gathered into a [width] block, with
    width the smallest of `attention_widths` that holds the longest sequence of the batch,
    and the blocks are attended a few sequences at a time (at most PREFILL_BLOCK_BYTES of
    scores), the results written back to the packed token order. Work: rows x width^2
    instead of tokens x rows x max_req_len; memory: a few blocks instead of the whole
    [heads, tokens, rows x max_req_len] score matrix. Padding tokens get zeros (the
    original gives them the mean of all values; nothing reads them: their KV slot is
    dropped and no logits are taken).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    rows, tokens = seq_lengths.shape[0], q.shape[0]
    head_dim = q.shape[-1] if q.ndim == 3 else q.shape[-1] // num_heads
    group = num_heads // num_kv_heads
    qg = q.reshape(tokens, num_kv_heads, group, head_dim)
    k_starts = jnp.cumsum(seq_lengths) - seq_lengths
    q_starts = jnp.cumsum(extend_seq_lens) - extend_seq_lens
    if scale is None:
        scale = 1.0 / jnp.sqrt(head_dim)
    neg = jnp.asarray(jnp.finfo(q.dtype).min, q.dtype)

    def block(width, b):
        """Outputs [len(b), width, kv_heads, group, head_dim] of the sequences `b`."""
        k, v, k_ok = gather_kv(kv_fused, loc, k_starts[b], seq_lengths[b], width)
        offs = jnp.arange(width)[None, :]
        q_idx = jnp.where(offs < extend_seq_lens[b][:, None], q_starts[b][:, None] + offs,
                          tokens)
        qb = jnp.take(qg, q_idx, axis=0, mode="fill", fill_value=0)
        logits = jnp.einsum("bqkgd,bwkd->bkgqw", qb, k) * scale
        ok = k_ok[:, None, None, None, :]
        if is_causal:
            q_pos = extend_prefix_lens[b][:, None] + offs  # [b, q]
            ok = ok & (offs[:, None, :] <= q_pos[:, :, None])[:, None, None]
        logits = jnp.where(ok, logits, neg)
        return jnp.einsum("bkgqw,bwkd->bqkgd", jax.nn.softmax(logits, axis=-1), v)

    def attend(width):
        per = rows_per_block(rows, width, num_heads)
        if per == rows:
            out = block(width, jnp.arange(rows))
        else:  # a few sequences at a time: [chunks, per, width, ...]
            out = lax.map(functools.partial(block, width),
                          jnp.arange(rows).reshape(rows // per, per))
        return out.reshape(rows * width, num_heads * head_dim)

    # Back to the packed token order: token t is new token t - q_starts[b] of sequence b.
    t = jnp.arange(tokens)
    b = jnp.clip(jnp.searchsorted(q_starts + extend_seq_lens, t, side="right"), 0, rows - 1)
    real = t < jnp.sum(extend_seq_lens)

    def packed(width):
        flat = jnp.where(real, b * width + t - q_starts[b], rows * width)
        return jnp.take(attend(width), flat, axis=0, mode="fill", fill_value=0)

    widths = attention_widths(loc.shape[0] // rows)
    return lax.switch(branch_for(widths, seq_lengths),
                      [functools.partial(packed, w) for w in widths])


# ---------------------------------------------------------------------------------------
# The fixes: NativeAttention.__call__ per mode
# ---------------------------------------------------------------------------------------

def _native_backend():
    from sgl_jax.srt.layers.attention import native_backend

    return native_backend


def backend_attends_through(native_backend, check: Callable[[Callable], bool]) -> bool:
    """True when NativeAttention hands the layer's K/V (strided views of its fused buffer)
    to a `forward_attention` that attends the whole batch (`check`)."""
    call = ORIGINALS.get("NativeAttention.__call__", native_backend.NativeAttention.__call__)
    return "forward_attention(" in source_of(call) and check(native_backend.forward_attention)


def fits_per_sequence(q, layer, forward_batch, decode: bool) -> bool:
    """The layout the per-sequence functions assume (always the scheduler's on CPU)."""
    rows = forward_batch.seq_lens.shape[0]
    return (rows > 0 and forward_batch.cache_loc.shape[0] % rows == 0
            and layer.q_head_num % layer.kv_head_num == 0
            and (not decode or q.shape[0] == rows))


def _layer_scale(layer):
    import jax.numpy as jnp

    return 1.0 / jnp.sqrt(layer.head_dim) if layer.scaling is None else layer.scaling


def _patch_call(mode_name: str, key: str, attend: Callable) -> None:
    """Wrap NativeAttention.__call__: batches in `mode_name` go to `attend`, with the layer's
    fused KV buffer (updated as the original does); others to the current __call__."""
    from sgl_jax.srt.model_executor.forward_batch_info import ForwardMode
    from sgl_jax.srt.utils.jax_utils import is_tpu_runtime

    cls = _native_backend().NativeAttention
    inner = cls.__call__
    ORIGINALS.setdefault("NativeAttention.__call__", inner)
    ORIGINALS[key] = inner
    mode = getattr(ForwardMode, mode_name)

    @functools.wraps(inner)
    def __call__(self, q, k, v, layer, forward_batch, token_to_kv_pool):
        if (forward_batch.forward_mode != mode or is_tpu_runtime()
                or not fits_per_sequence(q, layer, forward_batch, mode == ForwardMode.DECODE)):
            return inner(self, q, k, v, layer, forward_batch, token_to_kv_pool)
        _, _, fused = self._get_and_update_kv_cache(k, v, forward_batch, token_to_kv_pool,
                                                     layer.layer_id)
        return attend(q, fused, layer, forward_batch), fused

    cls.__call__ = __call__


def native_decode_attention_needed() -> bool:
    return backend_attends_through(_native_backend(), decode_attends_whole_batch)


def fix_native_decode_attention() -> bool:
    """Decode on the native (CPU) attention backend attends per sequence.

    0.0.2's native backend computes a [heads, rows, rows x max_req_len] score matrix for a
    decode step and masks all but each sequence's own keys: cost and memory grow with the
    square of the batch (25x the FLOPs of the per-sequence gather at batch 32).
    `decode_attention_per_sequence` gives the same outputs (K and V taken out of the
    layer's fused KV buffer in the branch that runs: see `gather_kv`).
    """
    def attend(q, fused, layer, fb):
        return decode_attention_per_sequence(q, fused, fb.seq_lens, fb.cache_loc,
                                             layer.q_head_num, layer.kv_head_num,
                                             _layer_scale(layer))

    _patch_call("DECODE", "NativeAttention.__call__.decode", attend)
    return True


def native_prefill_attention_needed() -> bool:
    return backend_attends_through(_native_backend(), extend_attends_whole_batch)


def fix_native_prefill_attention() -> bool:
    """Prefill (EXTEND) on the native (CPU) attention backend attends per sequence.

    0.0.2 scores every new token of the batch against every key slot of the batch,
    [heads, tokens, rows x max_req_len], and masks it block-diagonally: at batch 128 with
    40-token prompts and 512 new tokens (5,120 tokens x 76,672 slots) one layer asked for a
    25.5 GB buffer and the run died. `prefill_attention_per_sequence` gives the same
    outputs for the real tokens with work and memory in the sum of the sequence lengths.
    """
    from sgl_jax.srt.layers.radix_attention import AttentionType

    def attend(q, fused, layer, fb):
        return prefill_attention_per_sequence(
            q, fused, fb.seq_lens, fb.cache_loc, fb.extend_prefix_lens, fb.extend_seq_lens,
            layer.q_head_num, layer.kv_head_num, _layer_scale(layer),
            is_causal=layer.attn_type != AttentionType.ENCODER_ONLY)

    _patch_call("EXTEND", "NativeAttention.__call__.prefill", attend)
    return True


# ---------------------------------------------------------------------------------------
# Output head: logits from a [hidden, vocab] copy on CPU
# ---------------------------------------------------------------------------------------

def logits_contract_head_rows(processor_cls) -> bool:
    """True when the logits are `hidden @ <[vocab, hidden] weight>.T`."""
    return "embedding.T" in source_of(processor_cls._get_logits)


def logits_head(model) -> Any:
    """The module whose weight gives the logits: `lm_head` (untied) or the backbone's
    `embed_tokens` (tied), as Qwen3/Qwen2/Llama in sglang-jax 0.0.2 pass them."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", True):
        return getattr(model, "lm_head", None)
    for backbone in ("transformer", "model"):
        embed = getattr(getattr(model, backbone, None), "embed_tokens", None)
        if embed is not None:
            return embed
    return None


@functools.cache
def logits_weight_class():
    from flax import nnx

    class LogitsWeight(nnx.Variable):
        """The output head's weight as [hidden, vocab], derived from its [vocab, hidden]
        weight (not a parameter)."""

    return LogitsWeight


@functools.cache
def _transposer(sharding):
    import jax

    return jax.jit(lambda w: w.T, out_shardings=sharding)


class HeadRefresh:
    """Keeps a runner's LogitsWeight leaf the transpose of its head weight leaf."""

    def __init__(self, runner, head):
        import jax
        from flax import nnx

        _, state = nnx.split(runner.model)
        paths = [tuple(path_names(p)) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        head_path = _module_path(runner.model, head)
        self.src = paths.index((*head_path, "embedding"))
        self.dst = paths.index((*head_path, "logits_weight"))
        self.head = head
        self.seen = runner.model_state_leaves[self.src]

    def __call__(self, runner) -> None:
        """Run before each forward (scheduler thread): refresh after a new head weight."""
        leaves = runner.model_state_leaves
        if leaves[self.src] is self.seen:
            return
        leaves = list(leaves)
        leaves[self.dst] = _transposer(leaves[self.dst].sharding)(leaves[self.src])
        self.head.logits_weight.value = leaves[self.dst]  # the model drops the old copy too
        runner.model_state_leaves = leaves
        self.seen = leaves[self.src]


def _module_path(model, target) -> tuple[str, ...]:
    from flax import nnx

    for path, mod in nnx.iter_graph(model):
        if mod is target:
            return tuple(str(p) for p in path)
    raise ValueError("logits head is not part of the model")


def cpu_lm_head_layout_needed() -> bool:
    from sgl_jax.srt.layers.logits_processor import LogitsProcessor

    return logits_contract_head_rows(LogitsProcessor)


def fix_cpu_lm_head_layout() -> bool:
    """On CPU, compute logits from a [hidden, vocab] copy of the head (module docstring)."""
    import jax.numpy as jnp
    from sgl_jax.srt.layers.logits_processor import LogitsProcessor
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    get_logits = LogitsProcessor._get_logits
    ORIGINALS["LogitsProcessor._get_logits"] = get_logits
    ORIGINALS["ModelRunner.load_model"] = load_model = ModelRunner.load_model
    ORIGINALS["ModelRunner.initialize_jit.lm_head"] = initialize_jit = ModelRunner.initialize_jit

    @functools.wraps(get_logits)
    def _get_logits(self, hidden_states, lm_head):
        weight = getattr(lm_head, "logits_weight", None)
        if weight is None:
            return get_logits(self, hidden_states, lm_head)
        hidden_states, weight = lm_head.promote_dtype((hidden_states, weight.value),
                                                      dtype=lm_head.dtype)
        logits = jnp.dot(hidden_states, weight)
        return logits[:, : self.vocab_size] if logits.ndim > 1 else logits[: self.vocab_size]

    @functools.wraps(load_model)
    def _load_model(self):
        load_model(self)
        head = logits_head(self.model) if self.device == "cpu" else None
        if head is not None:
            head.logits_weight = logits_weight_class()(jnp.transpose(head.embedding.value))

    @functools.wraps(initialize_jit)
    def _initialize_jit(self):
        initialize_jit(self)
        head = logits_head(self.model)
        if head is None or getattr(head, "logits_weight", None) is None:
            return
        refresh, forward = HeadRefresh(self, head), self.jitted_run_model

        def run_model(forward_batch, logits_metadata):
            refresh(self)
            return forward(forward_batch, logits_metadata)

        self.jitted_run_model = run_model

    LogitsProcessor._get_logits = _get_logits
    ModelRunner.load_model = _load_model
    ModelRunner.initialize_jit = _initialize_jit
    return True
