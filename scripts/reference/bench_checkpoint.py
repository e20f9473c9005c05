"""Random-weight Video-LLaVA checkpoints with the real shapes, and a transformers timing baseline on them.

make: writes a checkpoint laid out like `LanguageBind/Video-LLaVA-7B-hf` (hub-style sparse config.json with
torch_dtype, generation_config.json, the default preprocessor_config.json, the real tokenizer copied from
--tokenizer, no processor_config.json) with random weights, in bf16 (default) or f32, sharded like the hub
(model-0000i-of-0000N.safetensors of at most --max-shard-gb, 5 GB -> 3 shards for 7B, plus
model.safetensors.index.json). Tensors are drawn one at a time directly in the target dtype and each shard
is written as soon as it is complete, so peak memory is about one shard (never the fp32 model).

    python scripts/reference/bench_checkpoint.py make --out DIR [--dtype bfloat16] [--shapes 7b|small]

`small`: the same structure with 8 LM layers (hidden 1024, intermediate 2816, 8 heads of 128) and 6 layers
per vision tower (CLIP ViT-L/14 widths), for quick runs.

run: times transformers as a user would run it:
  load        VideoLlavaForConditionalGeneration.from_pretrained(DIR, dtype=...) + the processor
  decode      PyAV, all frames decoded in stream order, 8 chosen by the seed's uniform sampling
  preprocess  VideoLlavaProcessor(text, videos) (4.57: the torchvision video processor)
  vision      the two-tower video path alone (get_video_features), for information
  prefill     one forward of the whole prompt with the KV cache on (vision + LM): time to first token
  decode      greedy steps with the KV cache over --max-new-tokens (EOS suppressed so all steps run)
  peak RSS    resource.getrusage(RUSAGE_SELF).ru_maxrss after each stage
printed as a table and written as JSON (--json).

    python scripts/reference/bench_checkpoint.py run --model DIR --video PATH --prompt TEXT \
        [--dtype bfloat16] [--threads 2] [--max-new-tokens 16] [--json OUT]
"""

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
DEFAULT_TOKENIZER = os.path.join(ROOT, "..", "shared", "fixtures", "videollava-tokenizer")

IMAGE_ID, VIDEO_ID, PAD_ID, VOCAB = 32000, 32001, 32002, 32064

SHAPES = {
    "7b": dict(
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        vision=dict(num_hidden_layers=24),
    ),
    "small": dict(
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8),
        vision=dict(num_hidden_layers=6),
    ),
}
VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, patch_size=14, image_size=224)


def hub_config(shapes, dtype):
    """config.json as the hub checkpoint has it (reference-spec §1): sparse nested configs."""
    s = SHAPES[shapes]
    text = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": VOCAB,
    }
    if shapes != "7b":
        text.update(s["text"])
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": s["vision"]["num_hidden_layers"],
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    }
    return {
        "architectures": ["VideoLlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": IMAGE_ID,
        "model_type": "video_llava",
        "pad_token_id": PAD_ID,
        "projector_hidden_act": "gelu",
        "text_config": dict(sorted(text.items())),
        "torch_dtype": dtype,
        "transformers_version": "4.41.0.dev0",
        "video_token_index": VIDEO_ID,
        "vision_config": vision,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": VOCAB,
    }


def weight_specs(shapes):
    """(name, shape, kind) in the on-disk (4.46/4.57) layout and save_pretrained's module order."""
    s = SHAPES[shapes]
    t = s["text"]
    H, I, V = t["hidden_size"], t["intermediate_size"], VOCAB
    D, VI, P = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    n_pos = (VISION["image_size"] // P) ** 2 + 1
    specs = []
    for tower in ("image_tower", "video_tower"):
        p = f"{tower}.vision_model."
        specs += [
            (p + "embeddings.class_embedding", (D,), "embed"),
            (p + "embeddings.patch_embedding.weight", (D, 3, P, P), "linear"),
            (p + "embeddings.position_embedding.weight", (n_pos, D), "embed"),
            (p + "pre_layrnorm.weight", (D,), "norm"),
            (p + "pre_layrnorm.bias", (D,), "bias"),
        ]
        for i in range(s["vision"]["num_hidden_layers"]):
            q = f"{p}encoder.layers.{i}."
            for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                specs += [(q + f"self_attn.{proj}.weight", (D, D), "linear"), (q + f"self_attn.{proj}.bias", (D,), "bias")]
            specs += [
                (q + "layer_norm1.weight", (D,), "norm"),
                (q + "layer_norm1.bias", (D,), "bias"),
                (q + "mlp.fc1.weight", (VI, D), "linear"),
                (q + "mlp.fc1.bias", (VI,), "bias"),
                (q + "mlp.fc2.weight", (D, VI), "linear"),
                (q + "mlp.fc2.bias", (D,), "bias"),
                (q + "layer_norm2.weight", (D,), "norm"),
                (q + "layer_norm2.bias", (D,), "bias"),
            ]
        specs += [(p + "post_layernorm.weight", (D,), "norm"), (p + "post_layernorm.bias", (D,), "bias")]
    specs += [
        ("multi_modal_projector.linear_1.weight", (H, D), "linear"),
        ("multi_modal_projector.linear_1.bias", (H,), "bias"),
        ("multi_modal_projector.linear_2.weight", (H, H), "linear"),
        ("multi_modal_projector.linear_2.bias", (H,), "bias"),
        ("language_model.model.embed_tokens.weight", (V, H), "embed"),
    ]
    for i in range(t["num_hidden_layers"]):
        q = f"language_model.model.layers.{i}."
        specs += [
            (q + "self_attn.q_proj.weight", (H, H), "linear"),
            (q + "self_attn.k_proj.weight", (H, H), "linear"),
            (q + "self_attn.v_proj.weight", (H, H), "linear"),
            (q + "self_attn.o_proj.weight", (H, H), "linear"),
            (q + "mlp.gate_proj.weight", (I, H), "linear"),
            (q + "mlp.up_proj.weight", (I, H), "linear"),
            (q + "mlp.down_proj.weight", (H, I), "linear"),
            (q + "input_layernorm.weight", (H,), "norm"),
            (q + "post_attention_layernorm.weight", (H,), "norm"),
        ]
    specs += [("language_model.model.norm.weight", (H,), "norm"), ("language_model.lm_head.weight", (V, H), "linear")]
    return specs


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def make(args):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig, VideoLlavaImageProcessor

    dtype = getattr(torch, args.dtype)
    elt = torch.tensor([], dtype=dtype).element_size()
    out = args.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hub_config(args.shapes, args.dtype), f, indent=2)
        f.write("\n")
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID).save_pretrained(out)
    VideoLlavaImageProcessor().save_pretrained(out)
    for name in sorted(os.listdir(args.tokenizer)):
        shutil.copyfile(os.path.join(args.tokenizer, name), os.path.join(out, name))
    cfg = AutoConfig.from_pretrained(out)  # transformers must read it back

    specs = weight_specs(args.shapes)
    # Shards as save_pretrained cuts them: in order, a new shard when the next tensor would overflow.
    limit = int(args.max_shard_gb * 1e9)
    shards, cur, cur_size = [], [], 0
    for spec in specs:
        size = numel(spec[1]) * elt
        if cur and cur_size + size > limit:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(spec)
        cur_size += size
    shards.append(cur)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]

    g = torch.Generator().manual_seed(args.seed)
    weight_map, total, t0 = {}, 0, time.time()
    for fname, shard in zip(names, shards):
        tensors = {}
        for name, shape, kind in shard:
            t = torch.empty(shape, dtype=dtype)
            if kind == "norm":
                t.normal_(1.0, 0.02, generator=g)
            elif kind == "bias":
                t.normal_(0.0, 0.01, generator=g)
            elif name.endswith("lm_head.weight"):
                t.normal_(0.0, args.lm_head_std, generator=g)
            else:
                t.normal_(0.0, 0.02, generator=g)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * elt
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname} ({os.path.getsize(os.path.join(out, fname)) / 1e9:.2f} GB, {time.time() - t0:.0f} s, "
              f"peak RSS {peak_rss_mb():.0f} MB)", flush=True)
    if n > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
            f.write("\n")
    params = sum(numel(s[1]) for s in specs)
    print(f"wrote {out}: {params / 1e9:.3f} B parameters, {total / 1e9:.2f} GB in {n} file(s), "
          f"text hidden {cfg.text_config.hidden_size} x {cfg.text_config.num_hidden_layers} layers, "
          f"vision {cfg.vision_config.num_hidden_layers} layers")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def load_processor(path):
    """What a user builds for the hub checkpoint (no processor_config.json there)."""
    from transformers import (
        AutoConfig,
        LlamaTokenizerFast,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    if os.path.exists(os.path.join(path, "processor_config.json")):
        return VideoLlavaProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    image_processor = VideoLlavaImageProcessor.from_pretrained(path)
    ip = image_processor.to_dict()
    video_processor = VideoLlavaVideoProcessor(
        size=ip["size"], crop_size=ip["crop_size"], image_mean=ip["image_mean"], image_std=ip["image_std"]
    )
    return VideoLlavaProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=LlamaTokenizerFast.from_pretrained(path),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )


def decode_video(path, num_frames):
    """PyAV, stream order, the seed's uniform sampling (np.arange(0, total, total / N).astype(int))."""
    import av
    import numpy as np

    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    total = len(frames)
    idx = np.arange(0, total, total / num_frames).astype(int)[:num_frames]
    return np.stack([frames[i] for i in idx]), total


def run(args):
    import torch

    torch.set_num_threads(args.threads)
    from transformers import VideoLlavaForConditionalGeneration
    import transformers

    dtype = getattr(torch, args.dtype)
    res = {
        "model": os.path.abspath(args.model),
        "video": os.path.abspath(args.video),
        "dtype": args.dtype,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "stages": {},
    }
    st = res["stages"]

    def stage(name, t0, **extra):
        st[name] = dict(seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb(), **extra)

    t0 = time.perf_counter()
    model = VideoLlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval()
    processor = load_processor(args.model)
    stage("load", t0, attn_implementation=model.config._attn_implementation)

    t0 = time.perf_counter()
    frames, total = decode_video(args.video, args.num_frames)
    stage("decode", t0, frames_in_file=total, frames=list(frames.shape))

    prompt = args.prompt if "<video>" in args.prompt else f"USER: <video>\n{args.prompt} ASSISTANT:"
    res["prompt"] = prompt
    t0 = time.perf_counter()
    inputs = processor(text=[prompt], videos=[frames], return_tensors="pt")
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    stage("preprocess", t0, prompt_tokens=int(inputs["input_ids"].shape[1]))

    with torch.inference_mode():
        t0 = time.perf_counter()
        model.model.get_video_features(inputs["pixel_values_videos"])
        stage("vision", t0)
        if args.vision_only:
            # The towers again (warm: oneDNN's kernels chosen, weights in cache), the median kept.
            times = []
            for _ in range(args.vision_repeat):
                t0 = time.perf_counter()
                model.model.get_video_features(inputs["pixel_values_videos"])
                times.append(time.perf_counter() - t0)
            st["vision_warm"] = dict(seconds=sorted(times)[len(times) // 2], runs=times, peak_rss_mb=peak_rss_mb())
            print(json.dumps({k: v["seconds"] for k, v in st.items()}))
            write_json(args.json, res)
            return res

        # Prefill: the whole prompt, towers included, with the cache on; the first token is its argmax.
        t0 = time.perf_counter()
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        next_tok = out.logits[:, -1].float().argmax(-1, keepdim=True)
        stage("prefill", t0, tokens=int(inputs["input_ids"].shape[1]))
        pkv, mask, new = out.past_key_values, inputs["attention_mask"], [int(next_tok)]

        # Decode: greedy steps on the cache (as generate does; EOS suppressed so every step runs).
        t0 = time.perf_counter()
        for _ in range(args.max_new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            out = model(input_ids=next_tok, attention_mask=mask, past_key_values=pkv, use_cache=True)
            logits = out.logits[:, -1].float()
            logits[:, 2] = -float("inf")
            next_tok = logits.argmax(-1, keepdim=True)
            pkv = out.past_key_values
            new.append(int(next_tok))
        steps = args.max_new_tokens - 1
        dt = time.perf_counter() - t0
        stage("decode_steps", t0, steps=steps, tokens_per_s=steps / dt if dt > 0 and steps else None)
    res["new_tokens"] = new
    res["peak_rss_mb"] = peak_rss_mb()

    if args.check_generate:
        with torch.inference_mode():
            g = model.generate(**inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                               do_sample=False)
        gen = g[0, inputs["input_ids"].shape[1]:].tolist()
        res["generate_matches"] = gen == new
        if gen != new:
            res["generate_tokens"] = gen

    print(f"transformers {transformers.__version__} torch {torch.__version__} {args.dtype} threads={args.threads} "
          f"prompt tokens {st['preprocess']['prompt_tokens']}")
    print(f"{'stage':<14}{'seconds':>10}{'peak RSS MB':>14}  extra")
    for name, v in st.items():
        extra = {k: x for k, x in v.items() if k not in ("seconds", "peak_rss_mb")}
        print(f"{name:<14}{v['seconds']:>10.3f}{v['peak_rss_mb']:>14.0f}  {json.dumps(extra)}")
    print(f"time to first token (prefill) {st['prefill']['seconds']:.3f} s; decode "
          f"{st['decode_steps']['tokens_per_s'] or 0:.2f} tokens/s; peak RSS {res['peak_rss_mb']:.0f} MB")
    if "generate_matches" in res:
        print("generate() gives the same tokens:", res["generate_matches"])
    write_json(args.json, res)
    return res


def write_json(path, res):
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    m.add_argument("--shapes", default="7b", choices=sorted(SHAPES))
    m.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    m.add_argument("--max-shard-gb", type=float, default=5.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--lm-head-std", type=float, default=0.02,
                   help="std of the LM head's random weights; larger makes next-token distributions "
                        "peaked (decided), which quantization-quality measurements need")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--video", required=True)
    r.add_argument("--prompt", required=True)
    r.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--max-new-tokens", type=int, default=16)
    r.add_argument("--num-frames", type=int, default=8)
    r.add_argument("--json", default=None)
    r.add_argument("--vision-only", action="store_true",
                   help="stop after the vision towers, timed once cold and --vision-repeat times warm")
    r.add_argument("--vision-repeat", type=int, default=3)
    r.add_argument("--check-generate", action="store_true", help="also run generate() and compare the tokens")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
