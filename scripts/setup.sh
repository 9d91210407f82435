#!/usr/bin/env bash
# Create .venv in the repo root if missing (or stale) and install the pinned, tested set.
# Sourced by run.sh and test.sh; safe to run on its own.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
  # sglang-jax 0.0.2 needs Python 3.12; pyenv machines have it as 3.12.x.
  for cand in "${PYTHON:-}" python3.12; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | sort -V | tail -1)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0; fi
  fi
  echo "error: Python 3.12 not found (sglang-jax 0.0.2 needs it); install it or set PYTHON=/path/to/python3.12" >&2
  return 1
}

stamp_of() { cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16; }

want=$(stamp_of)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$want" ]; then
  py=$(find_python)
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  echo "setup: installing the pinned dependency set into $VENV (a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -c "$ROOT/constraints.txt" -e "$ROOT[test]" >&2
  echo "$want" > "$VENV/.installed"
fi
