"""`tunix-sglang doctor`: the preflight people otherwise do by hand on a TPU VM.

Every check returns a `Check` (OK / WARN / FAIL, what was seen, how to fix it, and whether it
stops a run). Device facts are read in exactly one place, `device_facts()`, which is also the
one seam tests use to present a device kind this machine cannot produce ("TPU v3").
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from tunix_sglang import cluster as cluster_lib
from tunix_sglang.config import ROLLOUT_ENGINES, TrainConfig

Status = Literal["OK", "WARN", "FAIL"]
DEFAULT_LOCKFILE = "/tmp/libtpu_lockfile"
PROJECT_DIST = "tunix-sglang"
# (distribution, what to call it) in the order they are reported.
TRACKED_DISTS = (
    ("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("google-tunix", "Tunix"),
    ("sglang-jax", "sglang-jax"),
)


@dataclasses.dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""
    blocking: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Device facts: the one seam.


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What JAX reports about this process's devices."""

    backend: str | None  # jax.default_backend(); None when JAX could not start
    device_kind: str | None  # devices()[0].device_kind, e.g. "cpu", "TPU v4", "TPU v5 lite"
    device_count: int
    local_device_count: int
    process_count: int
    process_index: int
    memory_bytes: int | None  # per device: TPU bytes_limit, CPU MemAvailable (shared)
    memory_source: str
    error: str | None = None


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
    """Which fixes to the released packages are active (what apply_all reports)."""
    try:
        from tunix_sglang import compat

        active = compat.apply_all()
    except Exception as e:  # a broken fix must be reported, not crash the doctor
        return Check("compat fixes", "FAIL", f"apply_all() raised {type(e).__name__}: {e}",
                     "the installed Tunix / sglang-jax differ from what the fixes expect; "
                     "reinstall the tested versions", blocking=True)
    if not active:
        return Check("compat fixes", "OK", "none needed by the installed packages")
    detail = "; ".join(f"{name}: {why}" for name, why in active.items())
    return Check("compat fixes", "OK", f"{len(active)} active: {detail}")


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
    hosts = cluster_lib.tpu_worker_hosts(env)
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
# The libtpu lockfile.


@dataclasses.dataclass(frozen=True)
class LockHolder:
    pid: int
    command: str
    how: str  # "lockf" (POSIX lock, what libtpu takes), "flock", "open"


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a) or "?"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (native alignment pads it to 32 bytes).
_FLOCK = "hhqqi"


def _posix_lock_pid(path: str) -> int | None:
    """PID holding a POSIX (fcntl/lockf) lock on `path`, asked of the kernel with F_GETLK.

    libtpu locks its lockfile with lockf(3) (it imports lockf, not flock), which is a POSIX
    record lock; F_GETLK names the holder without taking the lock ourselves.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0).ljust(32, b"\0")
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        l_type, _, _, _, pid = struct.unpack_from(_FLOCK, answer)
        return pid if l_type != fcntl.F_UNLCK and pid > 0 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _proc_locks(path: str) -> list[tuple[int, str]]:
    """(pid, kind) of every lock /proc/locks lists on the file's inode (covers flock too)."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    for line in text.splitlines():
        f = line.split()
        # "1: POSIX  ADVISORY  WRITE 1234 00:2e:5678 0 EOF" (blocked waiters have "->")
        if len(f) >= 6 and f[1] != "->" and f[5] == inode and f[4].lstrip("-").isdigit():
            out.append((int(f[4]), f[1].lower()))
    return out


def _open_by(path: str) -> list[int]:
    """PIDs with the file open (via /proc/*/fd links); other users' processes are invisible."""
    target = os.path.realpath(path)
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == target:
                    pids.append(int(proc.name))
                    break
        except OSError:
            continue
    return pids


def lock_holders(path: str = DEFAULT_LOCKFILE) -> list[LockHolder]:
    """Live processes that lock or hold open the libtpu lockfile (this process excluded)."""
    found: dict[int, str] = {}
    pid = _posix_lock_pid(path)
    if pid:
        found[pid] = "lockf"
    for pid, kind in _proc_locks(path):
        if pid > 0:
            found.setdefault(pid, "lockf" if kind == "posix" else kind)
    for pid in _open_by(path):
        found.setdefault(pid, "open")
    me = os.getpid()
    return [LockHolder(p, _command(p), how) for p, how in sorted(found.items())
            if p != me and _alive(p)]


def remove_stale_lockfile(path: str = DEFAULT_LOCKFILE) -> str:
    """Remove the lockfile only if nobody holds it; returns what happened.

    We take the same lockf lock libtpu takes before unlinking, so a process that locks it
    in between makes us refuse instead of pulling the file from under it.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return "already gone"
    except PermissionError:
        return f"refused: no permission to open it (run: sudo rm {path})"
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return "refused: a process holds the lock"
        if lock_holders(path):
            return "refused: a live process has it open"
        os.unlink(path)
        return "removed"
    except PermissionError:
        return f"refused: no permission to remove it (run: sudo rm {path})"
    finally:
        os.close(fd)


def check_tpu_lock(path: str = DEFAULT_LOCKFILE, fix: bool = False,
                   env: Mapping[str, str] | None = None) -> Check:
    env = os.environ if env is None else env
    if not os.path.exists(path):
        return Check("TPU lock", "OK", f"no {path}")
    uses_tpu = not env.get("JAX_PLATFORMS") or "tpu" in env.get("JAX_PLATFORMS", "")
    holders = lock_holders(path)
    if holders:
        who = "; ".join(f"PID {h.pid} ({h.how}): {h.command}" for h in holders)
        detail = f"{path} is held by a live process: {who}"
        if fix:
            detail += "; --fix refused to remove it: a live process holds it"
        pids = " ".join(str(h.pid) for h in holders)
        multi = " (ALLOW_MULTIPLE_LIBTPU_LOAD is set)" if env.get("ALLOW_MULTIPLE_LIBTPU_LOAD") \
            else ""
        return Check("TPU lock", "FAIL", detail + multi,
                     f"stop it if it is a leftover run (kill {pids}), or wait for it to finish",
                     blocking=uses_tpu and not multi)
    if fix:
        outcome = remove_stale_lockfile(path)
        status: Status = "OK" if outcome in ("removed", "already gone") else "WARN"
        return Check("TPU lock", status, f"stale {path} (no live holder): --fix {outcome}",
                     "" if status == "OK" else f"sudo rm {path}")
    writable = os.access(path, os.W_OK)
    detail = f"stale {path}: no live process holds it"
    if not writable:
        detail += " and it is not writable by this user (libtpu then fails to lock it)"
    return Check("TPU lock", "WARN", detail,
                 f"tunix-sglang doctor --fix (or: {'sudo ' if not writable else ''}rm {path})")


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


def default_cache_dir() -> str:
    # Mirrors runner.default_compilation_cache, which `train` applies when nothing is set.
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "tunix-sglang", "jax")


def check_compilation_cache(env: Mapping[str, str] | None = None) -> Check:
    env = os.environ if env is None else env
    chosen = env.get("JAX_COMPILATION_CACHE_DIR")
    if not chosen:
        import jax

        chosen = jax.config.jax_compilation_cache_dir
    if not chosen:
        return Check("compilation cache", "OK", "not set here; `train` uses "
                     f"{default_cache_dir()} (restarts skip compiles)")
    if "://" not in chosen:
        p = Path(chosen).expanduser()
        parent = p if p.exists() else p.parent
        if not os.access(parent, os.W_OK):
            return Check("compilation cache", "WARN", f"{chosen} is not writable",
                         "point JAX_COMPILATION_CACHE_DIR at a writable directory")
    return Check("compilation cache", "OK", f"JAX persistent cache at {chosen}")


# ---------------------------------------------------------------------------------------------
# Memory plan.


def memory_plan_for(cfg: TrainConfig, facts: DeviceFacts):
    """The memory plan for `cfg` on these devices (config.json only, no weights)."""
    from tunix_sglang import memory_plan as mp
    from tunix_sglang.warmstart import embedded_shape_dir

    model_dir = cfg.local_model_dir or str(embedded_shape_dir())
    shape = mp.read_model_shape(model_dir)
    cpu = facts.backend != "tpu" and not (facts.device_kind or "").startswith("TPU")
    return mp.plan_memory(
        shape, mp.PlanInputs.from_config(cfg), facts.memory_bytes or 0,
        num_devices=max(1, facts.device_count), shared_memory=cpu,
        memory_source=facts.memory_source,
    )


def check_memory_plan(cfg: TrainConfig, facts: DeviceFacts) -> tuple[Check, Any]:
    if not facts.memory_bytes:
        return Check("memory plan", "WARN", "device memory unknown; no plan"), None
    try:
        plan = memory_plan_for(cfg, facts)
    except (OSError, KeyError, ValueError) as e:
        return Check("memory plan", "WARN", f"cannot read the model config: {e}",
                     "pass --local-model-dir a directory with config.json"), None
    from tunix_sglang.memory_plan import gib

    head = f"{gib(plan.total)} of {gib(plan.device_memory)} per device"
    if plan.mem_fraction_max is not None:
        head += (f"; safe --sglang-mem-fraction-static <= {plan.mem_fraction_max:.2f}, "
                 f"max_total_tokens {plan.max_total_tokens}")
    if plan.fits:
        return Check("memory plan", "OK", head), plan
    detail = f"{head}: {'; '.join(plan.problems)}"
    fix = "lower one of: " + ", ".join(plan.advice)
    # Only a certain OOM blocks: weights + optimizer state alone not fitting. The rest
    # involves estimated activations.
    if not plan.static_fits:
        return Check("memory plan", "FAIL", detail, fix, blocking=True), plan
    return Check("memory plan", "WARN", detail, fix), plan


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
    plan_check, plan = check_memory_plan(cfg, facts)
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
        lines.append(f"{mark:<5} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != "OK":
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    blocking = [c.name for c in checks if c.blocking]
    lines.append("")
    lines.append(f"blocking: {', '.join(blocking)}" if blocking else "nothing blocks a run")
    return "\n".join(lines)


_PLAN_FLAGS: list[tuple[str, type, str]] = [
    ("--local-model-dir", str, "model directory (config.json is all the plan reads)"),
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
    p.add_argument("--plan", action="store_true", help="print the memory plan in full")
    p.add_argument("--lockfile", default=DEFAULT_LOCKFILE, help=argparse.SUPPRESS)
    defaults = TrainConfig()
    for flag, typ, text in _PLAN_FLAGS:
        default = getattr(defaults, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=typ, default=None, help=f"{text} (default: {default})")


def _cfg_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    for flag, _, _ in _PLAN_FLAGS:
        name = flag[2:].replace("-", "_")
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.validate()
    return cfg


def doctor_main(args: argparse.Namespace) -> int:
    """Run the checks, print them; 1 when something blocks a run, else 0."""
    t0 = time.perf_counter()
    cfg = _cfg_from_args(args)
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
