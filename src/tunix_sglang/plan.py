"""The run plan: memory per device and the engine a run would build, here or on a TPU slice.

`doctor --plan --config R --target tpu-v4-8` answers on any machine: it reads the model's
config.json (a cached, shipped or downloaded copy; never the weights) and the run's config,
and computes everything through the code the run itself uses: `TrainConfig.split_devices` for
where the trainer and the rollout run, `EngineSettings.server_args_values` for what the engine
is given (attention backend, page size, paddings, KV cap), and `memory_plan` for the bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunix_sglang import memory_plan as mp
from tunix_sglang.checks import Check, DeviceFacts
from tunix_sglang.config import TrainConfig
from tunix_sglang.engine import EngineSettings, host_local_device_count, host_local_share
from tunix_sglang.errors import UserError
from tunix_sglang.tpu_targets import TpuTarget

# The engine's ServerArgs a plan shows (all of them come from EngineSettings).
ENGINE_KEYS = ("device", "attention_backend", "page_size", "tp_size", "dtype", "context_length",
               "max_running_requests", "max_total_tokens", "max_prefill_tokens",
               "precompile_bs_paddings", "precompile_token_paddings", "mem_fraction_static")
# Searched up to these when looking for the largest batch / completion length that fits.
MAX_BATCH = 4096
MAX_NEW_TOKENS = 1 << 17


def target_facts(target: TpuTarget) -> DeviceFacts:
    """The device facts JAX would report on process 0 of this slice."""
    return DeviceFacts(
        backend="tpu", device_kind=target.device_kind, device_count=target.chips,
        local_device_count=target.chips_per_host, process_count=target.hosts, process_index=0,
        memory_bytes=target.hbm_bytes,
        memory_source=f"{target.name} HBM per chip ({target.hbm_gib} GiB nominal)",
    )


def is_tpu(facts: DeviceFacts) -> bool:
    return facts.backend == "tpu" or (facts.device_kind or "").startswith("TPU")


def model_config(cfg: TrainConfig) -> tuple[Path, str]:
    """(config.json the plan reads, where it comes from) for the run's model."""
    if cfg.local_model_dir:
        return Path(cfg.local_model_dir).expanduser() / "config.json", "--local-model-dir"
    if cfg.model:
        from tunix_sglang.hub import config_json

        return config_json(cfg.model)
    from tunix_sglang.warmstart import embedded_shape_dir

    return embedded_shape_dir() / "config.json", "embedded model"


def engine_settings(cfg: TrainConfig, model_path: str | Path, processes: int = 1
                    ) -> EngineSettings | None:
    """The in-process engine a run of `cfg` builds on each host (None: it builds none).

    What `rollout.base.derive_settings` makes of the run's rollout config and `cfg` (a test pins
    the two equal); host-local engines on several processes each take their host's share.
    """
    if cfg.rollout_engine != "sglang_jax":
        return None
    settings = EngineSettings.for_rollout(
        str(model_path), max_prompt_len=cfg.max_prompt_length,
        max_new_tokens=cfg.max_new_tokens, num_prompts=cfg.batch_size,
        num_generations=cfg.num_generations, mem_fraction_static=cfg.sglang_mem_fraction_static,
        dtype=cfg.dtype, seed=cfg.seed)
    if processes > 1 and cfg.multihost_mode == "host_local":
        settings = dataclasses.replace(
            settings, batch_size=host_local_share(settings.batch_size, processes))
    return settings


@dataclasses.dataclass
class RunPlan:
    """The plan of one config on one set of devices."""

    cfg: TrainConfig
    facts: DeviceFacts
    shape: mp.ModelShape
    config_json: Path
    config_source: str
    memory: mp.MemoryPlan
    settings: EngineSettings | None
    problems: list[str]  # beyond memory: settings the devices cannot run
    warnings: list[str]

    @property
    def backend(self) -> str:
        return "tpu" if is_tpu(self.facts) else "cpu"

    @property
    def fits(self) -> bool:
        return self.memory.fits and not self.problems

    def engine(self) -> dict[str, Any] | None:
        """The ServerArgs values the engine gets, as EngineSettings computes them."""
        if self.settings is None:
            return None
        values = self.settings.server_args_values(self.backend)
        return {k: values[k] for k in ENGINE_KEYS}

    def devices(self) -> dict[str, Any]:
        f, cfg = self.facts, self.cfg
        train, roll = cfg.split_devices(range(max(1, f.device_count)))
        out: dict[str, Any] = {
            "processes": f.process_count, "devices_per_process": f.local_device_count,
            "trainer": train, "rollout": roll, "shared": train == roll}
        if cfg.rollout_engine == "sglang_jax_remote":
            out["rollout"] = "remote servers"
            out["shared"] = False
        elif self.settings is not None and f.process_count > 1 and cfg.multihost_mode == \
                "host_local":
            out["engines"] = f.process_count
            out["devices_per_engine"] = host_local_device_count(
                cfg.rollout_devices, len(roll), f.process_count, f.local_device_count)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": "fits" if self.fits else "does not fit", "fits": self.fits,
            "problems": self.problems + self.memory.problems, "advice": self.memory.advice,
            "warnings": self.warnings,
            "hardware": {"device_kind": self.facts.device_kind,
                         "devices": self.facts.device_count, "hosts": self.facts.process_count,
                         "memory_per_device": self.facts.memory_bytes,
                         "memory_source": self.facts.memory_source},
            "model": {"name": self.cfg.model or self.cfg.local_model_dir or "embedded",
                      "config_json": str(self.config_json), "config_source": self.config_source,
                      "parameters": self.shape.param_count()},
            "devices": self.devices(), "engine": self.engine(),
            "memory": self.memory.to_dict(),
        }

    def format(self) -> str:
        f, cfg = self.facts, self.cfg
        lines = [f"verdict: {'fits' if self.fits else 'DOES NOT FIT'}"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines.append(f"model: {cfg.model or cfg.local_model_dir or 'embedded'} "
                     f"({self.shape.param_count() / 1e9:.2f} B parameters; config.json: "
                     f"{self.config_source})")
        d = self.devices()
        lines.append(f"devices: {f.device_count} x {f.device_kind} on {f.process_count} "
                     f"host(s); trainer on {d['trainer']}, rollout on {d['rollout']}")
        if "engines" in d:
            lines.append(f"  {d['engines']} host-local engines, {d['devices_per_engine']} "
                         "device(s) each")
        engine = self.engine()
        if engine is not None:
            lines.append("engine (sglang-jax ServerArgs): " + ", ".join(
                f"{k} {v}" for k, v in engine.items()))
        return "\n".join(lines) + "\n" + self.memory.format()


def plan_run(cfg: TrainConfig, facts: DeviceFacts,
             model: tuple[Path, str] | None = None) -> RunPlan:
    """The plan of `cfg` on these devices (`model`: config.json and its source, if known)."""
    config_json, source = model or model_config(cfg)
    shape = mp.ModelShape.from_hf_config(json.loads(config_json.read_text()))
    problems, warnings = [], []
    n = max(1, facts.device_count)
    try:
        cfg.validate_devices(n)
    except UserError as e:
        problems.append(str(e))
    # The bytes of a split these devices cannot make are meaningless: plan them shared.
    mem_cfg = dataclasses.replace(cfg, rollout_devices=0) if cfg.rollout_devices > n else cfg
    settings = engine_settings(mem_cfg, config_json.parent, max(1, facts.process_count))
    tpu = is_tpu(facts)
    engine: dict[str, Any] = {}
    if settings is not None:
        values = settings.server_args_values("tpu" if tpu else "cpu")
        engine = dict(engine_tp_size=values["tp_size"], engine_page_size=values["page_size"],
                      engine_max_total_tokens=values["max_total_tokens"])
    memory = mp.plan_memory(
        shape, mp.PlanInputs.from_config(mem_cfg, **engine), facts.memory_bytes or 0,
        num_devices=n, shared_memory=not tpu, memory_source=facts.memory_source)
    if settings is not None and engine:
        page = engine["engine_page_size"]
        need = settings.batch_size * math.ceil(
            (settings.max_prompt_len + settings.max_new_tokens) / page) * page
        cap = engine["engine_max_total_tokens"] // page * page
        if cap < need:
            warnings.append(f"the engine's KV cap ({cap} tokens) holds fewer than the "
                            f"{need} its {settings.batch_size} sequences take in pages of "
                            f"{page}: some wait for others to finish")
    if (cfg.rollout_engine == "sglang_jax" and cfg.rollout_devices and facts.process_count > 1
            and cfg.multihost_mode == "host_local"):
        warnings.append(f"--rollout-devices {cfg.rollout_devices} takes the first global "
                        "devices (the first host's) for the rollout mesh while every host runs "
                        "its own engine; use 0 (share) on a multi-host slice")
    return RunPlan(cfg, facts, shape, config_json, source, memory, settings, problems, warnings)


def _largest(ok: Callable[[int], bool], current: int, cap: int) -> int | None:
    """Largest v in [1, cap] with ok(v), for ok monotone (true up to some value)."""
    if not ok(1):
        return None
    lo = 1
    hi = max(2, current)
    while hi <= cap and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def largest_fitting(plan: RunPlan) -> dict[str, int | None]:
    """The largest --batch-size (at this --num-generations, split evenly over the training
    devices) and the largest --max-new-tokens (at this batch) that fit, with the best
    --sglang-mem-fraction-static."""
    cfg, facts = plan.cfg, plan.facts
    model = (plan.config_json, plan.config_source)
    if cfg.rollout_devices > max(1, facts.device_count):  # no size fits a split that cannot be
        return {"batch_size": None, "num_generations": cfg.num_generations,
                "max_new_tokens": None}

    def ok(**change: Any) -> bool:
        return plan_run(dataclasses.replace(cfg, **change), facts, model).memory.feasible

    n_train = cfg.train_device_count(max(1, facts.device_count))
    batch = _largest(lambda v: ok(batch_size=v), cfg.batch_size, MAX_BATCH)
    while batch and (batch * cfg.num_generations) % n_train:
        batch -= 1
    new_cap = min(MAX_NEW_TOKENS, int(json.loads(plan.config_json.read_text()).get(
        "max_position_embeddings", MAX_NEW_TOKENS)) - cfg.max_prompt_length)
    new = _largest(lambda v: ok(max_new_tokens=v), cfg.max_new_tokens, max(1, new_cap))
    return {"batch_size": batch or None, "num_generations": cfg.num_generations,
            "max_new_tokens": new}


# ---------------------------------------------------------------------------------------------
# As doctor checks.


def check_memory_plan(cfg: TrainConfig, facts: DeviceFacts) -> tuple[Check, RunPlan | None]:
    """The plan on these devices as a check; blocking only when it certainly cannot fit."""
    if not facts.memory_bytes:
        return Check("memory plan", "WARN", "device memory unknown; no plan"), None
    try:
        plan = plan_run(cfg, facts)
    except (OSError, KeyError, ValueError, UserError) as e:
        return Check("memory plan", "WARN", f"cannot read the model config: {e}",
                     "pass --local-model-dir a directory with config.json, or --model "
                     "ORG/NAME"), None
    mem = plan.memory
    head = f"{mp.gib(mem.total)} of {mp.gib(mem.device_memory)} per device"
    if mem.mem_fraction_max is not None:
        head += (f"; safe --sglang-mem-fraction-static <= {mem.mem_fraction_max:.2f}, "
                 f"max_total_tokens {mem.max_total_tokens}")
    if plan.fits:
        return Check("memory plan", "OK", head), plan
    detail = f"{head}: {'; '.join(plan.problems + mem.problems)}"
    fix = "lower one of: " + ", ".join(mem.advice) if mem.advice else "see the problem"
    # Only a certain OOM blocks: weights + optimizer state alone not fitting. The rest
    # involves estimated activations.
    if not mem.static_fits:
        return Check("memory plan", "FAIL", detail, fix, blocking=True), plan
    return Check("memory plan", "WARN", detail, fix), plan


def check_target(cfg: TrainConfig, facts: DeviceFacts) -> Check | None:
    """Whether this machine is the hardware the config (a recipe) names; None if none named."""
    if cfg.target is None:
        return None
    from tunix_sglang.tpu_targets import get_target

    t = get_target(cfg.target)
    here = f"{facts.device_count} x {facts.device_kind} on {facts.process_count} process(es)"
    if (facts.device_kind, facts.device_count) == (t.device_kind, t.chips):
        return Check("target", "OK", f"{t.name}: {here}")
    return Check("target", "WARN", f"the config is for {t.name} ({t.chips} x {t.device_kind} "
                 f"on {t.hosts} host(s)); this machine: {here}",
                 f"tunix-sglang doctor --plan --config ... --target {t.name} plans for it")
