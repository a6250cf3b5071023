#!/usr/bin/env bash
# Install the system packages of the local Kannel test stack (Debian/Ubuntu), idempotent:
# does nothing when bearerbox, smsbox, curl and ps are already there.
#   kannel  -> /usr/sbin/bearerbox, /usr/sbin/smsbox
#   curl    -> readiness probes in gateway_stack/kannel/start.sh
#   procps  -> ps, used by stop.sh to tell live processes from zombies
# The Python side (smpp34==1.5.0 for the SMSC simulator) comes from requirements.lock.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have bearerbox && have smsbox && have curl && have ps; then
  echo "kannel stack packages already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install.sh: need root (or passwordless sudo) to apt-get install kannel curl procps" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends kannel curl procps
# Debian's kannel package ships an init script; we never use the system service.
if [ -x /usr/sbin/bearerbox ]; then echo "installed: $(/usr/sbin/bearerbox --version 2>&1 | head -1 || true)"; fi
