#!/usr/bin/env python3
"""Reference fixtures for the video decoder (`crates/videollava/src/media/video.rs`).

Makes small synthetic videos with PyAV (seeded content with motion and colour) in the containers
and codecs the decoder must handle, then decodes each the reference way:

    frames = [f for f in container.decode(video=0)]            # stream order, decoder flushed
    total  = stream.frames, or len(frames) when that is 0 (webm, mkv, gif) or wrong
    uniform : idx = np.arange(0, total, total / 8).astype(int)[:8]  (HF Video-LLaVA docs, the default)
    linspace: idx = np.linspace(0, total - 1, 8).astype(int)        (original Video-LLaVA repo)
    pixels  = frames[i].to_ndarray(format="rgb24")

For every video and sampling it writes `<video file>.<sampling>.expected.safetensors` with
`indices` (I64 [8]) and `frames` (U8 [8, H, W, 3]), metadata `total_frames`, `sampling`,
`header_frames` (what the container claims) and `decoded_frames`.

With `--shared DIR` it also writes `bigbuckbunny.expected.json` for DIR/fixtures/media/bigbuckbunny.mp4
(not copied): per sampling the indices and the sha256 hex of each frame's rgb24 bytes.

Usage:
    /work/venv-ref/bin/python scripts/reference/video_fixtures.py \
        --out crates/videollava/tests/fixtures/videos [--shared /work/shared]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from safetensors.numpy import save_file

NUM_FRAMES = 8
SAMPLINGS = ("uniform", "linspace")


def sample_indices(total: int, n: int, sampling: str) -> np.ndarray:
    if sampling == "uniform":
        return np.arange(0, total, total / n).astype(int)[:n]
    return np.linspace(0, total - 1, n).astype(int)


def synthetic_rgb(t: int, w: int, h: int, seed: int) -> np.ndarray:
    """Frame t: a drifting colour gradient, two moving saturated boxes, mild seeded noise."""
    rng = np.random.default_rng(seed * 1000 + t)
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1) + 9 * t) % 256
    g = (y * 255 // max(h - 1, 1) + 5 * t) % 256
    b = ((x + y) * 4 + 13 * t) % 256
    img = np.stack([r, g, b], axis=-1).astype(np.int32)
    bx = (3 * t) % max(w - 12, 1)
    by = (2 * t) % max(h - 10, 1)
    img[by : by + 10, bx : bx + 12] = [250, 20, 30]
    cx = (w - 14 - 2 * t) % max(w - 14, 1)
    cy = (h // 2 + t) % max(h - 8, 1)
    img[cy : cy + 8, cx : cx + 14] = [20, 240, 60]
    img += rng.integers(-6, 7, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_video(path: Path, fmt: str | None, codec: str, pix_fmt: str, w: int, h: int, n: int, seed: int,
                options: dict | None = None, rate: int = 25, to_format: str | None = None) -> None:
    # fflags=bitexact: no random segment UIDs or dates (Matroska), so reruns give identical files.
    with av.open(str(path), "w", format=fmt, options={"fflags": "bitexact"}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if options:
            stream.options = options
        for t in range(n):
            frame = av.VideoFrame.from_ndarray(synthetic_rgb(t, w, h, seed), format="rgb24")
            if to_format:
                frame = frame.reformat(format=to_format)
            frame.pts = t
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_audio_only(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        t = np.arange(16000 // 4) / 16000.0
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_zero_frames(path: Path) -> None:
    """An mp4 whose h264 track has no samples (FFmpeg 8 then lists no video stream at all)."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        out.start_encoding()
        for packet in stream.encode():
            out.mux(packet)


def decode_reference(path: Path):
    """All frames of the first video stream as PyAV yields them, with header and decoded counts."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        header = stream.frames
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames, header


def bframe_check(path: Path) -> bool:
    """True when the packets' pts are out of decode order (B-frames present)."""
    with av.open(str(path)) as container:
        pts = [p.pts for p in container.demux(video=0) if p.pts is not None]
    return pts != sorted(pts)


VIDEOS = [
    # name, writer kwargs
    ("h264_bframes.mp4", dict(fmt="mp4", codec="libx264", pix_fmt="yuv420p", w=64, h=48, n=37, seed=1,
                              options={"x264-params": "bframes=3:b-adapt=0:keyint=16:scenecut=0", "crf": "30"})),
    ("vp9.webm", dict(fmt="webm", codec="libvpx-vp9", pix_fmt="yuv420p", w=80, h=44, n=30, seed=2,
                      options={"crf": "40", "b": "0", "g": "10"})),
    ("h264.mkv", dict(fmt="matroska", codec="libx264", pix_fmt="yuv420p", w=66, h=50, n=23, seed=3,
                      options={"crf": "30"})),
    # Full-range yuvj420p, odd width. The height stays even: for odd-height 4:2:0 FFmpeg 5.1 and
    # 8.0 swscale interpolate chroma differently (documented deviation in video.rs).
    ("mjpeg.avi", dict(fmt="avi", codec="mjpeg", pix_fmt="yuvj420p", w=63, h=46, n=20, seed=4,
                       options={"qscale": "6"})),
    ("anim.gif", dict(fmt="gif", codec="gif", pix_fmt="rgb8", w=50, h=38, n=12, seed=5, rate=10,
                      to_format="rgb8")),
    ("short5.mp4", dict(fmt="mp4", codec="libx264", pix_fmt="yuv420p", w=64, h=48, n=5, seed=6,
                        options={"crf": "30"})),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    for name, kw in VIDEOS:
        path = args.out / name
        write_video(path, **kw)
        frames, header = decode_reference(path)
        decoded = len(frames)
        total = header if header > 0 and header == decoded else decoded
        if header and header != decoded:
            print(f"  note: {name}: header says {header} frames, decoded {decoded}")
        if name.endswith(".mp4") and kw["n"] > 8:
            assert bframe_check(path), f"{name}: no B-frames"
        for sampling in SAMPLINGS:
            idx = sample_indices(total, NUM_FRAMES, sampling)
            assert len(idx) == NUM_FRAMES
            stacked = np.stack([frames[i] for i in idx])
            save_file(
                {"indices": idx.astype(np.int64), "frames": np.ascontiguousarray(stacked)},
                str(args.out / f"{name}.{sampling}.expected.safetensors"),
                metadata={"total_frames": str(total), "sampling": sampling,
                          "header_frames": str(header), "decoded_frames": str(decoded)},
            )
        print(f"{name}: {path.stat().st_size} bytes, {stacked.shape[2]}x{stacked.shape[1]}, "
              f"header {header}, decoded {decoded}")

    write_audio_only(args.out / "audio_only.m4a")
    write_zero_frames(args.out / "zero_frames.mp4")
    for extra in ("audio_only.m4a", "zero_frames.mp4"):
        with av.open(str(args.out / extra)) as c:
            nv = len(c.streams.video)
            n = len(list(c.decode(video=0))) if nv else 0
        print(f"{extra}: {(args.out / extra).stat().st_size} bytes, video streams {nv}, decoded {n}")

    if args.shared is not None:
        src = args.shared / "fixtures" / "media" / "bigbuckbunny.mp4"
        frames, header = decode_reference(src)
        total = header if header > 0 and header == len(frames) else len(frames)
        result = {"file": "fixtures/media/bigbuckbunny.mp4", "total_frames": total,
                  "header_frames": header, "decoded_frames": len(frames),
                  "width": int(frames[0].shape[1]), "height": int(frames[0].shape[0])}
        for sampling in SAMPLINGS:
            idx = sample_indices(total, NUM_FRAMES, sampling)
            result[sampling] = {
                "indices": [int(i) for i in idx],
                "sha256": [hashlib.sha256(np.ascontiguousarray(frames[i]).tobytes()).hexdigest() for i in idx],
            }
        (args.out / "bigbuckbunny.expected.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"bigbuckbunny: total {total}, uniform {result['uniform']['indices']}, "
              f"linspace {result['linspace']['indices']}")


if __name__ == "__main__":
    main()
