#!/usr/bin/env bash
# Stop the processes that start.sh started for one STATE dir (by recorded PID only).
#
#   gateway_stack/kannel/stop.sh [STATE_DIR] [component...]   (or SMSFLOW_GATEWAY_STATE)
#
# Components: smsc_sim smsbox bearerbox (default: all, always in that order):
#  - the simulator goes before bearerbox, or bearerbox waits ~30 s on the SMPP unbind (pitfall 1);
#  - the simulator also goes before smsbox: a receipt reaching bearerbox after smsbox is gone
#    is held for the missing smsbox, and bearerbox then takes 10 s to shut down (measured).
# A PID whose process no longer runs our binary (PID reuse) is never signalled.
# Exited children can linger as zombies: state Z counts as dead (pitfall 2).
set -uo pipefail
STATE=${1:-${SMSFLOW_GATEWAY_STATE:-}}
if [ -z "$STATE" ]; then
  echo "usage: $0 STATE_DIR [smsc_sim|smsbox|bearerbox ...]   (or set SMSFLOW_GATEWAY_STATE)" >&2; exit 2
fi
shift || true
RUN=$STATE/run
[ -d "$RUN" ] || exit 0
COMPONENTS=("$@")
[ ${#COMPONENTS[@]} -gt 0 ] || COMPONENTS=(smsc_sim smsbox bearerbox)

alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [[ -n "$st" && "$st" != Z* ]]; }
ours() { # pid name -> the process still runs the program we started under that name
  local args; args=$(ps -o args= -p "$1" 2>/dev/null) || return 1
  case $2 in smsc_sim) [[ $args == *smsc_sim.py* ]] ;; *) [[ $args == *"$2"* ]] ;; esac
}
rc=0
for n in smsc_sim smsbox bearerbox; do  # fixed order, whatever order the arguments came in
  [[ " ${COMPONENTS[*]} " == *" $n "* ]] || continue
  f=$RUN/$n.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && ours "$pid" "$n"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 200); do alive "$pid" || break; sleep 0.05; done   # up to 10 s
    if alive "$pid"; then
      echo "stop.sh: $n ($pid) ignored SIGTERM for 10 s, sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
      for _ in $(seq 1 40); do alive "$pid" || break; sleep 0.05; done
      alive "$pid" && { echo "stop.sh: $n ($pid) still alive" >&2; rc=1; continue; }
    fi
  fi
  rm -f "$f"
done
exit $rc
