#!/usr/bin/env bash
# Starts NVIDIA Triton Inference Server (PyTriton's tritonserver, CPU is fine) on loopback,
# serving an exported repository (`valence export triton -o REPO`), and waits until the model is
# ready. gRPC on PORT (what triton://127.0.0.1:PORT/NAME names), HTTP on PORT+1, metrics on
# PORT+2. Prints the server's process id (stop it with `kill -- -PID`, its process group; it
# shuts down within a few seconds).
#
# usage: scripts/triton-serve.sh REPO PORT [NAME]
set -euo pipefail
REPO="$(realpath "$1")"; PORT="$2"; NAME="${3:-valence}"
cd "$(dirname "$0")/.."
PY="$(bash scripts/triton-venv.sh | tail -1)"
LOG="$REPO/triton-$PORT.log"
setsid "$PY" scripts/triton_serve.py --repo "$REPO" --name "$NAME" --grpc-port "$PORT" \
  --http-port $((PORT + 1)) --metrics-port $((PORT + 2)) >"$LOG" 2>&1 &
PID=$!
for _ in $(seq 1 240); do
  if curl -sf "http://127.0.0.1:$((PORT + 1))/v2/models/$NAME/ready" >/dev/null; then
    echo "$PID"
    exit 0
  fi
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "Triton exited; its log:" >&2; tail -20 "$LOG" >&2; exit 1
  fi
  sleep 0.5
done
echo "Triton did not become ready in 120 s; its log: $LOG" >&2
kill -- -"$PID" 2>/dev/null || true
exit 1
