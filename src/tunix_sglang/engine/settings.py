"""What an in-process engine is built from, and on which devices it runs.

Every engine shape comes from the rollout (prompt length, new tokens, prompts x
generations), never from sglang-jax defaults, and only the ServerArgs fields the installed
sglang-jax has are passed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tunix_sglang.errors import UserError

# Tokens reserved on top of prompt + new tokens: sglang-jax's scheduler keeps
# max_req_len = context_len - 1, prompts <= max_req_len - 5, new <= max_req_len - prompt - 1,
# and its tokenizer manager requires prompt + new < context_len.
CONTEXT_SLACK = 8


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Everything the engine is built from; shapes come from the rollout.

    model_path: Hugging Face model directory (config.json is read by the engine; weights are
      not: the engine starts with dummy weights and is synced from the trainer).
    max_prompt_len / max_new_tokens: the rollout's longest prompt and completion.
    batch_size: sequences generated together (prompts x generations per step).
    mem_fraction_static: `--sglang-mem-fraction-static`, fraction of host RAM (CPU) or
      device memory the engine may plan for; the KV cache is further capped to what the
      rollout needs (`max_total_tokens`), so a large fraction is safe.
    rollout_devices: `--rollout-devices N`: the engine runs on the first N local devices
      (None: the first `tp_size`).
    device_ids: explicit device ids instead (overrides rollout_devices).
    global_devices: choose among every process's devices (`jax.devices()`), not only this
      process's: one engine mesh spanning several processes (multi-host lockstep). Every
      process must then start the engine with the same settings.
    """

    model_path: str
    max_prompt_len: int
    max_new_tokens: int
    batch_size: int
    mem_fraction_static: float = 0.8
    rollout_devices: int | None = None
    device_ids: tuple[int, ...] | None = None
    global_devices: bool = False
    tp_size: int = 1
    dtype: str = "float32"
    seed: int = 0
    disable_radix_cache: bool = False
    token_paddings: tuple[int, ...] | None = None
    bs_paddings: tuple[int, ...] | None = None
    precompile: bool = True
    log_level: str = "error"
    extra_server_args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        for name in ("max_prompt_len", "max_new_tokens", "batch_size", "tp_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise UserError(f"engine setting {name}={v!r} must be a positive integer")
        f = self.mem_fraction_static
        if not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise UserError(
                f"--sglang-mem-fraction-static {f!r}: must be a number strictly between 0 and 1"
            )
        if self.rollout_devices is not None and (
            not isinstance(self.rollout_devices, int) or self.rollout_devices <= 0
        ):
            raise UserError(f"--rollout-devices {self.rollout_devices!r}: must be a positive int")

    @classmethod
    def for_rollout(
        cls,
        model_path: str,
        *,
        max_prompt_len: int,
        max_new_tokens: int,
        num_prompts: int,
        num_generations: int = 1,
        **kw: Any,
    ) -> EngineSettings:
        return cls(
            model_path=str(model_path),
            max_prompt_len=int(max_prompt_len),
            max_new_tokens=int(max_new_tokens),
            batch_size=int(num_prompts) * int(num_generations),
            **kw,
        )

    # -- derived values -------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.max_prompt_len + self.max_new_tokens + CONTEXT_SLACK

    @property
    def max_prefill_tokens(self) -> int:
        return max(self.batch_size * self.max_prompt_len, self.batch_size)

    def derived_bs_paddings(self) -> list[int]:
        if self.bs_paddings:
            return sorted({min(int(b), self.batch_size) for b in self.bs_paddings})
        # Decode batches shrink as sequences finish: bs, bs/4, bs/16 (each is one compile).
        out, b = [], self.batch_size
        while b >= 1 and len(out) < 3:
            out.append(b)
            b //= 4
        return sorted(set(out))

    def derived_token_paddings(self, native: bool = False) -> list[int]:
        top = self.max_prefill_tokens
        if self.token_paddings:
            return sorted({int(t) for t in self.token_paddings if self.batch_size <= t <= top}
                          | {top})
        sizes = {top // 4, top}
        if native:  # CPU: a prefill costs its padding x the whole KV window; the sync proof's
            from tunix_sglang.probe.scoring import PROBE_TOKEN_PADDING  # (imports jax)

            sizes.add(PROBE_TOKEN_PADDING)  # gets its own size
        return sorted(t for t in sizes if self.batch_size <= t <= top)

    def server_args_values(self, backend: str) -> dict[str, Any]:
        """All ServerArgs values this engine wants (before filtering by the installed version)."""
        native = backend == "cpu"
        v: dict[str, Any] = dict(
            model_path=str(self.model_path),
            # Token ids in and out: with its own tokenizer on, 0.0.2's detokenizer re-sent ids
            # while the decoded text was incomplete UTF-8 (more output ids than tokens).
            skip_tokenizer_init=True,
            load_format="dummy",  # weights come from the trainer right after start
            dtype=self.dtype,
            context_length=self.context_length,
            mem_fraction_static=float(self.mem_fraction_static),
            max_running_requests=self.batch_size,
            max_total_tokens=self.batch_size * self.context_length,
            max_prefill_tokens=self.max_prefill_tokens,
            chunked_prefill_size=-1,
            # page_size 1 on CPU: the native attention backend assumes packed keys while
            # page_size > 1 page-aligns KV slots -> wrong attention for every sequence after
            # the first in a batch (measured: logprob errors up to 0.76).
            page_size=1 if native else 128,
            attention_backend="native" if native else "fa",
            device=backend,
            tp_size=self.tp_size,
            random_seed=self.seed,
            enable_single_process=True,
            disable_overlap_schedule=True,
            disable_radix_cache=self.disable_radix_cache,
            precompile_bs_paddings=self.derived_bs_paddings(),
            precompile_token_paddings=self.derived_token_paddings(native),
            disable_jax_precompile=not self.precompile,
            log_level=self.log_level,
            max_seq_len=self.context_length,
        )
        v.update(dict(self.extra_server_args))
        return v

    def server_args_kwargs(self, server_args_cls=None, backend: str | None = None):
        """(kwargs the installed ServerArgs accepts, names it does not have)."""
        if server_args_cls is None:
            from sgl_jax.srt.server_args import ServerArgs as server_args_cls
        if backend is None:
            import jax

            backend = jax.default_backend()
        fields = {f.name for f in dataclasses.fields(server_args_cls)}
        wanted = self.server_args_values(backend)
        kwargs = {k: val for k, val in wanted.items() if k in fields}
        dropped = sorted(k for k in wanted if k not in fields)
        return kwargs, dropped


def host_local_share(batch_size: int, num_processes: int) -> int:
    """Sequences a host-local engine is built for: its host's share of the batch, rounded up."""
    return max(1, -(-batch_size // num_processes))


def host_local_device_count(rollout_devices: int, mesh_size: int, num_processes: int,
                            num_local: int) -> int:
    """Local devices a host-local engine uses: the rollout mesh's share per process
    (--rollout-devices counts global devices; 0 means the whole mesh)."""
    return min(max(1, (rollout_devices or mesh_size) // num_processes), num_local)


def select_devices(settings: EngineSettings) -> list:
    """The devices the engine runs on: explicit ids, else the first N devices; among this
    process's devices, or every process's with `settings.global_devices`."""
    import jax

    pool = jax.devices() if settings.global_devices else jax.local_devices()
    kind = "devices" if settings.global_devices else "local devices"
    if settings.device_ids is not None:
        by_id = {d.id: d for d in pool}
        missing = [i for i in settings.device_ids if i not in by_id]
        if missing:
            raise UserError(f"rollout device ids {missing} are not {kind} {sorted(by_id)}")
        devs = [by_id[i] for i in settings.device_ids]
    elif settings.global_devices and settings.rollout_devices is None:
        devs = list(pool)  # a global engine spans every device unless told otherwise
    else:
        n = settings.rollout_devices or settings.tp_size
        if n > len(pool):
            hint = ""
            if jax.default_backend() == "cpu" and not settings.global_devices:
                hint = f"; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
            raise UserError(f"--rollout-devices {n}: only {len(pool)} {kind}{hint}")
        devs = list(pool[:n])
    if len(devs) % settings.tp_size:
        raise UserError(
            f"--rollout-devices {len(devs)} is not a multiple of the engine tp size "
            f"{settings.tp_size}"
        )
    return devs
