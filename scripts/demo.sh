#!/usr/bin/env bash
# THE demo command (README): sets up and runs the demo campaign on the embedded defaults
# (SQLite store, sandbox gateway, a temporary local Prefect API). Extra args go to `smsflow demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/smsflow demo "$@"
