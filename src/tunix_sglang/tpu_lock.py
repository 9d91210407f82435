"""The libtpu lockfile: who holds /tmp/libtpu_lockfile, and removing a stale one safely.

libtpu takes a POSIX lock on this file when a process opens the TPU; a process that died
without cleaning up leaves the file behind, and the next run fails to open the TPU.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from tunix_sglang.checks import Check, Status

DEFAULT_LOCKFILE = "/tmp/libtpu_lockfile"


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


def lock_holders(path: str = DEFAULT_LOCKFILE, probe: bool = True) -> list[LockHolder]:
    """Live processes that lock or hold open the libtpu lockfile (this process excluded).

    `probe=False` skips the F_GETLK probe, which opens and closes the file: closing any
    descriptor of a file drops every POSIX lock this process holds on it.
    """
    found: dict[int, str] = {}
    pid = _posix_lock_pid(path) if probe else None
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
        if lock_holders(path, probe=False):  # keeps our lock (see lock_holders)
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
