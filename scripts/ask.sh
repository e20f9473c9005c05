#!/usr/bin/env bash
# Answers a question about a video (or image): installs what the build lacks, builds the release
# binary, runs `videollava generate`. Without --model it uses LanguageBind/Video-LLaVA-7B-hf from
# the Hugging Face hub (downloaded once into the hub cache, ~15 GB).
#   scripts/ask.sh --video clip.mp4 --prompt "Why is this video funny?" [--model DIR|HUB_ID] [...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-system-deps.sh
cargo build --release --locked -p videollava-cli
exec target/release/videollava generate "$@"
