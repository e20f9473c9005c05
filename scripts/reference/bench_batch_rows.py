"""Rows per hour over a manifest of questions about videos: `videollava batch` against running
`videollava generate` once per row, and against transformers doing the same loop in one process.

make: writes `count` distinct clips cut from one video (different frames, mirrored), re-encoded
with PyAV, and a JSON Lines manifest asking `questions` questions about each:

    python scripts/reference/bench_batch_rows.py make --video bigbuckbunny.mp4 --out DIR [--count 4]

ours: times `videollava batch` (one process, the whole manifest) or `videollava generate` (one
process per row, loading the model each time) on the manifest; every row generates exactly
--max-new-tokens tokens (EOS ignored), greedy:

    python scripts/reference/bench_batch_rows.py ours --bin target/release/videollava --mode batch \
        --model DIR --rows DIR/rows.jsonl --max-new-tokens 32 [--threads 2] [--limit K] [--json OUT] \
        [--max-batch-size 8]

transformers: one process, the model loaded once, then per row: PyAV decode of 8 frames (uniform,
as the model card), the processor, `generate(max_new_tokens=N, min_new_tokens=N)` greedy:

    python scripts/reference/bench_batch_rows.py transformers --model DIR --rows DIR/rows.jsonl \
        --max-new-tokens 32 [--dtype bfloat16] [--threads 2] [--limit K] [--json OUT]

Each prints seconds (load included), rows and rows per hour; `--limit K` runs the first K rows only
(the rate is then over those rows).
"""

import argparse
import json
import os
import subprocess
import sys
import time

QUESTIONS = [
    "Why is this video funny?",
    "What happens in this video?",
    "Describe the main character.",
    "What is the setting of the video?",
]


def make(args):
    import av
    import numpy as np

    os.makedirs(args.out, exist_ok=True)
    with av.open(args.video) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    n = len(frames)
    rows = []
    for i in range(args.count):
        # Clip i: a different window of frames (at least half of the video), every other clip mirrored.
        start = (i * n) // (2 * args.count)
        clip = frames[start : start + n // 2]
        if i % 2:
            clip = [np.ascontiguousarray(f[:, ::-1]) for f in clip]
        path = os.path.join(args.out, f"clip{i}.mp4")
        with av.open(path, "w") as out:
            s = out.add_stream("mpeg4", rate=25)
            s.height, s.width = clip[0].shape[0] // 4 * 2, clip[0].shape[1] // 4 * 2  # half size, even
            s.pix_fmt = "yuv420p"
            s.options = {"qscale": "3"}
            for f in clip:
                vf = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(width=s.width, height=s.height)
                for p in s.encode(vf):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
        for q in range(args.questions):
            rows.append({"id": f"clip{i}-q{q}", "video": os.path.abspath(path), "prompt": QUESTIONS[q % len(QUESTIONS)]})
    manifest = os.path.join(args.out, "rows.jsonl")
    with open(manifest, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {args.count} clips ({n // 2} frames each) and {len(rows)} rows to {manifest}")


def read_rows(path, limit):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def report(kind, rows, seconds, extra, json_out):
    res = dict(kind=kind, rows=rows, seconds=round(seconds, 2), rows_per_hour=round(rows * 3600 / seconds, 1), **extra)
    print(json.dumps(res))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=1)


def ours(args):
    rows = read_rows(args.rows, args.limit)
    common = ["--model", args.model, "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
    common += ["--ignore-eos", "--temperature", "0"] + (["--dtype", args.dtype] if args.dtype else [])
    common += ["--quantize", args.quantize] if args.quantize else []
    answers = {}
    t0 = time.perf_counter()
    if args.mode == "batch":
        work = os.path.join(os.path.dirname(os.path.abspath(args.json or args.rows)), "batch-work")
        os.makedirs(work, exist_ok=True)
        manifest, results = os.path.join(work, "rows.jsonl"), os.path.join(work, "results.jsonl")
        with open(manifest, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if os.path.exists(results):
            os.remove(results)
        batch = [args.bin, "batch", "--input", manifest, "--output", results, "--max-batch-size", str(args.max_batch_size)]
        subprocess.run(batch + common, check=True)
        with open(results) as f:
            for line in f:
                r = json.loads(line)
                answers[r["id"]] = r.get("token_ids", r.get("error"))
    else:
        for r in rows:
            cmd = [args.bin, "generate", "--video", r["video"], "--prompt", r["prompt"], "--format", "json"] + common
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            answers[r["id"]] = json.loads(out).get("token_ids")
    seconds = time.perf_counter() - t0
    report(f"videollava {args.mode}", len(rows), seconds, {"answers": answers}, args.json)


def transformers_loop(args):
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_checkpoint import decode_video, load_processor
    from transformers import VideoLlavaForConditionalGeneration

    rows = read_rows(args.rows, args.limit)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = VideoLlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval()
    processor = load_processor(args.model)
    answers = {}
    with torch.inference_mode():
        for r in rows:
            frames, _ = decode_video(r["video"], 8)
            prompt = f"USER: <video>\n{r['prompt']} ASSISTANT:"
            inputs = processor(text=[prompt], videos=[frames], return_tensors="pt")
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
            n = args.max_new_tokens
            g = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            answers[r["id"]] = g[0, inputs["input_ids"].shape[1] :].tolist()
    seconds = time.perf_counter() - t0
    report("transformers loop", len(rows), seconds, {"answers": answers}, args.json)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--video", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--count", type=int, default=4)
    m.add_argument("--questions", type=int, default=3)
    for name in ("ours", "transformers"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--rows", required=True)
        p.add_argument("--max-new-tokens", type=int, default=32)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--limit", type=int, default=0)
        p.add_argument("--json")
        if name == "ours":
            p.add_argument("--bin", required=True)
            p.add_argument("--mode", choices=["batch", "generate"], required=True)
            p.add_argument("--dtype", default="bf16")
            p.add_argument("--quantize")
            # Rows decoding together (batch mode; the scheduler's KV budget also bounds them).
            p.add_argument("--max-batch-size", type=int, default=8)
        else:
            p.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    {"make": make, "ours": ours, "transformers": transformers_loop}[args.cmd](args)


if __name__ == "__main__":
    main()
