#!/usr/bin/env bash
# Start the local Kannel stack on loopback: SMSC simulator, then bearerbox, then smsbox.
#
#   gateway_stack/kannel/start.sh [STATE_DIR]        (or SMSFLOW_GATEWAY_STATE=/tmp/x)
#
# Everything the stack writes goes under STATE_DIR: logs/ (box logs, simulator log),
# run/ (rendered kannel.conf, *.pid, stack.env, Kannel's message store) and
# sim_submits.jsonl (one JSON line per submit_sm the simulator received).
# Idempotent: components whose recorded PID is alive are left running, so after
# `stop.sh STATE smsbox` a second start.sh brings just smsbox back.
# Ready means: simulator answering /stats, SMSC link 'online' in bearerbox status,
# smsbox connected and its sendsms port answering. On failure everything of this
# STATE is stopped again (stop.sh) and the exit code is non-zero.
#
# Settings (environment, defaults in brackets):
#   KANNEL_ADMIN_PORT [13000] KANNEL_SMSBOX_PORT [13001] KANNEL_SENDSMS_PORT [13013]
#   SIM_SMPP_PORT [2775] SIM_CTL_PORT [2776] SIM_DLR_DELAY [0.2]
#   KANNEL_SENDSMS_USER [smsflow] KANNEL_SENDSMS_PASSWORD [smsflow-local]
#   KANNEL_ADMIN_PASSWORD [adminpw] KANNEL_STATUS_PASSWORD [statuspw]
#   KANNEL_MO_URL [http://127.0.0.1:8787/inbound/kannel?from=%p&to=%P&text=%a&id=%I&smsc=%i&coding=%c&charset=%C]
#   SMSFLOW_GATEWAY_PYTHON [<repo>/.venv/bin/python, else python3] (needs smpp34==1.5.0)
#   KANNEL_BIN_DIR [/usr/sbin]  SMSFLOW_GATEWAY_START_TIMEOUT [30] seconds per step
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=${1:-${SMSFLOW_GATEWAY_STATE:-}}
if [ -z "$STATE" ]; then
  echo "usage: $0 STATE_DIR   (or set SMSFLOW_GATEWAY_STATE)" >&2; exit 2
fi
mkdir -p "$STATE/logs" "$STATE/run"   # Kannel does not create its log folder (pitfall 8)
STATE=$(cd "$STATE" && pwd)
RUN=$STATE/run

ADMIN_PORT=${KANNEL_ADMIN_PORT:-13000}
SMSBOX_PORT=${KANNEL_SMSBOX_PORT:-13001}
SENDSMS_PORT=${KANNEL_SENDSMS_PORT:-13013}
SMPP_PORT=${SIM_SMPP_PORT:-2775}
CTL_PORT=${SIM_CTL_PORT:-2776}
SENDSMS_USER=${KANNEL_SENDSMS_USER:-smsflow}
SENDSMS_PASSWORD=${KANNEL_SENDSMS_PASSWORD:-smsflow-local}
ADMIN_PASSWORD=${KANNEL_ADMIN_PASSWORD:-adminpw}
STATUS_PASSWORD=${KANNEL_STATUS_PASSWORD:-statuspw}
SMSC_ID=${KANNEL_SMSC_ID:-sim}
MO_URL=${KANNEL_MO_URL:-"http://127.0.0.1:8787/inbound/kannel?from=%p&to=%P&text=%a&id=%I&smsc=%i&coding=%c&charset=%C"}
TIMEOUT=${SMSFLOW_GATEWAY_START_TIMEOUT:-30}
BIN=${KANNEL_BIN_DIR:-/usr/sbin}
if [ -n "${SMSFLOW_GATEWAY_PYTHON:-}" ]; then PY=$SMSFLOW_GATEWAY_PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=$(command -v python3); fi

for b in bearerbox smsbox; do
  [ -x "$BIN/$b" ] || { echo "start.sh: $BIN/$b not found: run gateway_stack/install.sh" >&2; exit 3; }
done
command -v curl >/dev/null || { echo "start.sh: curl not found: run gateway_stack/install.sh" >&2; exit 3; }
command -v ps >/dev/null || { echo "start.sh: ps not found (procps): run gateway_stack/install.sh" >&2; exit 3; }
"$PY" -c "import smpp34" 2>/dev/null || { echo "start.sh: $PY cannot import smpp34 (pip install smpp34==1.5.0)" >&2; exit 3; }

# Render the template; escape the sed replacement (\ & and the # delimiter).
esc() { printf '%s' "$1" | sed -e 's/[\\&#]/\\&/g'; }
sed -e "s#@STATE@#$(esc "$STATE")#g" \
    -e "s#@ADMIN_PORT@#$ADMIN_PORT#g" -e "s#@SMSBOX_PORT@#$SMSBOX_PORT#g" \
    -e "s#@SENDSMS_PORT@#$SENDSMS_PORT#g" -e "s#@SMPP_PORT@#$SMPP_PORT#g" \
    -e "s#@ADMIN_PASSWORD@#$(esc "$ADMIN_PASSWORD")#g" -e "s#@STATUS_PASSWORD@#$(esc "$STATUS_PASSWORD")#g" \
    -e "s#@SENDSMS_USERNAME@#$(esc "$SENDSMS_USER")#g" -e "s#@SENDSMS_PASSWORD@#$(esc "$SENDSMS_PASSWORD")#g" \
    -e "s#@SMPP_USERNAME@#kannel#g" -e "s#@SMPP_PASSWORD@#secret#g" -e "s#@SMSC_ID@#$(esc "$SMSC_ID")#g" \
    -e "s#@MO_URL@#$(esc "$MO_URL")#g" \
    "$HERE/kannel.conf" > "$RUN/kannel.conf.tmp"
if grep -q '@[A-Z_]*@' "$RUN/kannel.conf.tmp"; then
  echo "start.sh: unrendered placeholder in kannel.conf: $(grep -o '@[A-Z_]*@' "$RUN/kannel.conf.tmp" | head -1)" >&2; exit 3
fi
chmod 600 "$RUN/kannel.conf.tmp"; mv "$RUN/kannel.conf.tmp" "$RUN/kannel.conf"
# what the stack listens on, for clients and tests (sourceable)
cat > "$RUN/stack.env" <<EOF
KANNEL_ADMIN_PORT=$ADMIN_PORT
KANNEL_SMSBOX_PORT=$SMSBOX_PORT
KANNEL_SENDSMS_PORT=$SENDSMS_PORT
SIM_SMPP_PORT=$SMPP_PORT
SIM_CTL_PORT=$CTL_PORT
SENDSMS_URL=http://127.0.0.1:$SENDSMS_PORT/cgi-bin/sendsms
SIM_LOG=$STATE/sim_submits.jsonl
EOF

alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [[ -n "$st" && "$st" != Z* ]]; }  # zombie = dead
running() { [ -f "$RUN/$1.pid" ] && alive "$(cat "$RUN/$1.pid")"; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

on_error() {
  local rc=$?
  echo "start.sh: failed (exit $rc); last log lines:" >&2
  for f in "$STATE"/logs/*.out "$STATE"/logs/bearerbox.log "$STATE"/logs/smsbox.log; do
    [ -f "$f" ] && { echo "--- $f" >&2; tail -n 8 "$f" >&2; }
  done
  "$HERE/stop.sh" "$STATE" >&2 || true
  exit "$rc"
}
trap on_error ERR

launch() { # name cmd...
  local name=$1; shift
  nohup "$@" >> "$STATE/logs/$name.out" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
  STARTED+=("$name")
}
wait_for() { # name description command  -- bounded; fails at once if the process died
  local name=$1 desc=$2 cmd=$3 i
  for ((i = 0; i < TIMEOUT * 20; i++)); do
    if eval "$cmd" >/dev/null 2>&1; then return 0; fi
    if ! running "$name"; then echo "start.sh: $name exited while waiting for $desc" >&2; return 1; fi
    sleep 0.05
  done
  echo "start.sh: timeout (${TIMEOUT}s) waiting for $desc" >&2; return 1
}

STATUS_URL="http://127.0.0.1:$ADMIN_PORT/status.txt?password=$STATUS_PASSWORD"
t0=$(date +%s%N)
STARTED=()
# every port of a component about to start must be free, checked before anything starts:
# otherwise a readiness probe would be answered by someone else's process
busy=()
check_free() { local p; for p in "${@:2}"; do if port_busy "$p"; then busy+=("$p ($1)"); fi; done; }
running smsc_sim || check_free simulator "$SMPP_PORT" "$CTL_PORT"
running bearerbox || check_free bearerbox "$ADMIN_PORT" "$SMSBOX_PORT"
running smsbox || check_free smsbox "$SENDSMS_PORT"
if [ ${#busy[@]} -gt 0 ]; then
  trap - ERR
  echo "start.sh: port(s) already in use on 127.0.0.1: ${busy[*]}" >&2; exit 4
fi
[ -f "$STATE/sim_submits.jsonl" ] || : > "$STATE/sim_submits.jsonl"

if ! running smsc_sim; then
  SIM_SMPP_PORT=$SMPP_PORT SIM_CTL_PORT=$CTL_PORT SIM_LOG=$STATE/sim_submits.jsonl \
    launch smsc_sim "$PY" -u "$HERE/smsc_sim.py"
fi
wait_for smsc_sim "simulator" "curl -sf --max-time 1 http://127.0.0.1:$CTL_PORT/stats"

if ! running bearerbox; then
  launch bearerbox "$BIN/bearerbox" -v 1 "$RUN/kannel.conf"
fi
wait_for bearerbox "bearerbox admin" "curl -sf --max-time 1 '$STATUS_URL'"

if ! running smsbox; then
  launch smsbox "$BIN/smsbox" -v 1 "$RUN/kannel.conf"
fi
# SMSC bound ('online'; before that sendsms answers "3: Queued for later delivery", pitfall 7),
# smsbox connected to bearerbox, and smsbox's HTTP port answering
wait_for bearerbox "SMSC link online" "curl -sf --max-time 1 '$STATUS_URL' | grep -q '$SMSC_ID\[.*online'"
wait_for smsbox "smsbox connected" "curl -sf --max-time 1 '$STATUS_URL' | grep -q 'smsbox:(none)'"
wait_for smsbox "smsbox sendsms port" \
  "curl -s --max-time 1 -o /dev/null -w '%{http_code}' 'http://127.0.0.1:$SENDSMS_PORT/cgi-bin/sendsms' | grep -qv 000"
t1=$(date +%s%N)
echo "kannel stack up in $(( (t1 - t0) / 1000000 )) ms (started: ${STARTED[*]:-nothing, all running}; state $STATE)"
