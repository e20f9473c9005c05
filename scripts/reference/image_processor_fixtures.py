"""Dump transformers' VideoLlavaImageProcessor (PIL path) outputs for the Rust image processor tests.

Writes one file per case under --out (crates/videollava/tests/fixtures/image_processor):
  <case>.safetensors   input        U8  [H, W, 3]  the synthetic RGB image (seeded)
                       pixel_values F32 [3, h, w]  transformers' output (pixel_values_images[0])
                       resized      U8  [h', w', 3] the Pillow resize step alone (transformers'
                                    `resize`), when it is small (<= 64 KiB) or the case is
                                    in FULL_RESIZE_CASES
                       metadata: config (JSON dict of the processor kwargs), case (its name)

The images are smooth gradients plus Gaussian noise plus a block of hard 0/255 edges, so
resampling, rounding and clipping differences show. Most cases use a small crop so the committed
folder stays small (~3 MB); the resize numerics do not depend on the crop. The 1280x720 input
(2.7 MB on its own) is left out for size; its resize is checked against Pillow separately.

    python scripts/reference/image_processor_fixtures.py --out crates/videollava/tests/fixtures/image_processor
"""

import argparse
import json
import os

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers import VideoLlavaImageProcessor


def synthetic(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack(
        [
            x * 255 / max(w - 1, 1),
            y * 255 / max(h - 1, 1),
            127 + 100 * np.sin(x / 5.0 + y / 11.0),
        ],
        -1,
    )
    img = base + rng.normal(0, 20, size=base.shape)
    # Hard edges: a checkerboard of 0/255 in the top-left quarter drives bicubic/lanczos overshoot.
    bh, bw = max(h // 4, 1), max(w // 4, 1)
    checker = ((np.arange(bh)[:, None] // 3 + np.arange(bw)[None, :] // 3) % 2) * 255
    img[:bh, :bw, :] = checker[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# Cases whose whole resized image is stored although it is large (odd-sized bicubic downscale).
FULL_RESIZE_CASES = {"default_333x517"}

SMALL_CROP = {"height": 32, "width": 32}

# (case, (width, height), processor kwargs)
CASES = [
    ("default_640x480", (640, 480), {}),
    ("default_333x517", (333, 517), {"crop_size": SMALL_CROP}),
    ("default_upscale_97x61", (97, 61), {"crop_size": SMALL_CROP}),
    ("default_224x224", (224, 224), {"crop_size": {"height": 40, "width": 40}}),
    ("default_5x300", (5, 300), {"crop_size": SMALL_CROP}),
    ("default_300x5", (300, 5), {"crop_size": SMALL_CROP}),
    ("no_resize_250x230", (250, 230), {"do_resize": False, "crop_size": {"height": 36, "width": 30}}),
    ("no_resize_pad_50x40", (50, 40), {"do_resize": False, "crop_size": {"height": 30, "width": 57}}),
    ("no_resize_pad_both_9x7", (9, 7), {"do_resize": False, "crop_size": 12}),
    ("no_center_crop", (80, 61), {"size": {"shortest_edge": 24}, "do_center_crop": False}),
    (
        "other_mean_std",
        (120, 90),
        {"size": 48, "crop_size": SMALL_CROP, "image_mean": [0.5, 0.25, 0.125], "image_std": 0.3},
    ),
    # Height shrinks more than twice the width: Pillow runs the vertical pass first; the crop pads
    # the height (40 -> 48) and crops the width (60 -> 50).
    ("size_hw_40x60", (90, 200), {"size": {"height": 40, "width": 60}, "crop_size": {"height": 48, "width": 50}}),
    ("tiny_checkpoint", (150, 100), {"size": {"shortest_edge": 32}, "crop_size": {"height": 28, "width": 28}}),
    ("no_rescale", (100, 80), {"size": 40, "crop_size": SMALL_CROP, "do_rescale": False}),
    ("no_normalize", (100, 80), {"size": 40, "crop_size": SMALL_CROP, "do_normalize": False}),
    ("no_rescale_no_normalize", (100, 80), {"size": 40, "crop_size": SMALL_CROP, "do_rescale": False, "do_normalize": False}),
    ("rescale_factor_half", (100, 80), {"size": 40, "crop_size": SMALL_CROP, "rescale_factor": 0.5, "do_normalize": False}),
]

FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
for code, name in FILTERS.items():
    # Downscale by a non-integer factor, and upscale.
    CASES.append((f"resample_{name}_down", (123, 91), {"size": 50, "crop_size": {"height": 44, "width": 48}, "resample": code}))
    CASES.append((f"resample_{name}_up", (31, 22), {"size": 47, "crop_size": {"height": 40, "width": 44}, "resample": code}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for old in os.listdir(args.out):
        if old.endswith(".safetensors"):
            os.remove(os.path.join(args.out, old))
    total = 0
    for i, (case, (w, h), cfg) in enumerate(CASES):
        arr = synthetic(w, h, seed=1000 + i)
        proc = VideoLlavaImageProcessor(**cfg)
        out = proc(images=Image.fromarray(arr, mode="RGB"), return_tensors="np")["pixel_values_images"]
        assert out.shape[0] == 1, out.shape
        pv = np.ascontiguousarray(out[0].astype(np.float32))  # uint8 when rescale and normalize are off
        tensors = {"input": np.ascontiguousarray(arr), "pixel_values": pv}
        if proc.do_resize:
            # The processor's own resize step (PIL), on the HWC uint8 array.
            resized = proc.resize(arr, size=proc.size, resample=proc.resample, input_data_format="channels_last")
            assert resized.dtype == np.uint8, resized.dtype
            if resized.shape != arr.shape and (resized.nbytes <= 64 * 1024 or case in FULL_RESIZE_CASES):
                tensors["resized"] = np.ascontiguousarray(resized)
        path = os.path.join(args.out, f"{case}.safetensors")
        save_file(
            tensors,
            path,
            metadata={"config": json.dumps(cfg), "case": case},
        )
        size = os.path.getsize(path)
        total += size
        extra = f" resized {tuple(tensors['resized'].shape)}" if "resized" in tensors else ""
        print(f"{case:<28} {w}x{h} -> {tuple(pv.shape)} {out.dtype}{extra}  {size / 1024:.0f} KiB")
    print(f"{len(CASES)} cases, {total / 1024 / 1024:.2f} MiB")


if __name__ == "__main__":
    main()
