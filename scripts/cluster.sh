#!/usr/bin/env bash
# smsflow distributed mode on one machine, on loopback (no Docker):
#   a PostgreSQL-backed Prefect server, the deployments of prefect.yaml and the zombie-run automations,
#   3 process workers on the work pool smsflow-pool, a Dask scheduler and 2 Dask workers.
#
#   bash scripts/cluster.sh start     # prints the environment a client needs (eval "$(... env)")
#   bash scripts/cluster.sh env       # export PREFECT_API_URL=... SMSFLOW_MODE=distributed ...
#   bash scripts/cluster.sh status
#   bash scripts/cluster.sh stop
#
# Settings (environment): CLUSTER_DIR (pids, logs, PREFECT_HOME; default data/cluster),
# CLUSTER_PREFECT_PORT (4200), CLUSTER_DASK_PORT (8786), CLUSTER_WORKERS (3), CLUSTER_DASK_WORKERS (2),
# CLUSTER_PREFECT_DB (smsflow_prefect: the Prefect server's database), SMSFLOW_DATABASE_URL (the store;
# default postgresql+psycopg://postgres@127.0.0.1:5432/smsflow), CLUSTER_PG (postgres@127.0.0.1:5432),
# CLUSTER_HEARTBEAT_S (30: PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the flow runs), CLUSTER_WORKER_LIMIT (4 flow
# runs at once per worker; each is a process), CLUSTER_WORKER_QUERY_S (1: how often a worker asks for runs).
# Several hosts: README "Past one machine" (the same commands, one role per host).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PY=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
DIR=${CLUSTER_DIR:-$ROOT/data/cluster}
PPORT=${CLUSTER_PREFECT_PORT:-4200}
DPORT=${CLUSTER_DASK_PORT:-8786}
NWORKERS=${CLUSTER_WORKERS:-3}
NDASK=${CLUSTER_DASK_WORKERS:-2}
PG=${CLUSTER_PG:-postgres@127.0.0.1:5432}
PREFECT_DB=${CLUSTER_PREFECT_DB:-smsflow_prefect}
STORE_URL=${SMSFLOW_DATABASE_URL:-postgresql+psycopg://$PG/smsflow}
HEARTBEAT=${CLUSTER_HEARTBEAT_S:-30}
API=http://127.0.0.1:$PPORT/api
DASK=tcp://127.0.0.1:$DPORT

client_env() {
  cat <<EOF
export PREFECT_API_URL=$API
export SMSFLOW_MODE=distributed
export SMSFLOW_DATABASE_URL=$STORE_URL
export SMSFLOW_DASK_ADDRESS=$DASK
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY=$HEARTBEAT
EOF
}

# one process per role, in its own session; its pid in $DIR/<name>.pid and its output in $DIR/<name>.log
spawn() {
  local name=$1; shift
  setsid "$@" >"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
}

alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

wait_for() {  # wait_for <what> <seconds> <command...>
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "cluster: $what not up after ${secs}s; logs in $DIR" >&2; return 1
}

createdb_if_missing() {  # a database on the PostgreSQL server of CLUSTER_PG
  "$PY" - "$1" "$PG" <<'EOF'
import sys, psycopg
name, pg = sys.argv[1], sys.argv[2]
with psycopg.connect(f"postgresql://{pg}/postgres", autocommit=True) as c:
    if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
        c.execute(f'CREATE DATABASE "{name}"')
EOF
}

start() {
  mkdir -p "$DIR/home"
  bash scripts/services.sh
  createdb_if_missing "$PREFECT_DB"
  case "$STORE_URL" in postgresql*) createdb_if_missing "$(basename "${STORE_URL%%\?*}")";; esac
  export PREFECT_HOME=$DIR/home PREFECT_API_URL=$API DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
  export SMSFLOW_DATABASE_URL=$STORE_URL SMSFLOW_MODE=distributed SMSFLOW_DASK_ADDRESS=$DASK
  export PREFECT_FLOWS_HEARTBEAT_FREQUENCY=$HEARTBEAT PYTHONUNBUFFERED=1
  export PREFECT_WORKER_QUERY_SECONDS=${CLUSTER_WORKER_QUERY_S:-1}  # a shard waits at most this for a free worker
  "$PY" -c "from store.db import get_engine; get_engine()"  # the store, migrated
  if ! alive server; then
    PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$PG/$PREFECT_DB" \
      spawn server "$BIN/prefect" server start --host 127.0.0.1 --port "$PPORT"
  fi
  wait_for "Prefect server ($API)" 90 "$PY" -c "import httpx,sys; sys.exit(httpx.get('$API/health').status_code != 200)"
  "$BIN/prefect" work-pool inspect smsflow-pool >/dev/null 2>&1 \
    || "$BIN/prefect" work-pool create smsflow-pool --type process >/dev/null
  "$BIN/prefect" --no-prompt deploy --all >"$DIR/deploy.log" 2>&1 || { tail -30 "$DIR/deploy.log" >&2; exit 1; }
  "$PY" deployments/automations.py --heartbeat-s "$HEARTBEAT" >/dev/null
  alive dask-scheduler || spawn dask-scheduler "$BIN/dask" scheduler --host 127.0.0.1 --port "$DPORT" \
    --dashboard-address 127.0.0.1:0
  wait_for "Dask scheduler ($DASK)" 60 "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $DPORT), 1)"
  for i in $(seq 1 "$NDASK"); do  # the nanny restarts a worker that dies
    alive "dask-worker-$i" || spawn "dask-worker-$i" "$BIN/dask" worker "$DASK" --nworkers 1 --nthreads 1 \
      --name "smsflow-dask-$i" --host 127.0.0.1 --dashboard-address 127.0.0.1:0 --local-directory "$DIR/dask-$i"
  done
  for i in $(seq 1 "$NWORKERS"); do
    alive "worker-$i" || spawn "worker-$i" "$BIN/prefect" worker start --pool smsflow-pool --name "smsflow-worker-$i" \
      --type process --limit "${CLUSTER_WORKER_LIMIT:-4}"
  done
  wait_for "$NWORKERS Prefect workers" 60 "$PY" -c "
import httpx, sys
r = httpx.post('$API/work_pools/smsflow-pool/workers/filter', json={})
sys.exit(sum(w['status'] == 'ONLINE' for w in r.json()) < $NWORKERS)"
  echo "cluster up: Prefect $API (UI http://127.0.0.1:$PPORT), Dask $DASK, $NWORKERS workers, $NDASK Dask workers; logs in $DIR" >&2
  client_env
}

descendants() {  # every process below $1 (flow runs start in their own sessions, not in ours)
  local c
  for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done
}

stop() {
  local any=0 kids=""
  for f in "$DIR"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kids="$kids $(descendants "$pid" | tr '\n' ' ')"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      any=1
    fi
  done
  [ "$any" = 1 ] && sleep 3
  for f in "$DIR"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
  done
  for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
  echo "cluster stopped" >&2
}

status() {
  for f in "$DIR"/*.pid; do
    [ -e "$f" ] || { echo "cluster: not started" >&2; return 0; }
    name=$(basename "$f" .pid)
    if alive "$name"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: dead"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) client_env ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
