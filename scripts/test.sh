#!/usr/bin/env bash
# The project's test command: installs what the build lacks, then runs every test of the workspace.
# Tests that read ../shared (real media, the real tokenizer) skip with a message when it is absent,
# and fail when CI is set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-system-deps.sh
# A clean build and its test binaries take ~4 GB here; say so early where the disk is short.
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
echo "free disk: $((free_kb / 1024 / 1024)) GiB"
if [ "${free_kb:-0}" -lt $((5 * 1024 * 1024)) ]; then
  echo "warning: less than 5 GiB free here; the build may run out of space (No space left on device)" >&2
fi
# A clean build needs no incremental cache (it only costs disk).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# The library's module graph: no import cycles, every edge in the data flow's direction.
python3 scripts/dev/module_graph.py crates/videollava/src
cargo test --workspace --locked "$@"
# The library's tests again with each lower kernel set forced (no rebuild: the switch is read at
# run time), so a machine with AVX-512 also proves the AVX2 and portable paths end to end (and one
# with AMX the AVX-512 paths).
if [ "$(uname -m)" = x86_64 ] && [ $# -eq 0 ]; then
  sets="avx2 portable"
  if grep -qw amx_bf16 /proc/cpuinfo; then sets="avx512 $sets"; fi
  for set in $sets; do
    echo "== the library's tests with VIDEOLLAVA_KERNELS=$set"
    VIDEOLLAVA_KERNELS=$set cargo test -p videollava --locked --lib --test integration
  done
fi
# The Python package (crates/videollava-py) and examples/ray_batch.py.
scripts/python_test.sh
