"""`tunix-sglang doctor` on this machine, with a real lock-holding child process, a real
Pathways module on sys.path, and the device-kind seam for TPU generations CPU cannot show."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tunix_sglang import doctor, tpu_lock
from tunix_sglang import plan as plan_lib
from tunix_sglang.config import TrainConfig
from tunix_sglang.errors import UserError


@pytest.fixture(scope="module")
def facts() -> doctor.DeviceFacts:
    return doctor.device_facts()


@pytest.fixture
def no_lockfile(tmp_path) -> str:
    return str(tmp_path / "libtpu_lockfile")


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_this_cpu_machine_is_ok(facts, no_lockfile, cache_home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    checks = by_name(doctor.run_checks(rollout_engine="sglang_jax", lockfile=no_lockfile))
    assert facts.backend == "cpu" and facts.error is None
    assert checks["backend"].status == "OK" and "cpu" in checks["backend"].detail
    assert checks["TPU generation"].status == "OK"
    for label in ("python", "jax", "jaxlib", "flax", "Tunix", "sglang-jax"):
        assert checks[label].status == "OK", checks[label]
    assert checks["compat fixes"].status == "OK"
    assert checks["memory plan"].status == "OK"
    assert not [c for c in checks.values() if c.blocking]
    # Every fix of the compat registry is listed one a line, under the check's row.
    from tunix_sglang import compat

    active = compat.apply_all()
    table = doctor.format_table(list(checks.values())).splitlines()
    row = next(i for i, line in enumerate(table) if "compat fixes" in line)
    assert table[row].endswith(f"{len(active)} of {len(compat.FIXES)} active:")
    listed = table[row + 1: row + 1 + len(compat.FIXES)]
    assert [line.split(":")[0].strip() for line in listed] == [f.name for f in compat.FIXES]
    assert max(len(line) for line in table) < 200


@pytest.mark.parametrize(
    "kind, engine, status, blocking",
    [
        ("TPU v3", "sglang_jax", "FAIL", True),
        ("TPU v3", "sglang_jax_remote", "FAIL", True),
        ("TPU v3", "vanilla", "WARN", False),
        ("TPU v2", "vanilla", "WARN", False),
        ("TPU v4", "sglang_jax", "OK", False),
        ("TPU v5 lite", "sglang_jax", "OK", False),
        ("TPU v6 lite", "sglang_jax", "OK", False),
    ],
)
def test_tpu_generation_verdicts(facts, kind, engine, status, blocking):
    injected = dataclasses.replace(facts, device_kind=kind)  # the only fake: the device kind
    check = doctor.check_tpu_generation(injected, engine)
    assert (check.status, check.blocking) == (status, blocking), check
    if status != "OK":
        assert "--rollout-engine vanilla" in check.fix or "vanilla" in check.fix


def test_tpu_generation_parsing():
    assert doctor.tpu_generation("TPU v5 lite") == 5
    assert doctor.tpu_generation("TPU v5p") == 5
    assert doctor.tpu_generation("TPU7x") == 7
    assert doctor.tpu_generation("cpu") is None
    assert doctor.sglang_parses_kind("TPU v6 lite") and not doctor.sglang_parses_kind("TPU7x")


HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what libtpu does with its lockfile
    print("locked", flush=True)
    time.sleep(120)
""")


def test_lockfile_held_then_stale(tmp_path):
    lock = str(tmp_path / "libtpu_lockfile")
    child = subprocess.Popen([sys.executable, "-c", HOLDER, lock], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        held = tpu_lock.check_tpu_lock(lock, env={})
        assert held.status == "FAIL" and held.blocking
        assert f"PID {child.pid}" in held.detail and "libtpu_lockfile" in held.detail
        assert "import fcntl" in held.detail  # the holder's command line
        refused = tpu_lock.check_tpu_lock(lock, fix=True, env={})
        assert refused.status == "FAIL" and "refused" in refused.detail
        assert os.path.exists(lock)
        # JAX_PLATFORMS=cpu: the TPU is held, but this run does not need it.
        assert not tpu_lock.check_tpu_lock(lock, env={"JAX_PLATFORMS": "cpu"}).blocking
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    stale = tpu_lock.check_tpu_lock(lock, env={})
    assert stale.status == "WARN" and "stale" in stale.detail and not stale.blocking
    fixed = tpu_lock.check_tpu_lock(lock, fix=True, env={})
    assert fixed.status == "OK" and "removed" in fixed.detail
    assert not os.path.exists(lock)
    assert tpu_lock.check_tpu_lock(lock, env={}).status == "OK"


def test_stale_lockfile_is_removed_under_our_lock(tmp_path, monkeypatch):
    """--fix unlinks while holding the lockf lock libtpu takes, so a libtpu starting at that
    moment is refused rather than losing its file. (The holder check's F_GETLK probe opened
    and closed the file, which silently dropped that lock.)"""
    lock = tmp_path / "libtpu_lockfile"
    lock.write_text("")
    try_lock = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
                "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "    print('got it')\nexcept OSError:\n    print('held')\n")
    seen = []
    real_unlink = os.unlink

    def unlink(path, *a, **kw):  # what another process finds at the moment of the unlink
        seen.append(subprocess.run([sys.executable, "-c", try_lock, path], capture_output=True,
                                   text=True, timeout=60).stdout.strip())
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    assert tpu_lock.remove_stale_lockfile(str(lock)) == "removed"
    assert seen == ["held"] and not lock.exists()


def test_pathways_missing_module(monkeypatch):
    monkeypatch.delitem(sys.modules, "pathwaysutils", raising=False)
    check = doctor.check_pathways({"JAX_PLATFORMS": "proxy"})
    assert check.status == "FAIL" and check.blocking
    assert "pathwaysutils" in check.detail and "not available" in check.detail
    assert doctor.check_pathways({"JAX_PLATFORMS": "cpu"}).status == "OK"


def test_pathways_available_with_module(tmp_path, monkeypatch):
    pkg = tmp_path / "pathwaysutils"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "def initialize():\n    pass\n\n"
        "def is_pathways_backend_used():\n    return False\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("pathwaysutils", None)
    try:
        check = doctor.check_pathways({"JAX_PLATFORMS": "proxy,cpu"})
    finally:
        sys.modules.pop("pathwaysutils", None)  # Tunix imports it too: leave no trace
    assert check.status == "OK" and check.detail.startswith("available"), check


def test_compilation_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    check = doctor.check_compilation_cache({})
    assert check.status == "OK"
    chosen = doctor.check_compilation_cache({"JAX_COMPILATION_CACHE_DIR": str(tmp_path)})
    assert chosen.status == "OK" and str(tmp_path) in chosen.detail


def parse_doctor(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    doctor.add_doctor_parser(sub)
    return parser.parse_args(["doctor", *argv])


def test_json_and_exit_code_when_blocking(facts, monkeypatch, capsys, tmp_path, cache_home):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    lock = ["--lockfile", str(tmp_path / "none")]
    assert doctor.doctor_main(parse_doctor(["--json", *lock])) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["blocking"] is False
    names = {c["name"] for c in ok["checks"]}
    assert {"TPU lock", "Pathways", "python", "jax", "jaxlib", "flax", "Tunix", "sglang-jax",
            "backend", "processes", "TPU generation", "compat fixes", "compilation cache",
            "memory plan"} <= names
    assert ok["plan"]["fits"] and ok["device_facts"]["backend"] == "cpu"

    monkeypatch.setattr(doctor, "device_facts",
                        lambda: dataclasses.replace(facts, device_kind="TPU v3"))
    rc = doctor.doctor_main(parse_doctor(["--json", "--rollout-engine", "sglang_jax", *lock]))
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["blocking"] is True
    gen = next(c for c in out["checks"] if c["name"] == "TPU generation")
    assert gen["status"] == "FAIL" and gen["blocking"]

    # vanilla: a WARN, no block
    assert doctor.doctor_main(parse_doctor(["--rollout-engine", "vanilla", *lock])) == 0
    table = capsys.readouterr().out
    assert "WARN  TPU generation" in table and "fix:" in table


def test_blocking_problems_for_train(facts, monkeypatch, cache_home):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    assert doctor.blocking_problems(TrainConfig(rollout_engine="sglang_jax")) == []
    monkeypatch.setattr(doctor, "device_facts",
                        lambda: dataclasses.replace(facts, device_kind="TPU v3"))
    problems = doctor.blocking_problems(TrainConfig(rollout_engine="sglang_jax"))
    assert [c.name for c in problems] == ["TPU generation"]
    assert doctor.blocking_problems(TrainConfig(rollout_engine="vanilla")) == []
    with pytest.raises(UserError, match="TPU generation: 'TPU v3' is v3.*fix: use --rollout"):
        doctor.check_before_train(TrainConfig(rollout_engine="sglang_jax"))


def test_memory_plan_that_cannot_fit_blocks(facts, monkeypatch, cache_home):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    small = dataclasses.replace(facts, memory_bytes=1 << 20)  # 1 MiB: weights cannot fit
    check, plan = plan_lib.check_memory_plan(TrainConfig(), small)
    assert check.status == "FAIL" and check.blocking and not plan.memory.static_fits
    assert "lower" in check.fix


def test_doctor_subprocess_finishes(cli_env):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunix_sglang.doctor", "--json", "--plan"],
                          capture_output=True, text=True, timeout=120, env=cli_env)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["blocking"] is False and out["plan"] is not None
    print(f"doctor subprocess wall time: {elapsed:.1f} s (in-process {out['elapsed_sec']} s)")
