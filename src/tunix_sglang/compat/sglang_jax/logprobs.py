"""sglang-jax's `return_logprob` path: the sampled logits it hands the sampler.

(The engine itself takes logprobs from the sampler through its own capture,
`tunix_sglang.engine.scheduler_hooks`, since `return_logprob` recompiles per batch.)
"""

from __future__ import annotations

import functools

from tunix_sglang.compat.base import ORIGINALS, source_of


def logits_not_padded_for_logprobs(processor_cls) -> bool:
    """True when the input-logprob branch keeps only real rows of the sampled logits."""
    src = source_of(processor_cls.__call__)
    return "logits[sample_indices]" in src


def logprob_logits_padding_needed() -> bool:
    from sgl_jax.srt.layers.logits_processor import LogitsProcessor

    return logits_not_padded_for_logprobs(LogitsProcessor)


def fix_logprob_logits_padding() -> bool:
    """Pad sampled logits back to the padded batch when logprobs are requested.

    With `return_logprob=True`, LogitsProcessor keeps one row per *real* request while the
    sampling metadata (temperatures...) has one per *padded* request: "Temperature batch
    size 8 doesn't match logits batch size 1". Zero rows for the padding are discarded by
    the scheduler (it keeps `[:real_bs]`).
    """
    import jax.numpy as jnp
    from sgl_jax.srt.layers.logits_processor import LogitsProcessor

    call = LogitsProcessor.__call__
    ORIGINALS["LogitsProcessor.__call__"] = call

    @functools.wraps(call)
    def __call__(self, hidden_states, lm_head, logits_metadata):
        out = call(self, hidden_states, lm_head, logits_metadata)
        seq_lens = logits_metadata.extend_seq_lens
        if (
            logits_metadata.forward_mode.is_extend()
            and logits_metadata.extend_return_logprob
            and seq_lens is not None
        ):
            padded_bs = seq_lens.shape[0]
            rows = out.next_token_logits.shape[0]
            if rows < padded_bs:
                out.next_token_logits = jnp.pad(
                    out.next_token_logits, ((0, padded_bs - rows), (0, 0))
                )
        return out

    LogitsProcessor.__call__ = __call__
    return True
