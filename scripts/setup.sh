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
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# requirements.lock pins every dependency (pip freeze of a verified environment)
.venv/bin/python -m pip install -q -c requirements.lock -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import prefect, great_expectations, pandas, sqlalchemy, smsflow" \
  || { echo "dependency installation failed" >&2; exit 1; }
