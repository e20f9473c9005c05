"""Dump transformers' VideoLlavaProcessor outputs for the Rust processor tests.

Writes, under --out (crates/videollava/tests/fixtures):
  media/               small made images and videos (inputs of the cases)
  processor/<case>.safetensors
                       input_ids, attention_mask (I64 [B, L]), pixel_values_images (F32 [N, 3, H, W]),
                       pixel_values_videos (F32 [M, T, 3, H, W]); metadata: checkpoint, prompts,
                       images, videos, num_frames, sampling (JSON strings)
  processor/real_tokenizer.json
                       input_ids / attention_mask for the real Llama tokenizer in
                       shared/fixtures/videollava-tokenizer on awkward prompts

Video frames are decoded with PyAV in stream order and chosen as the seed does
(np.arange(0, total, total / N).astype(int), or linspace); repeated indices repeat frames.
Video pixel values come from the Pillow image processor applied frame by frame (reference-spec,
"The oracle"); the torchvision video processor's difference is printed for information.

    python scripts/reference/processor_fixtures.py --out crates/videollava/tests/fixtures \
        --shared ../shared
"""

import argparse
import json
import os

import av
import numpy as np
from PIL import Image
from safetensors.numpy import save_file

import checkpoints


def make_media(media_dir):
    os.makedirs(media_dir, exist_ok=True)
    rng = np.random.default_rng(7)

    def picture(h, w):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w, 1)], -1)
        return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)

    Image.fromarray(picture(45, 61)).save(os.path.join(media_dir, "landscape.png"))
    Image.fromarray(picture(66, 38)).save(os.path.join(media_dir, "portrait.jpg"), quality=90)

    def video(name, codec, n, w, h, pix_fmt, rate=10, options=None):
        path = os.path.join(media_dir, name)
        with av.open(path, "w") as c:
            s = c.add_stream(codec, rate=rate)
            s.width, s.height, s.pix_fmt = w, h, pix_fmt
            if options:
                s.options = options
            base = picture(h, w).astype(np.int32)
            for i in range(n):
                img = np.roll(base, shift=3 * i, axis=1)
                img[(2 * i) % h : (2 * i) % h + 6, 5:15] = [255, 40 * (i % 6), 0]
                frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
                for p in s.encode(frame):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)

    video("clip.mp4", "libx264", 20, 48, 36, "yuv420p", options={"crf": "23", "bf": "2"})
    video("short.webm", "libvpx-vp9", 5, 40, 32, "yuv420p")


def decode_frames(path, num_frames, sampling):
    with av.open(path) as c:
        stream = c.streams.video[0]
        total = stream.frames
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    if total == 0 or total != len(frames):
        total = len(frames)
    if sampling == "uniform":
        idx = np.arange(0, total, total / num_frames).astype(int)[:num_frames]
    else:
        idx = np.linspace(0, total - 1, num_frames).astype(int)
    return np.stack([frames[i] for i in idx])


CASES = [
    ("image_prompt", "tiny-llama", ["USER: <image>\nWhat is shown in this picture? ASSISTANT:"], ["landscape.png"], [], 8, "uniform"),
    ("video_prompt", "tiny-llama", ["USER: <video>\nWhy is this video funny? ASSISTANT:"], [], ["clip.mp4"], 8, "uniform"),
    (
        "batch_two_lengths",
        "tiny-llama",
        [
            "USER: <image>\nDescribe it. ASSISTANT:",
            "USER: <image>\nWhat colour is the sky in this picture, and how many birds are there? ASSISTANT:",
        ],
        ["portrait.jpg", "landscape.png"],
        [],
        8,
        "uniform",
    ),
    (
        "multi_turn_image_video",
        "tiny-llama",
        ["USER: <image>\nWhat is this? ASSISTANT: A red car.</s>USER: <video>\nAnd what happens in this video? ASSISTANT:"],
        ["landscape.png"],
        ["clip.mp4"],
        8,
        "uniform",
    ),
    ("text_only", "tiny-llama", ["USER: Tell me a joke about rabbits. ASSISTANT:"], [], [], 8, "uniform"),
    (
        "batch_mixed_order",
        "tiny-llama",
        ["USER: <video>\nWhat happens? ASSISTANT:", "USER: <image> <image>\nCompare these two. ASSISTANT:", "Hi"],
        ["landscape.png", "portrait.jpg"],
        ["short.webm"],
        8,
        "uniform",
    ),
    ("linspace_4_frames", "tiny-llama", ["USER: <video>\nSummarise. ASSISTANT:"], [], ["clip.mp4"], 4, "linspace"),
    (
        "strategy_full_no_processor_config",
        "tiny-mistral-full",
        ["USER: <image>\nWhat is it? ASSISTANT: A picture.</s>USER: <video>\nAnd this? ASSISTANT:"],
        ["portrait.jpg"],
        ["clip.mp4"],
        8,
        "uniform",
    ),
]


def run_case(out, case):
    name, ckpt, prompts, images, videos, num_frames, sampling = case
    media = os.path.join(out, "media")
    proc = checkpoints.load_processor(os.path.join(out, "checkpoints", ckpt))
    pil = [Image.open(os.path.join(media, p)) for p in images]
    vids = [decode_frames(os.path.join(media, p), num_frames, sampling) for p in videos]
    enc = proc(text=prompts, images=pil or None, videos=vids or None, padding=True, return_tensors="pt")
    enc = {k: v.numpy() for k, v in enc.items()}
    tensors = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    if pil:
        tensors["pixel_values_images"] = enc["pixel_values_images"].astype(np.float32)
    if vids:
        pillow_path = proc.image_processor(images=None, videos=vids, return_tensors="np")["pixel_values_videos"]
        tv = np.asarray(enc["pixel_values_videos"], dtype=np.float32)
        print(f"  {name}: torchvision video path vs Pillow path max abs diff {np.abs(tv - pillow_path).max():.3g}")
        tensors["pixel_values_videos"] = pillow_path.astype(np.float32)
    meta = {
        "checkpoint": ckpt,
        "prompts": json.dumps(prompts),
        "images": json.dumps(images),
        "videos": json.dumps(videos),
        "num_frames": str(num_frames),
        "sampling": sampling,
    }
    os.makedirs(os.path.join(out, "processor"), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out, "processor", f"{name}.safetensors"), metadata=meta)
    print(f"  {name}: input_ids {tensors['input_ids'].shape}")


REAL_PROMPTS = [
    ["USER: <video>\nWhy is this video funny? ASSISTANT:"],
    ["USER: <video>Why is this video funny? ASSISTANT:"],
    ["USER: <image>\nQu'est-ce que c'est ? Ça coûte 5 € à Zürich. ASSISTANT:"],
    ["   leading spaces,\ttabs\n\n\nnewlines; 日本語のテキスト; русский; 🎬🍿 emoji 👨‍👩‍👧 ZWJ ASSISTANT:"],
    ["USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: <video>\n  And this one?  ASSISTANT:"],
    ["Hello", "USER: <image>\nA much longer second prompt with ünïcödé and a tab\there. ASSISTANT:"],
    [" <image>", "<video>\n"],
]


# The hub checkpoint's config.json as transformers 4.x wrote it (sparse nested configs; reference-spec §1).
HUB_CONFIG = {
    "architectures": ["VideoLlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "video_llava",
    "pad_token_id": 32002,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.0.dev0",
    "video_token_index": 32001,
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


def write_hub_config(out):
    """checkpoints/hub-config: the hub checkpoint's JSON files without weights or tokenizer."""
    from transformers import AutoConfig, VideoLlavaImageProcessor

    path = os.path.join(out, "checkpoints", "hub-config")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(HUB_CONFIG, f, indent=2)
    VideoLlavaImageProcessor().save_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)  # transformers must read it back
    assert cfg.text_config.hidden_size == 4096 and cfg.vision_config.patch_size == 14


def real_tokenizer_cases(out, shared):
    from transformers import (
        LlamaTokenizerFast,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    tok = LlamaTokenizerFast.from_pretrained(os.path.join(shared, "fixtures", "videollava-tokenizer"))
    proc = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(),
        video_processor=VideoLlavaVideoProcessor(),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
    )
    # Pixels do not affect ids: a grey image and an 8-frame grey video stand in for media.
    cases = []
    for prompts in REAL_PROMPTS:
        n_img = sum(p.count("<image>") for p in prompts)
        n_vid = sum(p.count("<video>") for p in prompts)
        images = [Image.new("RGB", (40, 30), (128, 128, 128)) for _ in range(n_img)] or None
        videos = [np.full((8, 30, 40, 3), 128, np.uint8) for _ in range(n_vid)] or None
        enc = proc(text=prompts, images=images, videos=videos, padding=True, return_tensors="pt")
        ids = enc["input_ids"].tolist()
        cases.append(
            {
                "prompts": prompts,
                "num_images": n_img,
                "num_videos": n_vid,
                "input_ids": ids,
                "attention_mask": enc["attention_mask"].tolist(),
                "decoded": [tok.decode(r) for r in ids],
                "decoded_skip_special": [tok.decode(r, skip_special_tokens=True) for r in ids],
            }
        )
    with open(os.path.join(out, "processor", "real_tokenizer.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False)
    print(f"  real tokenizer: {len(cases)} cases")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shared", default=None, help="the shared/ folder (real tokenizer); skipped when absent")
    args = ap.parse_args()
    for name in checkpoints.VARIANTS:
        checkpoints.write_checkpoint(os.path.join(args.out, "checkpoints"), name)
    write_hub_config(args.out)
    make_media(os.path.join(args.out, "media"))
    for case in CASES:
        run_case(args.out, case)
    if args.shared:
        real_tokenizer_cases(args.out, args.shared)


if __name__ == "__main__":
    main()
