#!/usr/bin/env bash
# One benchmark sitting, videollava and transformers side by side (docs/benchmarks.md):
# BF16 with an empty page cache (when this user may drop it), BF16 again, --quantize q8_0 and q4k,
# q4k with the 8-bit KV cache,
# then transformers with the checkpoint files cached, and a ratio report per videollava run.
#
#   MODEL=DIR VIDEO=FILE OUT=DIR VENV=<venv with torch+transformers+av> scripts/bench_sitting.sh
#
# Run from the repository root after `cargo build --release`, on an otherwise idle machine.
set -euo pipefail
: "${MODEL:?checkpoint dir}" "${VIDEO:?video file}" "${OUT:?output dir}" "${VENV:?python venv}"
PROMPT=${PROMPT:-"Why is this video funny?"}
THREADS=${THREADS:-2}
TOKENS=${TOKENS:-8}
mkdir -p "$OUT"
run() {
    target/release/videollava bench --model "$MODEL" --video "$VIDEO" --prompt "$PROMPT" \
        --dtype bf16 --threads "$THREADS" --max-new-tokens "$TOKENS" "$@"
}
date -u; git log --oneline -1
sync
if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cold=1; else cold=0; echo "page cache not dropped (needs root)"; fi
run --json "$OUT/rust-bf16-cold.json" > "$OUT/rust-bf16-cold.log" 2>&1
run --json "$OUT/rust-bf16.json" > "$OUT/rust-bf16.log" 2>&1
run --quantize q8_0 --json "$OUT/rust-q8_0.json" > "$OUT/rust-q8_0.log" 2>&1
run --quantize q4k --json "$OUT/rust-q4k.json" > "$OUT/rust-q4k.log" 2>&1
run --quantize q4k --kv-cache q8_0 --json "$OUT/rust-q4k-kvq8.json" > "$OUT/rust-q4k-kvq8.log" 2>&1
cat "$MODEL"/*.safetensors > /dev/null
"$VENV/bin/python" scripts/reference/bench_checkpoint.py run --model "$MODEL" --video "$VIDEO" --prompt "$PROMPT" \
    --dtype bfloat16 --threads "$THREADS" --max-new-tokens "$TOKENS" --json "$OUT/tf-bf16.json" > "$OUT/tf-bf16.log" 2>&1
for r in bf16-cold bf16 q8_0 q4k q4k-kvq8; do
    echo "== videollava $r (cold page cache: $([ $r = bf16-cold ] && echo $cold || echo 0))"
    "$VENV/bin/python" scripts/reference/bench_report.py "$OUT/rust-$r.json" "$OUT/tf-bf16.json"
done | tee "$OUT/report.txt"
date -u
