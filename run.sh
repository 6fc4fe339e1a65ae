#!/usr/bin/env bash
# Quick start: set up the venv, convert the bundled SmolLM2-135M-Instruct, serve
# it with `remp serve` on a pool of 4 workers, send a few chat requests with the
# OpenAI client, then ask them again while switching the layout live through
# $SWITCH (default tp3pp1,tp1pp2,tp1pp1), and shut the server down.  Extra
# arguments go to `remp serve`, e.g.
#   ./run.sh --tensor-parallel-size 3
# PORT picks the port (default: a free one); the server log is kept in
# $LOG (default: a temporary file) and printed if the server fails to start.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash scripts/setup.sh
PY=.venv/bin/python

echo "== converting the bundled model (once; about 40 s the first time)"
MODEL_DIR="$("$PY" -c 'from remp.weights.bundled import bundled_model_dir; print(bundled_model_dir())' | tail -n 1)"
echo "model: $MODEL_DIR"

PORT="${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
BASE_URL="http://127.0.0.1:$PORT"
LOG="${LOG:-$(mktemp -t remp-serve.XXXXXX.log)}"

SERVER_PID=""
stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "== stopping the server (pid $SERVER_PID)"
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 40); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.5
        done
    fi
    # The server runs in its own session (setsid), so its process group holds
    # any worker processes it started; make sure none outlive the demo.
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== starting: remp serve $MODEL_DIR --host 127.0.0.1 --port $PORT --worker-pool-size 4 $* (log: $LOG)"
setsid .venv/bin/remp serve "$MODEL_DIR" --host 127.0.0.1 --port "$PORT" --worker-pool-size 4 "$@" >"$LOG" 2>&1 &
SERVER_PID=$!

HEALTH_TIMEOUT_S="${HEALTH_TIMEOUT_S:-300}"
if ! "$PY" - "$BASE_URL/health" "$HEALTH_TIMEOUT_S" "$SERVER_PID" <<'PYEOF'
import os, sys, time, urllib.request

url, timeout, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("server exited before becoming healthy")
    time.sleep(0.5)
sys.exit(f"server not healthy after {timeout:.0f} s")
PYEOF
then
    echo "---- server log ($LOG) ----" >&2
    tail -n 50 "$LOG" >&2
    exit 1
fi
echo "== server is up at $BASE_URL"

"$PY" scripts/demo_client.py --base-url "$BASE_URL/v1" --switch "${SWITCH-tp3pp1,tp1pp2,tp1pp1}"
