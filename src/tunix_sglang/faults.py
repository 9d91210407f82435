"""Fault injection, for the tests and for a user who wants to see the checks fire.

`TUNIX_SGLANG_INJECT_FAULT=NAME[@N][,NAME[@N]...]` switches on named faults in the product
code; `@N` limits a fault to occurrence/step/version N (what N counts is the fault's own
description). Unknown names are a one-line error, so a typo never runs a clean job that the
user believes is faulted.
"""

from __future__ import annotations

import os

from tunix_sglang.errors import UserError

ENV = "TUNIX_SGLANG_INJECT_FAULT"

# name -> what it does (shown in the error for an unknown name; the README lists them).
# For the weight-sync faults N is the weight version the sync was to produce (the trainer's
# optimizer steps: `@3` faults the sync after step 3); the sync proof must stop the run there.
KNOWN: dict[str, str] = {
    "server_engine_death": "rollout server: the engine's scheduler thread dies on the N-th "
                           "generate (of the first launched server's first start only)",
    "skip_sync": "a weight sync writes nothing: the rollout engines keep their old weights",
    "partial_sync": "a weight sync leaves one engine parameter unwritten (the largest it "
                    "changes)",
    "stale_server": "a rollout server acknowledges a push without applying it (with "
                    "--launch-servers: the first launched server's first start only)",
    "host_skip": "multi-host host_local: the last process's engine is not written",
    "stale_forward": "the engine's buffers get the new weights but its forward keeps "
                     "reading the old ones",
}
# Faults meant for one rollout server, not all (see `for_server`).
ONE_SERVER = ("server_engine_death", "stale_server")


def _parse(raw: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, _, at = part.partition("@")
        if name not in KNOWN:
            raise UserError(f"{ENV}={raw!r}: unknown fault {name!r}; known: "
                            f"{', '.join(sorted(KNOWN)) or 'none'}")
        try:
            out[name] = int(at) if at else None
        except ValueError:
            raise UserError(f"{ENV}={raw!r}: {part!r} needs a whole number after '@'") from None
    return out


def active() -> dict[str, int | None]:
    """{fault name: N or None} from the environment (raises UserError for a bad value)."""
    return _parse(os.environ.get(ENV, ""))


def injected(name: str, at: int | None = None) -> bool:
    """True when fault `name` is switched on (and, with `@N` given, `at == N`)."""
    if name not in KNOWN:
        raise KeyError(f"fault {name!r} is not registered in faults.KNOWN")
    faults = active()
    if name not in faults:
        return False
    want = faults[name]
    return want is None or at is None or want == at


def for_server(env: dict[str, str], armed: bool) -> dict[str, str]:
    """The environment for a rollout server the controller launches.

    Servers inherit the controller's environment; a server fault is meant for one server
    once (the first launched one's first start), so every other launch gets the variable
    without the `ONE_SERVER` names.
    """
    if armed or ENV not in env:
        return dict(env)
    kept = [p for p in env[ENV].split(",") if p.strip() and
            p.strip().partition("@")[0] not in ONE_SERVER]
    out = {k: v for k, v in env.items() if k != ENV}
    if kept:
        out[ENV] = ",".join(kept)
    return out
