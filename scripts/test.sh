#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (real Tunix, real sglang-jax, on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# The report test renders report.html in headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test: installing chromium for the report test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "test: chromium could not be installed; the report screenshot test will skip" >&2
fi
export JAX_PLATFORMS=cpu
"$ROOT/.venv/bin/ruff" check src tests bench
exec "$ROOT/.venv/bin/python" -m pytest -q --durations=30 "$@"
