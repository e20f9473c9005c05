"""Shared pieces of the Python tests: fixture paths, the CLI to compare with, a loaded model.

The tiny random-weight checkpoints and media are the engine's own test fixtures
(`crates/videollava/tests/fixtures`, made by transformers through `scripts/reference`).
`VIDEOLLAVA_BIN` names the `videollava` binary to compare with; by default the workspace's
`target/{release,debug}/videollava`, newest first (scripts/python_test.sh builds it).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "crates" / "videollava" / "tests" / "fixtures"
CHECKPOINTS = FIXTURES / "checkpoints"
MEDIA = FIXTURES / "media"
MODEL = CHECKPOINTS / "model-llama"


def cli_binary() -> Path:
    env = os.environ.get("VIDEOLLAVA_BIN")
    if env:
        return Path(env)
    found = [p for p in (REPO / "target" / d / "videollava" for d in ("release", "debug")) if p.exists()]
    if not found:
        pytest.fail("no videollava binary: build it (cargo build -p videollava-cli) or set VIDEOLLAVA_BIN")
    return max(found, key=lambda p: p.stat().st_mtime)


def run_cli(args: List[str], check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.run([str(cli_binary()), *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"videollava {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def cli_generate(prompt: str, image: str | None = None, video: str | None = None, max_new_tokens: int = 12,
                 extra: List[str] | None = None, model: Path = MODEL) -> Dict:
    """`videollava generate --format json` for one prompt: its one JSON line. A prompt already in
    the chat format (`USER:` / `ASSISTANT:`) goes verbatim (`--raw-prompt`), as the bindings and
    `videollava batch` take it."""
    args = ["generate", "--model", str(model), "--prompt", prompt, "--dtype", "f32",
            "--max-new-tokens", str(max_new_tokens), "--format", "json", "--quantized-cache", "off"]
    if "USER:" in prompt or "ASSISTANT:" in prompt:
        args.append("--raw-prompt")
    if image:
        args += ["--image", image]
    if video:
        args += ["--video", video]
    lines = run_cli(args + (extra or [])).stdout.splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def cli_batch(manifest: Path, output: Path, max_new_tokens: int = 12, extra: List[str] | None = None,
              model: Path = MODEL, cwd: Path | None = None) -> Dict[str, Dict]:
    """`videollava batch` over a manifest into `output` (started afresh): its results by id. The
    CLI resolves a relative media path against its working directory, `cwd`."""
    args = ["batch", "--model", str(model), "--input", str(manifest), "--output", str(output), "--overwrite",
            "--dtype", "f32", "--max-new-tokens", str(max_new_tokens), "--quantized-cache", "off"]
    run_cli(args + (extra or []), cwd=cwd)
    results = [json.loads(line) for line in output.read_text().splitlines()]
    by_id = {r["id"]: r for r in results}
    assert len(by_id) == len(results), f"an id written twice: {[r['id'] for r in results]}"
    return by_id


def read_safetensors(path: Path) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """A safetensors file as numpy arrays plus its metadata (the format is a length-prefixed JSON
    header followed by little-endian tensor data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    dtypes = {"I64": "<i8", "F32": "<f4", "U8": "|u1", "F16": "<f2", "I32": "<i4"}
    data = raw[8 + n:]
    out = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out, meta


@pytest.fixture(scope="session")
def model():
    from videollava import VideoLlava

    return VideoLlava.from_pretrained(MODEL, dtype="f32", quantized_cache="off")
