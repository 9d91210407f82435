#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (real Tunix, real sglang-jax, on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
"$ROOT/.venv/bin/ruff" check src tests bench
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
