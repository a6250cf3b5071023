#!/usr/bin/env bash
# Debian's Chromium for the report's browser test (tests/e2e/test_report_browser.py); only installs when missing.
set -euo pipefail
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
if ! command -v chromium >/dev/null; then
  echo "installing chromium (apt)" >&2
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
chromium --version >&2
