#!/usr/bin/env bash
# Runs every attack of attack.py against a fresh `videollava serve` each (tiny checkpoint,
# defaults), under an 8 GB address-space limit so that a memory bomb cannot take the machine
# down. Usage: run_attacks.sh BINARY [attack ...]   (prints one JSON line per attack)
set -u
BIN=$1; shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MODEL=$ROOT/crates/videollava/tests/fixtures/checkpoints/model-llama
ALLOWED=$(mktemp -d /tmp/hostile-allowed.XXXX)
cp "$ROOT/crates/videollava/tests/fixtures/media/clip.mp4" "$ALLOWED/secret.mp4"
ATTACKS=${*:-y4m_2000000x1_frame png16_rgba_bomb_x4 hls_playlist_local_abs hls_playlist_local_plain ffconcat_local thin_png_16384x1_x16 y4m_50000_frames_no_count y4m_50000_frames_1000fps y4m_fake_duration_2x1h stop_strings_16x1MB}
for a in $ATTACKS; do
  PORT=$((20000 + RANDOM % 20000))
  LOG=$(mktemp /tmp/hostile-log.XXXX)
  prlimit --as=8000000000 "$BIN" serve --model "$MODEL" --port "$PORT" --allowed-media-dir "$ALLOWED" >"$LOG" 2>&1 &
  PID=$!
  for _ in $(seq 1 120); do grep -q "listening on" "$LOG" && break; sleep 0.5; done
  python3 "$ROOT/scripts/hostile/attack.py" "http://127.0.0.1:$PORT" "$PID" "$ALLOWED" "$a"
  if ! kill -0 "$PID" 2>/dev/null; then echo "{\"attack\": \"$a\", \"server\": \"died: $(tail -c 300 "$LOG" | tr '\n"' ' _')\"}"; fi
  kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null
  rm -f "$LOG"
done
rm -rf "$ALLOWED"
