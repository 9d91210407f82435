"""`tunix-sglang doctor`: the preflight people otherwise do by hand on a TPU VM.

Every check returns a `Check` (OK / WARN / FAIL, what was seen, how to fix it, and whether it
stops a run). Device facts are read in exactly one place, `device_facts()`, which is also the
one seam tests use to present a device kind this machine cannot produce ("TPU v3").
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunix_sglang import plan as plan_lib
from tunix_sglang import topology
from tunix_sglang.checks import Check, DeviceFacts
from tunix_sglang.config import DATA_SOURCES, PROMPT_LENGTH, ROLLOUT_ENGINES, TrainConfig
from tunix_sglang.tpu_lock import DEFAULT_LOCKFILE, check_tpu_lock
from tunix_sglang.tpu_targets import TARGETS, get_target
from tunix_sglang.tunix_cluster import compilation_cache_dir

PROJECT_DIST = "tunix-sglang"
# (distribution, what to call it) in the order they are reported.
TRACKED_DISTS = (
    ("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("google-tunix", "Tunix"),
    ("sglang-jax", "sglang-jax"),
)


# ---------------------------------------------------------------------------------------------
# Device facts: the one seam.


def host_memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (what sglang-jax sizes its pool from on CPU)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_facts() -> DeviceFacts:
    """Initialise the JAX backend and read the device facts (the only place that does)."""
    try:
        import jax

        devices = jax.devices()
        d0 = devices[0]
        stats = None
        try:
            stats = d0.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and stats.get("bytes_limit"):
            mem, source = int(stats["bytes_limit"]), "device bytes_limit"
        else:
            mem, source = host_memory_available(), "host MemAvailable"
        return DeviceFacts(
            backend=jax.default_backend(), device_kind=d0.device_kind,
            device_count=len(devices), local_device_count=jax.local_device_count(),
            process_count=jax.process_count(), process_index=jax.process_index(),
            memory_bytes=mem, memory_source=source,
        )
    except Exception as e:  # backend start-up failures come in many types
        return DeviceFacts(None, None, 0, 0, 0, 0, None, "", error=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# Versions and compatibility fixes.


def _requirements() -> tuple[dict[str, Any], str | None]:
    """Pins of the installed tunix-sglang distribution (one source of truth: pyproject)."""
    from packaging.requirements import Requirement

    reqs: dict[str, Any] = {}
    for line in md.requires(PROJECT_DIST) or []:
        r = Requirement(line)
        if r.marker is None:
            reqs[r.name.lower()] = r
    return reqs, md.metadata(PROJECT_DIST).get("Requires-Python")


def install_origin(dist: str) -> str:
    """'release' for an index install; otherwise where it came from (PEP 610 direct_url)."""
    raw = md.distribution(dist).read_text("direct_url.json")
    if not raw:
        return "release"
    info = json.loads(raw)
    url = info.get("url", "")
    if info.get("dir_info", {}).get("editable"):
        return f"editable source install from {url}"
    if "vcs_info" in info:
        return f"source build from {url}@{info['vcs_info'].get('commit_id', '?')[:12]}"
    if "archive_info" in info:
        return f"direct archive {url}"
    return f"source build from {url}"


def check_versions(rollout_engine: str = "sglang_jax") -> list[Check]:
    from packaging.specifiers import SpecifierSet

    checks = []
    try:
        reqs, requires_python = _requirements()
    except md.PackageNotFoundError:
        return [Check("versions", "WARN", f"{PROJECT_DIST} is not installed, so its pins are "
                      "unknown", "pip install -e . (or bash scripts/setup.sh)")]
    py = ".".join(map(str, sys.version_info[:3]))
    ok = requires_python is None or SpecifierSet(requires_python).contains(py)
    checks.append(Check("python", "OK" if ok else "FAIL",
                        f"{py} (tested: {requires_python or 'any'})",
                        "" if ok else f"use Python {requires_python}", blocking=not ok))
    for dist, label in TRACKED_DISTS:
        req = reqs.get(dist)
        tested = str(req.specifier) if req else "not pinned"
        needed = dist != "sglang-jax" or rollout_engine.startswith("sglang_jax")
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            checks.append(Check(
                label, "FAIL" if needed else "WARN", f"not installed (tested: {tested})",
                f"pip install '{dist}{req.specifier if req else ''}'", blocking=needed))
            continue
        origin = install_origin(dist)
        on_list = req is None or req.specifier.contains(version, prereleases=True)
        detail = f"{version} ({origin}; tested: {tested})"
        if on_list and origin == "release":
            checks.append(Check(label, "OK", detail))
        else:
            why = "not the tested version" if not on_list else "not the released package"
            checks.append(Check(label, "WARN", f"{detail}: {why}",
                                f"pip install '{dist}{req.specifier if req else ''}' "
                                "(or accept that this set is untested)"))
    return checks


def check_compat_fixes() -> Check:
    """Every fix of the compat registry, and whether the installed packages needed it."""
    try:
        from tunix_sglang import compat

        fixes = compat.status()
    except Exception as e:  # a broken fix must be reported, not crash the doctor
        return Check("compat fixes", "FAIL", f"apply_all() raised {type(e).__name__}: {e}",
                     "the installed Tunix / sglang-jax differ from what the fixes expect; "
                     "reinstall the tested versions", blocking=True)
    active = sum(applied for _, applied in fixes)
    listed = "\n".join(f"{fix.name}: {fix.why}" + ("" if applied else " (not needed here)")
                       for fix, applied in fixes)
    return Check("compat fixes", "OK", f"{active} of {len(fixes)} active:\n{listed}")


# ---------------------------------------------------------------------------------------------
# Backend, devices, TPU generation.


def tpu_generation(device_kind: str | None) -> int | None:
    """Generation number from a device kind ("TPU v5 lite" -> 5, "TPU7x" -> 7); None if not TPU."""
    if not device_kind or "TPU" not in device_kind:
        return None
    digits = ""
    for ch in device_kind.split("TPU", 1)[1].lstrip(" v"):
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def sglang_parses_kind(device_kind: str) -> bool:
    """Whether sglang-jax 0.0.2's `get_tpu_version` accepts this kind (it asserts the form
    'TPU vN' or 'TPU vN lite' before its paged attention picks block sizes)."""
    kind = device_kind[: -len(" lite")] if device_kind.endswith(" lite") else device_kind
    return kind[:-1] == "TPU v" and kind[-1:].isdigit()


def tpu_hardware_present() -> bool:
    """TPU chips visible to the OS (v4+: /dev/accel*, v5e/v6e also /dev/vfio/N)."""
    if any(Path("/dev").glob("accel*")):
        return True
    return any(p.name.isdigit() for p in Path("/dev/vfio").glob("*"))


def check_backend(facts: DeviceFacts, env: Mapping[str, str] | None = None) -> Check:
    env = os.environ if env is None else env
    if facts.error:
        return Check("backend", "FAIL", f"JAX could not start a backend: {facts.error}",
                     "check JAX_PLATFORMS and that libtpu is installed (pip install "
                     "'jax[tpu]==<pinned>'); see the TPU lock check", blocking=True)
    detail = (f"{facts.backend}: {facts.device_count} x {facts.device_kind!r} "
              f"({facts.local_device_count} local)")
    if facts.backend != "tpu" and tpu_hardware_present() and "cpu" not in env.get(
            "JAX_PLATFORMS", ""):
        return Check("backend", "WARN", f"{detail}, but this machine has TPU chips",
                     "JAX fell back from the TPU: another process may hold it (see TPU lock) "
                     "or libtpu is missing")
    if facts.backend == "cpu":
        return Check("backend", "OK", f"{detail}; CPU runs are supported (slow, for small "
                     "models)")
    return Check("backend", "OK", detail)


def check_processes(facts: DeviceFacts, env: Mapping[str, str] | None = None) -> Check:
    """Multi-host: every worker must run the same command and join one JAX runtime."""
    env = os.environ if env is None else env
    if facts.error:
        return Check("processes", "WARN", "unknown (no backend)")
    detail = (f"process {facts.process_index} of {facts.process_count}; "
              f"{facts.local_device_count} local / {facts.device_count} global devices")
    hosts = topology.tpu_worker_hosts(env)
    if len(hosts) > facts.process_count:
        return Check("processes", "WARN",
                     f"{detail}, but TPU_WORKER_HOSTNAMES lists {len(hosts)} workers",
                     "start the run on every worker (gcloud compute tpus tpu-vm ssh --worker=all)"
                     " and call jax.distributed.initialize() before JAX is used")
    if facts.device_count != facts.local_device_count * facts.process_count:
        return Check("processes", "WARN", f"{detail}: uneven devices per process",
                     "check that every worker sees all its chips")
    return Check("processes", "OK", detail)


def check_tpu_generation(facts: DeviceFacts, rollout_engine: str = "sglang_jax") -> Check:
    kind = facts.device_kind
    gen = tpu_generation(kind)
    if gen is None:
        return Check("TPU generation", "OK", f"not a TPU ({kind or 'no device'}); the sglang-jax "
                     "TPU kernels are not used")
    sglang = rollout_engine.startswith("sglang_jax")
    fix = "use --rollout-engine vanilla (Tunix's sampler runs on any TPU)"
    if gen < 4:
        msg = (f"{kind!r} is v{gen}: sglang-jax's paged attention needs v4 or newer "
               "(NotImplementedError: TPU version must be 4 or higher)")
        if sglang:
            return Check("TPU generation", "FAIL", msg, fix, blocking=True)
        return Check("TPU generation", "WARN", f"{msg}; --rollout-engine {rollout_engine} "
                     "does not use it", "stay on --rollout-engine vanilla here")
    if not sglang_parses_kind(kind):
        msg = (f"{kind!r} is v{gen}, but sglang-jax 0.0.2 only parses kinds 'TPU vN[ lite]' "
               "(AssertionError in get_tpu_version)")
        if sglang:
            return Check("TPU generation", "FAIL", msg, fix, blocking=True)
        return Check("TPU generation", "OK", f"{msg}; not used by --rollout-engine "
                     f"{rollout_engine}")
    return Check("TPU generation", "OK", f"{kind!r} is v{gen}: supported by sglang-jax (v4+)")


# ---------------------------------------------------------------------------------------------
# Pathways, compilation cache.


def check_pathways(env: Mapping[str, str] | None = None) -> Check:
    """Pathways needs JAX_PLATFORMS to name the `proxy` backend and `pathwaysutils`."""
    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS", "")
    wanted = "proxy" in [p.strip() for p in platforms.split(",")]
    if not wanted:
        installed = importlib.util.find_spec("pathwaysutils") is not None
        return Check("Pathways", "OK", f"not in use (JAX_PLATFORMS={platforms!r} has no "
                     f"'proxy'; pathwaysutils {'installed' if installed else 'not installed'})")
    try:
        module = importlib.import_module("pathwaysutils")
    except Exception as e:  # ImportError, or a broken install raising anything
        return Check("Pathways", "FAIL", f"not available: JAX_PLATFORMS={platforms!r} asks "
                     f"for the proxy backend but pathwaysutils does not import "
                     f"({type(e).__name__}: {e})",
                     "pip install pathwaysutils, or unset JAX_PLATFORMS for local devices",
                     blocking=True)
    detail = f"available: JAX_PLATFORMS={platforms!r} and pathwaysutils imports"
    # Tunix asks the same function to decide how it loads safetensors.
    used = getattr(module, "is_pathways_backend_used", None)
    if callable(used):
        try:
            detail += f" (is_pathways_backend_used: {used()})"
        except Exception as e:  # before jax starts this may raise; report, do not fail
            detail += f" (is_pathways_backend_used raised {type(e).__name__})"
    return Check("Pathways", "OK", detail)


def check_compilation_cache(env: Mapping[str, str] | None = None) -> Check:
    env = os.environ if env is None else env
    chosen = env.get("JAX_COMPILATION_CACHE_DIR")
    if not chosen:
        import jax

        chosen = jax.config.jax_compilation_cache_dir
    if not chosen:
        return Check("compilation cache", "OK", "not set here; `train` uses "
                     f"{compilation_cache_dir()} (restarts skip compiles)")
    if "://" not in chosen:
        p = Path(chosen).expanduser()
        parent = p if p.exists() else p.parent
        if not os.access(parent, os.W_OK):
            return Check("compilation cache", "WARN", f"{chosen} is not writable",
                         "point JAX_COMPILATION_CACHE_DIR at a writable directory")
    return Check("compilation cache", "OK", f"JAX persistent cache at {chosen}")


# ---------------------------------------------------------------------------------------------
# Running them.


def _config(cfg: TrainConfig | None, model_dir: str | None, rollout_engine: str | None
            ) -> TrainConfig:
    cfg = dataclasses.replace(cfg) if cfg is not None else TrainConfig()
    if model_dir is not None:
        cfg.local_model_dir = model_dir
    if rollout_engine is not None:
        cfg.rollout_engine = rollout_engine
    return cfg


def run_checks(
    model_dir: str | None = None,
    rollout_engine: str = "sglang_jax",
    *,
    cfg: TrainConfig | None = None,
    lockfile: str = DEFAULT_LOCKFILE,
    fix: bool = False,
    fast: bool = False,
    facts: DeviceFacts | None = None,
) -> list[Check]:
    """Every check, in the order a person would do them. `fast` skips the compat fixes (they
    import Tunix and sglang-jax). `cfg` gives the memory plan's run settings."""
    return _run(model_dir, rollout_engine, cfg=cfg, lockfile=lockfile, fix=fix, fast=fast,
                facts=facts)[0]


def _run(model_dir, rollout_engine, *, cfg, lockfile, fix, fast, facts):
    cfg = _config(cfg, model_dir, rollout_engine)
    # The lock first: initialising JAX on a TPU makes libtpu take the lock in this process.
    checks = [check_tpu_lock(lockfile, fix=fix), check_pathways()]
    if not fast:
        checks += check_versions(cfg.rollout_engine)
    facts = facts or device_facts()
    checks += [check_backend(facts), check_processes(facts),
               check_tpu_generation(facts, cfg.rollout_engine)]
    if not fast:
        checks += [check_compat_fixes(), check_compilation_cache()]
        target = plan_lib.check_target(cfg, facts)
        checks += [target] if target else []
    plan_check, plan = plan_lib.check_memory_plan(cfg, facts)
    checks.append(plan_check)
    return checks, plan, facts


def blocking_problems(cfg: TrainConfig) -> list[Check]:
    """The checks that stop `train`; fast (no model loading, no engine, no Tunix import).

    Call it before JAX touches the devices: on a TPU VM the lock check must see the lockfile
    before this process's own libtpu takes it.
    """
    return [c for c in run_checks(cfg=cfg, rollout_engine=cfg.rollout_engine, fast=True)
            if c.blocking]


def check_before_train(cfg: TrainConfig) -> None:
    """Raise UserError (one line: problem and fix) if a blocking problem would stop `train`."""
    from tunix_sglang.errors import UserError

    problems = blocking_problems(cfg)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more: tunix-sglang doctor)" if len(problems) > 1 else ""
        raise UserError(f"{first.name}: {first.detail}; fix: {first.fix}{more}")


# ---------------------------------------------------------------------------------------------
# Command line.


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = c.status + ("!" if c.blocking else "")
        first, *more = c.detail.splitlines()
        lines.append(f"{mark:<5} {c.name:<{width}}  {first}")
        lines += [f"{'':<5} {'':<{width}}    {line}" for line in more]
        if c.fix and c.status != "OK":
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    blocking = [c.name for c in checks if c.blocking]
    lines.append("")
    lines.append(f"blocking: {', '.join(blocking)}" if blocking else "nothing blocks a run")
    return "\n".join(lines)


_PLAN_FLAGS: list[tuple[str, type, str]] = [
    ("--local-model-dir", str, "model directory (config.json is all the plan reads)"),
    ("--model", str, "Hugging Face model id (ORG/NAME); its config.json from the cache, "
     "the recipes' shipped copy, or the hub"),
    ("--data", str, f"one of {', '.join(DATA_SOURCES)} (sets the default prompt length)"),
    ("--batch-size", int, "prompts per step"),
    ("--num-generations", int, "completions per prompt"),
    ("--max-prompt-length", int, "prompt tokens"),
    ("--max-new-tokens", int, "completion tokens"),
    ("--rollout-engine", str, f"one of {', '.join(ROLLOUT_ENGINES)}"),
    ("--rollout-devices", int, "devices for the rollout engine (0: share all)"),
    ("--sglang-mem-fraction-static", float, "share of device memory for the engine"),
    ("--dtype", str, "float32 or bfloat16"),
    ("--beta", float, "KL coefficient (0: no reference model)"),
]


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `doctor` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser("doctor", help="preflight: versions, devices, TPU lock, memory plan",
                              description=__doc__.splitlines()[0])
    _add_doctor_args(p)
    return p


def _add_doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--fix", action="store_true",
                   help="remove a stale libtpu lockfile (never one a live process holds)")
    p.add_argument("--plan", action="store_true",
                   help="print the plan in full: memory per device, engine settings, device "
                   "split; for the config's target when it names one")
    p.add_argument("--config", help="a `train` YAML config (e.g. recipes/*.yaml); flags "
                   "override it")
    p.add_argument("--target", help="plan for this TPU slice instead of this machine: "
                   f"{', '.join(TARGETS)}")
    p.add_argument("--lockfile", default=DEFAULT_LOCKFILE, help=argparse.SUPPRESS)
    defaults = TrainConfig()
    for flag, typ, text in _PLAN_FLAGS:
        name = flag[2:].replace("-", "_")
        default = getattr(defaults, name)
        if name == "max_prompt_length":
            default = ", ".join(f"{k} {v}" for k, v in PROMPT_LENGTH.items())
        p.add_argument(flag, type=typ, default=None, help=f"{text} (default: {default})")


def _cfg_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config as `train` would build it from the same file and flags."""
    from tunix_sglang.config import build_config

    flags = {f[2:].replace("-", "_") for f, _, _ in _PLAN_FLAGS}
    return build_config(args.config, {k: getattr(args, k, None) for k in flags})


def plan_target(cfg: TrainConfig, target: str, config: str | None, as_json: bool) -> int:
    """`doctor --plan --target T`: the plan on slice T, computed here; 1 when it does not fit."""
    t0 = time.perf_counter()
    tpu = get_target(target)
    facts = plan_lib.target_facts(tpu)
    checks = [check_tpu_generation(facts, cfg.rollout_engine)]
    run = plan_lib.plan_run(cfg, facts)
    largest = plan_lib.largest_fitting(run)
    fits = run.fits and not any(c.blocking for c in checks)
    verdict = "fits" if fits else "does not fit"
    if as_json:
        out = {"config": config, "target": dataclasses.asdict(tpu), **run.to_dict(),
               "verdict": verdict, "fits": fits, "largest_fitting": largest,
               "checks": [c.to_dict() for c in checks],
               "elapsed_sec": round(time.perf_counter() - t0, 3)}
        print(json.dumps(out, indent=2, default=str), flush=True)
    else:
        print(f"plan for {config or 'these flags'} on {tpu.name}: {tpu.chips} x "
              f"{tpu.device_kind}, {tpu.hosts} host(s), {tpu.hbm_gib} GiB HBM per chip")
        print(run.format())
        if largest["batch_size"]:
            print(f"largest that fits: --batch-size {largest['batch_size']} (at "
                  f"--num-generations {largest['num_generations']}), --max-new-tokens "
                  f"{largest['max_new_tokens']} (at this batch)")
        else:
            print("largest that fits: nothing, not even --batch-size 1")
        print(format_table(checks))
        print(f"verdict: {verdict}", flush=True)
    return 0 if fits else 1


def doctor_main(args: argparse.Namespace) -> int:
    """Run the checks, print them; 1 when something blocks a run, else 0. With a target
    (--target, or --plan with a config that names one), plan for that slice instead."""
    t0 = time.perf_counter()
    cfg = _cfg_from_args(args)
    target = args.target or (cfg.target if args.plan else None)
    if target:
        return plan_target(cfg, target, args.config, args.json)
    checks, plan, facts = _run(None, cfg.rollout_engine, cfg=cfg,
                               lockfile=getattr(args, "lockfile", DEFAULT_LOCKFILE),
                               fix=args.fix, fast=False, facts=None)
    blocking = any(c.blocking for c in checks)
    if args.json:
        out = {"checks": [c.to_dict() for c in checks], "blocking": blocking,
               "device_facts": dataclasses.asdict(facts),
               "plan": plan.to_dict() if plan else None,
               "elapsed_sec": round(time.perf_counter() - t0, 3)}
        print(json.dumps(out, indent=2, default=str), flush=True)
    else:
        print(format_table(checks))
        if args.plan and plan is not None:
            print()
            print(plan.format())
        print(f"(doctor took {time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if blocking else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tunix-sglang doctor", description=__doc__.splitlines()[0])
    _add_doctor_args(p)
    args = p.parse_args(argv)
    from tunix_sglang.errors import UserError

    try:
        return doctor_main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
