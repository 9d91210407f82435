"""compat/sglang_jax/logprobs.py: `return_logprob`'s sampled logits padded to the batch."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sglang_parts import logits_case  # noqa: E402

from tunix_sglang import compat  # noqa: E402
from tunix_sglang.compat.base import ORIGINALS as ORIG  # noqa: E402
from tunix_sglang.compat.sglang_jax import logprobs  # noqa: E402

compat.apply_all()


def test_logprob_logits_padding():
    from sgl_jax.srt.layers.logits_processor import LogitsProcessor

    proc, head, meta, hidden = logits_case()
    # Original: 1 row of logits for a batch padded to 4 -> sampler's temperatures (4 rows)
    # do not match ("Temperature batch size 4 doesn't match logits batch size 1").
    orig = ORIG["LogitsProcessor.__call__"]
    assert logprobs.logits_not_padded_for_logprobs(LogitsProcessor)
    assert orig(proc, hidden, head, meta).next_token_logits.shape[0] == 1
    assert LogitsProcessor.__call__(proc, hidden, head, meta).next_token_logits.shape == (4, 50)
