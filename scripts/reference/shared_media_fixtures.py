"""Expected pixel values for the real media in shared/fixtures/media, without copying them.

For each photo (default 224 config) and for bigbuckbunny.mp4 (8 frames, both samplings), stores
the sha256 of transformers' float32 pixel_values bytes, their shape, mean and a strided sample
of values, in processor/shared_media.json. The Rust test compares the hash (identical output)
and, failing that, reports max/mean abs difference on the sample.

    python scripts/reference/shared_media_fixtures.py --out crates/videollava/tests/fixtures --shared ../shared
"""

import argparse
import hashlib
import json
import os

import numpy as np
from PIL import Image
from transformers import VideoLlavaImageProcessor

from processor_fixtures import decode_frames

STRIDE = 997


def entry(kind, name, pixels, **extra):
    pixels = np.ascontiguousarray(pixels.astype(np.float32))
    return dict(
        kind=kind,
        file=name,
        shape=list(pixels.shape),
        sha256=hashlib.sha256(pixels.tobytes()).hexdigest(),
        mean=float(pixels.mean(dtype=np.float64)),
        stride=STRIDE,
        sample=[float(x) for x in pixels.reshape(-1)[::STRIDE]],
        **extra,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shared", required=True)
    args = ap.parse_args()
    media = os.path.join(args.shared, "fixtures", "media")
    proc = VideoLlavaImageProcessor()
    cases = []
    for name in ["chelsea.png", "coffee.png", "no_time_for_that_tiny.gif"]:
        img = Image.open(os.path.join(media, name))
        cases.append(entry("image", name, proc(images=img, return_tensors="np")["pixel_values_images"]))
    for sampling in ["uniform", "linspace"]:
        frames = decode_frames(os.path.join(media, "bigbuckbunny.mp4"), 8, sampling)
        px = proc(images=None, videos=[frames], return_tensors="np")["pixel_values_videos"]
        cases.append(entry("video", "bigbuckbunny.mp4", px, sampling=sampling, num_frames=8))
    path = os.path.join(args.out, "processor", "shared_media.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    print(f"wrote {path}: {len(cases)} cases")


if __name__ == "__main__":
    main()
