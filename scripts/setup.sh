#!/usr/bin/env bash
# Creates .venv with the locked dependencies and the project (editable). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "smsflow needs Python 3.11+ (found: $("$PY" --version 2>&1))" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    echo "installing python3-venv (Debian splits venv out of python3)" >&2
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv >/dev/null
    rm -rf .venv && "$PY" -m venv .venv
  fi
fi
# Nothing to do when the locked dependencies and the project's metadata did not change since the
# last successful install (the demo then starts at once); pip's output is shown only if it fails.
STAMP=.venv/.smsflow-installed
WANT=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "installing the locked dependencies into .venv (first run: a few minutes)" >&2
  LOG=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --upgrade pip \
         && .venv/bin/python -m pip install -q -c requirements.lock -e ".[test]"; } >"$LOG" 2>&1; then
    grep -v "^WARNING: Location" "$LOG" >&2; rm -f "$LOG"
    echo "dependency installation failed" >&2; exit 1
  fi
  rm -f "$LOG"
  .venv/bin/python -c "import prefect, great_expectations, pandas, sqlalchemy, smsflow" \
    || { echo "dependency installation failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
# The project's own modules byte-compiled (pip did the dependencies'): every command and worker process imports
# them, and a shell with PYTHONDONTWRITEBYTECODE=1 would otherwise compile them again in each (~0.5 s a process).
# Only files changed since the last run are compiled.
.venv/bin/python -m compileall -q -j 0 smsflow store blocks tasks flows service >/dev/null
