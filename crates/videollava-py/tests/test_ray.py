"""`examples/ray_batch.py` on a Ray cluster of two nodes on this machine (loopback only), against
`videollava batch` run on the same manifest."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import MEDIA, MODEL, REPO, cli_batch

try:
    import ray.data  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise  # CI must run these tests, never pass by skipping them
    pytest.skip("ray[data] is not installed (scripts/python_test.sh installs it)", allow_module_level=True)

EXAMPLE = REPO / "examples" / "ray_batch.py"
MAX_NEW_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list:
    """Ports of the per-node services, chosen free so that two nodes can share the machine."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def ray_env() -> dict:
    """The environment of the Ray processes: no RAY_* of the caller's; a token left in ~/.ray by
    another Ray would switch token authentication on: off for this private cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "disabled"
    return env


# Ray replaces 127.0.0.1 and localhost by the machine's routable address; other addresses of the
# loopback range it takes as they are. One for each node, so that each is found by its own.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


class Cluster:
    """A head and one more node, each `ray start --block` in its own process group, so both are
    stopped by the ids of the processes this test started."""

    def __init__(self) -> None:
        # Short: Ray's socket paths live below it and are limited to 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="vl-ray-", dir="/tmp")
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.procs: list = []
        self.ray = str(Path(sys.executable).parent / "ray")

    def start(self) -> None:
        common = ["--block", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
                  "--disable-usage-stats"]
        head = [self.ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
                "--include-dashboard=false", f"--temp-dir={self.temp_dir}", *common, *node_ports()]
        self._spawn(head, "head")
        self._wait_for_nodes(1)
        worker = [self.ray, "start", f"--address={self.address}", f"--node-ip-address={WORKER_IP}", *common,
                  *node_ports()]
        self._spawn(worker, "worker")
        self._wait_for_nodes(2)
        # Both nodes on their loopback addresses, never the machine's network address.
        for name, ip in (("head", HEAD_IP), ("worker", WORKER_IP)):
            log = open(os.path.join(self.temp_dir, f"{name}.log")).read()
            assert set(re.findall(r"Local node IP: (\S+)", log)) == {ip}, f"{name} node: {log[-2000:]}"

    def _spawn(self, cmd: list, name: str) -> None:
        log = open(os.path.join(self.temp_dir, f"{name}.log"), "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_env(),
                                           start_new_session=True))

    def _wait_for_nodes(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {p.returncode}: {self.logs()}")
            proc = subprocess.run([self.ray, "status", f"--address={self.address}"], capture_output=True,
                                  text=True, env=ray_env(), timeout=60)
            out = proc.stdout
            active = out.split("Active:", 1)[1].split("Pending:", 1)[0] if "Active:" in out else ""
            if len(re.findall(r"\bnode_[0-9a-f]+", active)) >= n:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the cluster did not reach {n} nodes in {timeout} s:\n{out}\n{self.logs()}")

    def logs(self) -> str:
        text = []
        for name in ("head", "worker"):
            path = os.path.join(self.temp_dir, f"{name}.log")
            if os.path.exists(path):
                text.append(f"--- {name}\n" + open(path).read()[-3000:])
        return "\n".join(text)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            # Whatever the node left in its process group (raylet, workers, ...) goes too.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def write_manifest(folder: Path) -> tuple:
    rows = [
        {"id": "video", "prompt": "Why is this video funny?", "video": str(MEDIA / "clip.mp4")},
        {"id": "image", "prompt": "What is shown in this picture?", "image": str(MEDIA / "landscape.png")},
        {"id": "text", "prompt": "Tell me a joke about rabbits."},
        {"id": "chat", "prompt": "USER: <image>\nWhat is it? ASSISTANT:", "image": str(MEDIA / "portrait.jpg")},
        # Relative to the manifest's folder.
        {"id": "relative", "prompt": "What happens?", "video": os.path.relpath(MEDIA / "short.webm", folder)},
        {"id": "missing", "prompt": "What happens?", "video": str(folder / "missing.mp4")},
    ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def run_example(cluster: Cluster, manifest: Path, output: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(EXAMPLE), "--address", cluster.address, "--node-ip-address", HEAD_IP,
           "--manifest", str(manifest),
           "--output", str(output), "--model", str(MODEL), "--dtype", "f32", "--concurrency", "2",
           "--cpus-per-actor", "1", "--batch-size", "2", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ray_env(), timeout=300)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"ray_batch.py ran over 300 s:\n{e.stderr}\n{cluster.logs()}") from None
    assert proc.returncode == 0, f"ray_batch.py failed:\n{proc.stdout}\n{proc.stderr}\n{cluster.logs()}"
    return proc


@pytest.fixture(scope="module")
def jsonl_run(cluster: Cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-batch")
    manifest, rows = write_manifest(folder)
    output = folder / "results.jsonl"
    run_example(cluster, manifest, output)
    return folder, manifest, rows, [json.loads(line) for line in output.read_text().splitlines()]


def test_ray_batch_on_two_nodes_equals_the_cli_batch(cluster: Cluster, jsonl_run):
    folder, manifest, rows, results = jsonl_run
    assert [r["id"] for r in results] == [r["id"] for r in rows], "manifest order"
    # The same manifest and options through `videollava batch` (the example's defaults: 8 frames,
    # uniform), run in the manifest's folder, against which the example resolves relative paths.
    want_by_id = cli_batch(manifest, folder / "cli-results.jsonl", max_new_tokens=MAX_NEW_TOKENS,
                           extra=["--num-frames", "8", "--frame-sampling", "uniform"], cwd=folder)
    assert sorted(want_by_id) == sorted(r["id"] for r in rows)
    for got in results:
        want = want_by_id[got["id"]]
        if got["id"] == "missing":
            assert got["text"] is None and got["token_ids"] is None
            assert "missing.mp4" in got["error"] and "missing.mp4" in want["error"], (got, want)
            continue
        assert got["error"] is None, got
        assert "error" not in want, want
        for key in ("text", "token_ids", "finish_reason", "prompt_tokens"):
            assert got[key] == want[key], (got["id"], key, got[key], want[key])
        # The same tokens decoded in other batches (the actors' batches of 2, the CLI's
        # continuous batching): log-probabilities agree to f32 rounding.
        assert len(got["logprobs"]) == len(want["logprobs"]) == len(want["token_ids"])
        assert all(abs(a - b) <= 1e-5 for a, b in zip(got["logprobs"], want["logprobs"])), got["id"]

    # Each actor says where it loaded the model: both nodes took part.
    logs = "".join(p.read_text(errors="replace") for p in Path(cluster.temp_dir).rglob("worker-*.out"))
    nodes = set(re.findall(r"videollava: model loaded on node ([0-9a-f]+)", logs))
    assert len(nodes) == 2, f"actors ran on {len(nodes)} node(s)"


def test_ray_batch_writes_parquet(cluster: Cluster, jsonl_run):
    import pyarrow.parquet as pq

    folder, manifest, _, results = jsonl_run
    run_example(cluster, manifest, folder / "results.parquet")
    assert pq.read_table(folder / "results.parquet").to_pylist() == results
