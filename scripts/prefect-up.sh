#!/usr/bin/env bash
# One command for a local Prefect set-up: a server on 127.0.0.1, the `gpu` process work pool,
# the deployments of prefect.yaml, and (with --worker) a worker that runs one flow at a time.
#
#   scripts/prefect-up.sh [--worker] [--port 4200]     (make prefect-up runs it)
#
# State lives in .prefect/ (PREFECT_HOME); logs in .prefect/server.log and worker.log.
# Stop everything with scripts/prefect-up.sh --down.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=4200
WORKER=0
DOWN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --worker) WORKER=1 ;;
    --port) PORT="$2"; shift ;;
    --down) DOWN=1 ;;
    *) echo "unknown option $1 (use --worker, --port N, --down)" >&2; exit 2 ;;
  esac
  shift
done
BIN="$(pwd)/.venv/bin"
[ -x "$BIN/prefect" ] && export PATH="$BIN:$PATH"
command -v prefect >/dev/null || { echo "prefect is not installed: run 'make install' first" >&2; exit 1; }
export PREFECT_HOME="$(pwd)/.prefect"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export DEEPNETS_ROOT="$(pwd)"
mkdir -p "$PREFECT_HOME"

if [ "$DOWN" = 1 ]; then
  for name in worker server; do
    if [ -f "$PREFECT_HOME/$name.pid" ]; then
      kill "$(cat "$PREFECT_HOME/$name.pid")" 2>/dev/null || true
      rm -f "$PREFECT_HOME/$name.pid"
    fi
  done
  echo "stopped"
  exit 0
fi

healthy() {
  python -c "import sys, urllib.request as u; sys.exit(u.urlopen(sys.argv[1], timeout=2).status != 200)" \
    "$PREFECT_API_URL/health" 2>/dev/null
}
if ! healthy; then
  PREFECT_SERVER_ANALYTICS_ENABLED=false nohup prefect server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
  echo $! >"$PREFECT_HOME/server.pid"
  for _ in $(seq 120); do
    healthy && break
    sleep 1
  done
  healthy || {
    echo "the Prefect server did not start; see $PREFECT_HOME/server.log" >&2; exit 1; }
fi
echo "server: $PREFECT_API_URL (UI at http://127.0.0.1:${PORT})"

prefect work-pool inspect gpu >/dev/null 2>&1 || prefect work-pool create gpu --type process
prefect --no-prompt deploy --all
python -m flows.setup   # marks runs whose worker died as Crashed (heartbeats stop)
if [ "$WORKER" = 1 ]; then
  # --limit 1: one flow run (so one training) at a time on this worker's GPU
  nohup prefect worker start --pool gpu --limit 1 >"$PREFECT_HOME/worker.log" 2>&1 &
  echo $! >"$PREFECT_HOME/worker.pid"
  echo "worker started (log: $PREFECT_HOME/worker.log)"
fi
cat <<MSG

Next:
  export PREFECT_API_URL=$PREFECT_API_URL
  prefect worker start --pool gpu --limit 1        # on each GPU machine, in its checkout
  prefect deployment run deepnets-train/train-on-demand --param model=resnet56_v1
  prefect deployment run deepnets-pipeline/reproduce-weekly
MSG
