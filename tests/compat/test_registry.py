"""The compat registry: every fix decided once, all needed by the pinned releases, each with
its test here."""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tunix_sglang import compat  # noqa: E402


def test_every_fix_needed_by_the_pinned_releases_and_applied_once():
    active = compat.apply_all()
    assert set(active) == {f.name for f in compat.FIXES}  # pinned Tunix 0.1.7, sglang-jax 0.0.2
    assert len({f.name for f in compat.FIXES}) == len(compat.FIXES)
    decided = dict(compat._DECIDED)
    assert compat.apply_all() == active and compat._DECIDED == decided
    assert all(applied for _, applied in compat.status())


def test_every_fix_has_a_test_of_its_own():
    """`test_<fix>` in tests/compat/ for every registry entry (the test runs the released
    original and shows it wrong)."""
    tests = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        tests |= set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.M))
    for fix in compat.FIXES:
        short = fix.name.split(".")[-1]
        if fix.name.endswith("rope_theta"):
            short = "rope_theta"
        assert any(t.startswith(f"test_{short}") for t in tests), fix.name
