#!/usr/bin/env bash
# Regenerates every committed fixture. Run from anywhere, with the reference venv's python:
#   PYTHON=/path/to/venv/bin/python scripts/reference/make_all.sh [SHARED_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"
shared="${1:-$root/../shared}"
fx="$root/crates/videollava/tests/fixtures"
cd "$here"
"$py" processor_fixtures.py --out "$fx" --shared "$shared"
"$py" image_processor_fixtures.py --out "$fx/image_processor"
"$py" image_decode_fixtures.py --out "$fx/images"
"$py" video_fixtures.py --out "$fx/videos" --shared "$shared"
"$py" chat_fixtures.py --out "$fx/chat"
"$py" model_fixtures.py --out "$fx"
"$py" shared_media_fixtures.py --out "$fx" --shared "$shared"
"$py" bf16_fixtures.py --out "$fx"
