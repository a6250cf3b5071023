#!/usr/bin/env bash
# THE test command (README): sets everything up and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
# Kannel (bearerbox/smsbox) for the real-gateway tests; the tests start and stop their own stack
bash gateway_stack/install.sh
# Chromium for the browser test of the HTML report
bash scripts/browser.sh
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
