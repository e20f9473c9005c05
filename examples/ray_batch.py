#!/usr/bin/env python3
"""Batch inference with Ray Data: a manifest of prompts and media in, one answer per row out.

The manifest is JSON Lines (``.jsonl``), Parquet (``.parquet``) or CSV (``.csv``), one row per
request with the columns ``id``, ``prompt`` and optionally ``image`` and/or ``video`` (paths;
a relative path is relative to the manifest's folder)::

    {"id": "a", "prompt": "Why is this video funny?", "video": "clips/a.mp4"}
    {"id": "b", "prompt": "What is in the picture?", "image": "photos/b.jpg"}

The manifest becomes a Ray dataset; ``map_batches`` runs it through ``--concurrency`` actors,
each of which loads the model once and gets ``--cpus-per-actor`` cores (its kernel threads).
Each output row holds ``id``, ``text``, ``token_ids``, ``logprobs``, ``prompt_tokens``,
``finish_reason`` (as ``videollava generate --format json``) and ``error`` (the engine's message
when the row failed, else null), in manifest order.

Output: ``--output FILE.jsonl`` or ``FILE.parquet`` (one file, written by this driver), or
``--output-dir DIR`` (Ray's own writers, one file per block, written where the actors run).

The same command runs on a laptop (a local Ray is started) and on a cluster (``--address
HOST:PORT``, or ``auto``, or ``RAY_ADDRESS``). On a cluster, the model and the media paths must
be readable on every node (shared storage), and ``videollava`` installed on every node::

    pip install ./crates/videollava-py 'ray[data]'
    python examples/ray_batch.py --manifest rows.jsonl --output results.jsonl \\
        --model LanguageBind/Video-LLaVA-7B-hf --dtype bf16 --quantize q4k --concurrency 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

import pyarrow as pa
import ray

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int64())),
        ("logprobs", pa.list_(pa.float64())),
        ("prompt_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
    ]
)


class Answerer:
    """The ``map_batches`` callable: one per actor, the model loaded once in ``__init__``."""

    def __init__(self, model: str, load_kwargs: Dict[str, Any], gen_kwargs: Dict[str, Any], base_dir: str) -> None:
        from videollava import VideoLlava

        # The kernel threads: the cores Ray gave this actor.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        threads = max(1, int(cpus))
        self.model = VideoLlava.from_pretrained(model, threads=threads, **load_kwargs)
        node = ray.get_runtime_context().get_node_id()
        print(f"videollava: model loaded on node {node} with {threads} threads", flush=True)
        self.gen_kwargs = gen_kwargs
        self.base_dir = base_dir

    def _path(self, value: Any) -> Optional[str]:
        if value is None or (isinstance(value, float) and value != value) or value == "":
            return None  # missing (null, NaN from CSV, empty)
        return os.path.join(self.base_dir, str(value))

    def _answer(self, prompt: Any, image: Optional[str], video: Optional[str]) -> Dict[str, Any]:
        from videollava import VideoLlavaError

        try:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError("the row has no prompt")
            out = self.model.generate(prompt, image=image, video=video, **self.gen_kwargs)
            return {
                "text": out.text,
                "token_ids": out.token_ids,
                "logprobs": out.logprobs,
                "prompt_tokens": out.prompt_tokens,
                "finish_reason": out.finish_reason,
                "error": None,
            }
        except (VideoLlavaError, ValueError, TypeError) as e:
            # One bad row does not stop the job: its error goes to the output.
            return {
                "text": None,
                "token_ids": None,
                "logprobs": None,
                "prompt_tokens": None,
                "finish_reason": None,
                "error": str(e),
            }

    def __call__(self, batch: Dict[str, Any]) -> pa.Table:
        n = len(batch["id"])
        column = lambda name: list(batch[name]) if name in batch else [None] * n  # noqa: E731
        rows: List[Dict[str, Any]] = []
        for id_, prompt, image, video in zip(column("id"), column("prompt"), column("image"), column("video")):
            row = {"id": str(id_)}
            row.update(self._answer(prompt, self._path(image), self._path(video)))
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def read_manifest(path: str) -> "ray.data.Dataset":
    # Reading a manifest is light: it takes no core from the actors (which may hold them all).
    light = {"ray_remote_args": {"num_cpus": 0}}
    if path.endswith(".jsonl"):
        return ray.data.read_json(path, lines=True, **light)
    if path.endswith(".json"):
        return ray.data.read_json(path, **light)
    if path.endswith(".parquet"):
        return ray.data.read_parquet(path, **light)
    if path.endswith(".csv"):
        return ray.data.read_csv(path, **light)
    raise SystemExit(f"error: {path}: the manifest must be .jsonl, .json, .parquet or .csv")


def write_file(rows: List[Dict[str, Any]], path: str) -> None:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), path)
        return
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def plain(value: Any) -> Any:
    """A row value as plain Python (Ray may hand lists back as numpy arrays)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="rows: .jsonl, .json, .parquet or .csv")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", help="one result file, .jsonl or .parquet, in manifest order")
    out.add_argument("--output-dir", help="a folder for Ray's writers (one file per block)")
    p.add_argument("--output-format", choices=["jsonl", "parquet"], default="jsonl", help="with --output-dir")
    p.add_argument("--address", default=None, help="Ray cluster (HOST:PORT or auto); default: RAY_ADDRESS, else a local Ray")
    p.add_argument("--node-ip-address", default=None, help="this machine's address in the cluster (default: Ray's guess)")
    p.add_argument("--concurrency", type=int, default=1, help="actors, each with its own copy of the model")
    p.add_argument("--cpus-per-actor", type=int, default=None, help="cores per actor (default: the cluster's cores / concurrency)")
    p.add_argument("--batch-size", type=int, default=4, help="rows handed to an actor at a time")
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the engine's)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantize", default=None, help="q8_0 or q4k")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--frame-sampling", default="uniform")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.concurrency < 1 or args.batch_size < 1:
        raise SystemExit("error: --concurrency and --batch-size must be at least 1")
    ray.init(address=args.address, log_to_driver=False, _node_ip_address=args.node_ip_address)
    try:
        from videollava import DEFAULT_MODEL

        cpus = args.cpus_per_actor or max(1, int(ray.cluster_resources().get("CPU", 1)) // args.concurrency)
        manifest = os.path.abspath(args.manifest)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        load_kwargs = {
            "dtype": args.dtype,
            "quantize": args.quantize,
            "num_frames": args.num_frames,
            "frame_sampling": args.frame_sampling,
        }
        gen_kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
        results = read_manifest(manifest).map_batches(
            Answerer,
            fn_constructor_args=(args.model or DEFAULT_MODEL, load_kwargs, gen_kwargs, os.path.dirname(manifest)),
            batch_size=args.batch_size,
            batch_format="numpy",
            concurrency=args.concurrency,
            num_cpus=cpus,
        )
        if args.output_dir:
            if args.output_format == "parquet":
                results.write_parquet(os.path.abspath(args.output_dir))
            else:
                results.write_json(os.path.abspath(args.output_dir), lines=True)
            print(f"wrote {os.path.abspath(args.output_dir)}", file=sys.stderr)
        else:
            rows = [{k: plain(v) for k, v in row.items()} for row in results.iter_rows()]
            write_file(rows, args.output)
            failed = sum(1 for r in rows if r["error"])
            print(f"wrote {len(rows)} rows to {args.output} ({failed} failed)", file=sys.stderr)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
