"""Every fix to the released Tunix / sglang-jax behaviour lives in this package.

Each fix is gated on a capability check of the installed code (never on a hard-coded version
alone), applied once at import through `apply_all()`, and recorded in `ACTIVE_FIXES` so that
`doctor` can report what is active. Each has a test that fails without it.
"""

from __future__ import annotations

ACTIVE_FIXES: dict[str, str] = {}


def record(name: str, why: str) -> None:
    ACTIVE_FIXES[name] = why


def apply_all() -> dict[str, str]:
    """Apply every fix that the installed packages need; idempotent."""
    from tunix_sglang.compat import sglang_jax_cpu_forward, sglang_jax_fixes, tunix_fixes

    tunix_fixes.apply()
    sglang_jax_fixes.apply()
    sglang_jax_cpu_forward.apply()
    return dict(ACTIVE_FIXES)
