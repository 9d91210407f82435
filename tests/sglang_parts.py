"""Small sglang-jax inputs the compat and runtime tests share: a runner holding a one-weight
model and a real Sampler, sampling inputs, logits-processor inputs, a scheduler's sockets."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class TinyLM(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((3,)))

    def __call__(self, x, pool, meta):
        return x * self.w.value, pool, meta


def runner_parts():
    """What ModelRunner.initialize_jit / sample read from a runner."""
    from sgl_jax.srt.layers.sampler import Sampler

    return types.SimpleNamespace(
        model=TinyLM(), sampler=Sampler(nnx.Rngs(0)), token_to_kv_pool=jnp.zeros((1,))
    )


def sampling_inputs(bs=4, vocab=50, temperature=1.0, greedy=False, logits=None):
    from sgl_jax.srt.layers.logits_processor import LogitsProcessorOutput
    from sgl_jax.srt.sampling.sampling_batch_info import SamplingMetadata

    if logits is None:
        logits = jax.random.normal(jax.random.key(0), (bs, vocab))
    meta = SamplingMetadata(
        return_logprob=True, top_logprobs_nums=None, token_ids_logprobs=None,
        temperatures=jnp.full((bs, 1), temperature), top_ps=jnp.ones((bs,)),
        top_ks=jnp.full((bs,), vocab, jnp.int32), min_ps=jnp.zeros((bs,)),
        sampling_seeds=None, is_all_greedy=greedy, need_min_p_sampling=False,
    )
    return LogitsProcessorOutput(next_token_logits=logits), meta, jnp.zeros((bs,), jnp.int32)


def logits_case():
    """A LogitsProcessor, an output head, EXTEND metadata asking for logprobs of 1 real
    request in a batch padded to 4, and hidden states."""
    from sgl_jax.srt.layers.embeddings import Embed
    from sgl_jax.srt.layers.logits_processor import LogitsMetadata, LogitsProcessor
    from sgl_jax.srt.model_executor.forward_batch_info import ForwardMode

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tensor",))
    head = Embed(50, 8, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    meta = LogitsMetadata(
        forward_mode=ForwardMode.EXTEND, extend_return_logprob=True,
        extend_seq_lens=jnp.array([3, 0, 0, 0]), extend_seq_lens_cpu=[3, 0, 0, 0],
        extend_logprob_start_lens_cpu=[2, 0, 0, 0], extend_logprob_pruned_lens_cpu=[1, 0, 0, 0],
        top_logprobs_nums=[0, 0, 0, 0], token_ids_logprobs=[None] * 4,
        extend_input_logprob_token_ids_device=jnp.array([5]),
    )
    return LogitsProcessor(50, mesh), head, meta, jnp.ones((8, 8))


def idle_scheduler(ctx):
    """The parts of an idle single-node Scheduler that receiving reads: its two sockets
    (bound in-process: inproc://tok, inproc://rpc) and an empty queue and batch."""
    import zmq

    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://tok")
    rpc = ctx.socket(zmq.DEALER)
    rpc.bind("inproc://rpc")
    return types.SimpleNamespace(
        nnodes=1, node_rank=0, recv_from_tokenizer=pull, recv_from_rpc=rpc, cur_batch=None,
        last_batch=None, waiting_queue=[], chunked_req=None,
        running_batch=types.SimpleNamespace(is_empty=lambda: True),
    )


def close_scheduler(ctx, sched, *socks) -> None:
    for s in (*socks, sched.recv_from_tokenizer, sched.recv_from_rpc):
        s.close(0)
    ctx.term()
