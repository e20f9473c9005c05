"""A tiny checkpoint saved by transformers 5.x, and what transformers 5.x computes from it.

transformers 5.x saves the processor as ONE `processor_config.json` that nests `image_processor`
and `video_processor` (no `preprocessor_config.json`), and its video processor has options of its
own (`do_sample_frames`, `num_frames`, ...). This script must run under transformers >= 5 (a
separate venv from the 4.57 one of the other scripts):

    python3 -m venv ../venv-tf5 && ../venv-tf5/bin/pip install 'transformers>=5' torch torchvision av pillow numpy safetensors
    ../venv-tf5/bin/python scripts/reference/checkpoint_5x_fixtures.py --out crates/videollava/tests/fixtures

Writes, under --out:
  checkpoints/model-llama-tf5/   config, generation config, processor (the video processor with
                                 do_sample_frames=True, num_frames=4; the default Video-LLaVA chat
                                 template, which 5.x saves as chat_template.jinja), tokenizer and
                                 random weights, all by `save_pretrained` of transformers 5.x
  processor-5x/image_video.safetensors
                                 the processor loaded back by `VideoLlavaProcessor.from_pretrained`
                                 on landscape.png and ALL decoded frames of clip.mp4 (the video
                                 processor samples 4 of them itself): input_ids, attention_mask,
                                 pixel_values_images, pixel_values_videos (transformers' own video
                                 path), pixel_values_videos_pillow (the image processor frame by
                                 frame, reference-spec "The oracle"), and greedy `generate()` ids
                                 (metadata: new_tokens, JSON; chat_prompt: `apply_chat_template` of
                                 one user turn with a video and "Why is this video funny?")
"""

import argparse
import json
import os
import tempfile

import av
import numpy as np
from PIL import Image
from safetensors.numpy import save_file

import checkpoints
import make_tokenizer

NAME = "model-llama-tf5"
PROMPT = "USER: <image>\nWhat is this? ASSISTANT: A picture.</s>USER: <video>\nAnd what happens here? ASSISTANT:"
NUM_FRAMES = 4
MAX_NEW_TOKENS = 8


def write_checkpoint(out):
    import torch
    from transformers import (
        GenerationConfig,
        LlamaTokenizerFast,
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    path = os.path.join(out, "checkpoints", NAME)
    os.makedirs(path, exist_ok=True)
    for f in os.listdir(path):
        os.remove(os.path.join(path, f))
    config = checkpoints.make_config(
        "llama", checkpoints.TINY_LLAMA, dict(vision_feature_select_strategy="default", vision_feature_layer=-2)
    )
    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer.save(make_tokenizer.build(800, 0), tmp)
        tokenizer = LlamaTokenizerFast.from_pretrained(tmp)
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**checkpoints.PREPROCESSOR),
        video_processor=VideoLlavaVideoProcessor(
            **checkpoints.PREPROCESSOR, do_sample_frames=True, num_frames=NUM_FRAMES
        ),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=open(os.path.join(out, "chat", "default_template.jinja")).read(),
    )
    processor.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=checkpoints.PAD_ID).save_pretrained(path)
    torch.manual_seed(5)
    model = VideoLlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    assert not os.path.exists(os.path.join(path, "preprocessor_config.json")), "5.x layout expected"
    print("wrote", path, sorted(os.listdir(path)))
    return path


def all_frames(path):
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def dump(out, path):
    import torch
    from transformers import VideoLlavaForConditionalGeneration, VideoLlavaProcessor

    proc = VideoLlavaProcessor.from_pretrained(path)
    print("loaded", type(proc.image_processor).__name__, type(proc.video_processor).__name__)
    media = os.path.join(out, "media")
    image = Image.open(os.path.join(media, "landscape.png"))
    frames = all_frames(os.path.join(media, "clip.mp4"))
    enc = proc(text=[PROMPT], images=[image], videos=[frames], return_tensors="pt")
    # The oracle for video pixels: the image processor on the frames the video processor chose.
    idx = np.arange(0, len(frames), len(frames) / NUM_FRAMES).astype(int)
    pillow = proc.image_processor(images=[Image.fromarray(f) for f in frames[idx]], return_tensors="np")
    pillow = np.asarray(pillow.get("pixel_values_images", pillow.get("pixel_values")))[None]
    tv = enc["pixel_values_videos"].numpy().astype(np.float32)
    print(f"  {len(frames)} frames -> {tv.shape[1]}; video processor vs Pillow path max abs diff {np.abs(tv - pillow).max():.3g}")

    model = VideoLlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new_tokens = gen[0, enc["input_ids"].shape[1] :].tolist()
    tensors = {
        "input_ids": enc["input_ids"].numpy().astype(np.int64),
        "attention_mask": enc["attention_mask"].numpy().astype(np.int64),
        "pixel_values_images": enc["pixel_values_images"].numpy().astype(np.float32),
        "pixel_values_videos": tv,
        "pixel_values_videos_pillow": pillow.astype(np.float32),
    }
    import transformers

    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why is this video funny?"}]}]
    meta = {
        "chat_prompt": proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
        "checkpoint": NAME,
        "prompts": json.dumps([PROMPT]),
        "images": json.dumps(["landscape.png"]),
        "videos": json.dumps(["clip.mp4"]),
        "decoded_frames": str(len(frames)),
        "new_tokens": json.dumps(new_tokens),
        "transformers_version": transformers.__version__,
    }
    os.makedirs(os.path.join(out, "processor-5x"), exist_ok=True)
    target = os.path.join(out, "processor-5x", "image_video.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, target, metadata=meta)
    print("wrote", target, {k: v.shape for k, v in tensors.items()}, "greedy", new_tokens)


def main():
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    assert int(transformers.__version__.split(".")[0]) >= 5, f"needs transformers 5.x, found {transformers.__version__}"
    dump(args.out, write_checkpoint(args.out))


if __name__ == "__main__":
    main()
