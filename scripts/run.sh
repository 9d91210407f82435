#!/usr/bin/env bash
# Set up .venv if needed, then run `tunix-sglang` (default: train on the embedded tiny model).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
[ $# -gt 0 ] || set -- train
exec "$ROOT/.venv/bin/tunix-sglang" "$@"
