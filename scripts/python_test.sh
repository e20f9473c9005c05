#!/usr/bin/env bash
# The Python package's tests (crates/videollava-py/tests): `generate` against the CLI, the
# processor against transformers' fixtures, streaming, media inputs, errors, and
# examples/ray_batch.py on a two-node Ray cluster on this machine.
#
# A virtual environment outside the repository (VIDEOLLAVA_PY_VENV, default
# ~/.cache/videollava-venvs/py) gets the test dependencies when they are missing, then the wheel
# built from this checkout with the README's command, `pip install ./crates/videollava-py` (one
# release build of the extension, in target/release). Set VIDEOLLAVA_SKIP_PYTHON=1 to skip.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
if [ "${VIDEOLLAVA_SKIP_PYTHON:-0}" = 1 ]; then
  echo "python_test.sh: skipped (VIDEOLLAVA_SKIP_PYTHON=1)" >&2
  exit 0
fi
venv="${VIDEOLLAVA_PY_VENV:-$HOME/.cache/videollava-venvs/py}"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c 'import maturin, pytest, numpy, PIL, pyarrow, ray.data' 2>/dev/null; then
  echo "python_test.sh: installing the test dependencies into $venv" >&2
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q 'maturin>=1.9.4,<2' pytest numpy pillow 'ray[data]'
fi

# The CLI the tests compare with. The same selection as scripts/test.sh's `cargo test`, so that
# after it this builds nothing (a build of the CLI alone would resolve features anew).
if [ -z "${VIDEOLLAVA_BIN:-}" ]; then
  cargo test --workspace --locked --no-run -q
  export VIDEOLLAVA_BIN="$repo/target/debug/videollava"
fi

echo "python_test.sh: building and installing the wheel (a release build of the engine)" >&2
"$py" -m pip install -q --force-reinstall --no-deps ./crates/videollava-py

# From outside the source tree, so that `import videollava` is the installed wheel.
cd /
exec "$py" -m pytest -p no:cacheprovider -q "$repo/crates/videollava-py/tests"
