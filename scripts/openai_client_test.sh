#!/usr/bin/env bash
# Runs scripts/openai_client_test.py (the official `openai` Python client) against
# `videollava serve` with the tiny checkpoint.
#
#   scripts/openai_client_test.sh                # builds target/release/videollava if missing
#   VENV=/path/to/venv PORT=18080 scripts/openai_client_test.sh
#   VIDEOLLAVA_BIN=target/debug/videollava scripts/openai_client_test.sh   # another build of the CLI
#   SERVER_CMD="cargo run -p videollava-server --example serve_tiny --" scripts/openai_client_test.sh
#     (SERVER_CMD is run as `$SERVER_CMD MODEL_DIR PORT`)
#
# The venv (default .venv-openai next to the repository, never inside it) gets `openai` installed
# when it lacks it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PORT="${PORT:-18080}"
MODEL="${MODEL:-crates/videollava/tests/fixtures/checkpoints/model-llama}"
VENV="${VENV:-$ROOT/../.venv-openai}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet openai
fi

if [ -n "${SERVER_CMD:-}" ]; then
  # shellcheck disable=SC2086
  $SERVER_CMD "$MODEL" "$PORT" &
else
  BIN="${VIDEOLLAVA_BIN:-target/release/videollava}"
  if [ ! -x "$BIN" ]; then
    cargo build --release -p videollava-cli
  fi
  "$BIN" serve --model "$MODEL" --port "$PORT" &
fi
SERVER_PID=$!
cleanup() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}
trap cleanup EXIT

for _ in $(seq 1 600); do
  if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "the server exited" >&2; exit 1; fi
  sleep 0.5
done
"$VENV/bin/python" scripts/openai_client_test.py --base-url "http://127.0.0.1:$PORT/v1"
