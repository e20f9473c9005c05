"""Tiny random-weight Video-LLaVA checkpoints and transformers' forward/generate outputs on them.

Writes, under --out (crates/videollava/tests/fixtures):
  checkpoints/model-llama/               Llama GQA, strategy default, layer -2, F32 model.safetensors
                                         (on-disk names exactly as 4.57 `save_pretrained` writes them)
  checkpoints/model-mistral-full/        Mistral, sliding_window 64, strategy full, layer -1, rope_theta 1e6,
                                         no processor_config.json
  checkpoints/model-llama-5x/            Llama, vision_feature_layer [-2, -3], linear rope scaling x2;
                                         config.json and weight names rewritten in the transformers 5.x spelling
  checkpoints/model-llama-bf16-sharded/  like model-llama, bf16, sharded (index + >= 3 shards)
  model/<variant>-<case>.safetensors     inputs and outputs of one float32 forward (see below)
  model/<variant>-greedy.json            greedy `generate` ids and chosen-token logprobs

Each model/<variant>-<case>.safetensors holds
  inputs : input_ids, attention_mask, position_ids, labels (I64 [B, L]),
           pixel_values_images (F32 [N, 3, H, W]), pixel_values_videos (F32 [M, T, 3, H, W]) when present
  outputs: logits (F32 [B, L, V]), loss (F32 []), image_features (F32 [N, tokens, D]),
           video_features (F32 [M*T, tokens, D]), hidden_states (F32 [layers + 1, B, L, D]; the last
           entry is AFTER the final RMSNorm, as transformers returns it), vision_hidden_states_images
           (F32 [vision layers + 1, N, patches + 1, vision D]; entry 0 is after pre_layrnorm)
  metadata: {"meta": JSON string with checkpoint, case, prompts, notes}

The forward runs in float32, eval, no_grad, default attention (sdpa), with
position_ids = cumsum(attention_mask) - 1, pads filled with 1 (what 4.57 `generate` builds), and
labels = input_ids with -100 at pads, at <image>/<video> placeholders and at each row's first real token.
The loss is transformers' own (`ForCausalLMLoss`: fp32 logits, labels shifted by one, mean over the
labels that are not -100, no attention-mask filtering).

    python scripts/reference/model_fixtures.py --out crates/videollava/tests/fixtures
"""

import argparse
import copy
import glob
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file

import checkpoints

IMAGE_ID, VIDEO_ID, PAD_ID = checkpoints.IMAGE_ID, checkpoints.VIDEO_ID, checkpoints.PAD_ID
SEED = 1234
NUM_FRAMES = 8

# name -> dict(text type, text kwargs, VideoLlavaConfig kwargs, processor_config.json?, dtype, shard, 5.x rewrite)
VARIANTS = {
    "model-llama": dict(
        text="llama",
        text_kwargs=checkpoints.TINY_LLAMA,
        top=dict(vision_feature_select_strategy="default", vision_feature_layer=-2),
        processor_config=True,
        dtype="float32",
        shard=None,
        rewrite_5x=False,
    ),
    "model-mistral-full": dict(
        text="mistral",
        text_kwargs=checkpoints.TINY_MISTRAL,  # sliding_window 64, rope_theta 1e6
        top=dict(vision_feature_select_strategy="full", vision_feature_layer=-1),
        processor_config=False,
        dtype="float32",
        shard=None,
        rewrite_5x=False,
    ),
    "model-llama-5x": dict(
        text="llama",
        text_kwargs=dict(checkpoints.TINY_LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        top=dict(vision_feature_select_strategy="default", vision_feature_layer=[-2, -3]),
        processor_config=True,
        dtype="float32",
        shard=None,
        rewrite_5x=True,
    ),
    "model-llama-bf16-sharded": dict(
        text="llama",
        text_kwargs=checkpoints.TINY_LLAMA,
        top=dict(vision_feature_select_strategy="default", vision_feature_layer=-2),
        processor_config=True,
        dtype="bfloat16",
        shard=150_000,  # bytes; gives >= 3 shards for the ~0.5 MB bf16 model
        rewrite_5x=False,
    ),
}

MULTI_TURN = "USER: <image>\nWhat is this? ASSISTANT: A car.</s>USER: <video>\nAnd this? ASSISTANT:"

# case -> (prompts, images (media file names), number of videos)
CASES = {
    "image": (["USER: <image>\nWhat is shown in this picture? ASSISTANT:"], ["landscape.png"], 0),
    "video": (["USER: <video>\nWhy is this video funny? ASSISTANT:"], [], 1),
    "image_video": ([MULTI_TURN], ["portrait.jpg"], 1),
    # Left padding: the image row is ~120 tokens shorter than the video row.
    "batch": (
        ["USER: <image>\nDescribe it. ASSISTANT:", "USER: <video>\nWhat happens in this video, and why? ASSISTANT:"],
        ["landscape.png"],
        1,
    ),
}
GREEDY_CASES = ("image", "video", "image_video", "batch")


# ---------------------------------------------------------------------------------------------- weights


def redraw_(model, seed):
    """Re-draw every parameter so that logits vary meaningfully (default init is ~N(0, 0.02), zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(s in name for s in ("norm", "layrnorm", "layer_norm"))
            if is_norm and leaf == "weight":
                new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif leaf == "bias":
                new = 0.05 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name or "lm_head" in name or "embedding" in name:
                new = 0.2 * torch.randn(p.shape, generator=g)
            else:
                new = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(new.to(p.dtype))


def rename_5x(name):
    for old, new in (
        ("image_tower.vision_model.", "model.image_tower."),
        ("video_tower.vision_model.", "model.video_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
    ):
        if name.startswith(old):
            return new + name[len(old):]
    raise ValueError(f"unexpected weight name {name}")


def config_5x(cfg):
    """4.57 config.json dict -> the transformers 5.x spelling."""
    cfg = copy.deepcopy(cfg)

    def fix_dtype(d):
        if "torch_dtype" in d:
            d["dtype"] = d.pop("torch_dtype")

    fix_dtype(cfg)
    for sub in ("text_config", "vision_config"):
        fix_dtype(cfg[sub])
    tc = cfg["text_config"]
    theta = tc.pop("rope_theta", 10000.0)
    scaling = tc.pop("rope_scaling", None) or {"rope_type": "default"}
    scaling = dict(scaling)
    scaling.pop("type", None)
    tc["rope_parameters"] = dict(scaling, rope_theta=theta)
    cfg["image_token_id"] = cfg.pop("image_token_index")
    cfg["video_token_id"] = cfg.pop("video_token_index")
    cfg.pop("ignore_index", None)
    return dict(sorted(cfg.items()))


def write_variant(ckpt_root, name, spec, work):
    """Writes checkpoints/<name>; returns (final dir, dir transformers 4.57 loads, in-memory f32 model)."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    # Config, generation config, tokenizer, preprocessor (and processor) files as checkpoints.py writes them.
    checkpoints.VARIANTS[name] = (spec["text"], spec["text_kwargs"], spec["top"], spec["processor_config"])
    path = checkpoints.write_checkpoint(ckpt_root, name)
    for f in glob.glob(os.path.join(path, "model*.safetensors*")):
        os.remove(f)
    config = VideoLlavaConfig.from_pretrained(path)
    if spec["dtype"] != "float32":
        # 4.57 writes this as "dtype"; spell it "torch_dtype" as the hub checkpoint's config.json does.
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        cfg["torch_dtype"] = spec["dtype"]
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(dict(sorted(cfg.items())), f, indent=2, sort_keys=True)
            f.write("\n")

    torch.manual_seed(SEED)
    model = VideoLlavaForConditionalGeneration(config).eval()
    redraw_(model, SEED)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr(), "lm_head tied"

    tmp = os.path.join(work, name + "-save")
    if spec["dtype"] == "bfloat16":
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp, max_shard_size=spec["shard"])
    else:
        model.save_pretrained(tmp)
    weights = sorted(glob.glob(os.path.join(tmp, "model*.safetensors*")))

    if spec["rewrite_5x"]:
        # The loadable 4.57 copy lives in work/; the committed one gets the 5.x names and config spelling.
        load_dir = os.path.join(work, name + "-457")
        shutil.copytree(path, load_dir)
        for f in weights:
            shutil.copy(f, load_dir)
        (single,) = weights
        tensors = load_torch_file(single)
        save_torch_file({rename_5x(k): v.contiguous() for k, v in tensors.items()},
                        os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        cfg = config_5x(cfg)
        cfg["dtype"] = "float32"  # 5.x writes the dtype key
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    else:
        for f in weights:
            shutil.copy(f, path)
        load_dir = path
    return path, load_dir, model


# ---------------------------------------------------------------------------------------------- inputs


def video_frames(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (NUM_FRAMES, 36, 48, 3), dtype=np.uint8)


def build_inputs(load_dir, media, case):
    prompts, images, n_videos = CASES[case]
    proc = checkpoints.load_processor(load_dir)
    assert proc.tokenizer.padding_side == "left"
    pil = [Image.open(os.path.join(media, p)) for p in images]
    vids = [video_frames(100 + i) for i in range(n_videos)]
    enc = proc(text=prompts, images=pil or None, videos=vids or None, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    if pil:
        inputs["pixel_values_images"] = enc["pixel_values_images"].float()
    if vids:
        # Pillow image processor frame by frame (reference-spec, "The oracle"), not the torchvision video path.
        pv = proc.image_processor(images=None, videos=vids, return_tensors="pt")["pixel_values_videos"]
        inputs["pixel_values_videos"] = pv.float()
    return prompts, inputs


def positions_and_labels(inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    position_ids = mask.cumsum(-1) - 1
    position_ids.masked_fill_(mask == 0, 1)
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[(ids == IMAGE_ID) | (ids == VIDEO_ID)] = -100
    first = mask.argmax(-1)  # first real token of each row (BOS)
    labels[torch.arange(ids.shape[0]), first] = -100
    labels[:, 0] = -100
    return position_ids, labels


# ---------------------------------------------------------------------------------------------- run


def forward(model, inputs, position_ids, labels):
    with torch.no_grad():
        return model(**inputs, position_ids=position_ids, labels=labels, output_hidden_states=True)


def manual_loss(logits, labels):
    lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    lb = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100, reduction="mean")


def run_case(model, name, load_dir, media, case, notes, checks):
    prompts, inputs = build_inputs(load_dir, media, case)
    position_ids, labels = positions_and_labels(inputs)
    out = forward(model, inputs, position_ids, labels)
    mask = inputs["attention_mask"].bool()

    assert torch.isfinite(out.logits).all()
    ml = manual_loss(out.logits, labels)
    checks["loss_vs_manual"] = max(checks.get("loss_vs_manual", 0.0), abs(ml.item() - out.loss.item()))

    # hidden_states[-1] is the final-norm output (what lm_head sees)?
    lm = model.model.language_model
    checks["last_hidden_is_normed"] = bool(torch.allclose(model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-5))

    # Without explicit position_ids a padded row gets arange positions (ignores left padding).
    if not mask.all():
        with torch.no_grad():
            noposn = model(**inputs).logits
        checks["no_position_ids_padded_row_maxdiff"] = float((noposn - out.logits)[mask].abs().max())

    t = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "position_ids": position_ids,
        "labels": labels,
        "logits": out.logits,
        "loss": out.loss.reshape(()),
        "hidden_states": torch.stack(out.hidden_states),
    }
    if "pixel_values_images" in inputs:
        t["pixel_values_images"] = inputs["pixel_values_images"]
        t["image_features"] = out.image_hidden_states
        with torch.no_grad():
            vh = model.model.image_tower(inputs["pixel_values_images"], output_hidden_states=True).hidden_states
            ref = model.model.get_image_features(inputs["pixel_values_images"])
        checks["image_features_vs_get"] = max(checks.get("image_features_vs_get", 0.0),
                                              float((ref - out.image_hidden_states).abs().max()))
        t["vision_hidden_states_images"] = torch.stack(vh)
    if "pixel_values_videos" in inputs:
        t["pixel_values_videos"] = inputs["pixel_values_videos"]
        t["video_features"] = out.video_hidden_states
    arrays = {k: v.detach().cpu().contiguous().numpy().copy() for k, v in t.items()}
    for k, v in arrays.items():
        if v.dtype.kind == "f":
            arrays[k] = v.astype(np.float32)
        else:
            arrays[k] = v.astype(np.int64)
    meta = {"checkpoint": name, "case": case, "prompts": prompts, "notes": notes}
    return inputs, out, arrays, json.dumps(meta, sort_keys=True)


def greedy(model, inputs):
    with torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
    L = inputs["input_ids"].shape[1]
    new = g.sequences[:, L:]
    logprobs, margins = [], []
    for step, s in enumerate(g.scores):
        lp = torch.log_softmax(s.float(), -1)
        logprobs.append(lp.gather(-1, new[:, step : step + 1])[:, 0])
        top2 = lp.topk(2, -1).values
        margins.append(top2[:, 0] - top2[:, 1])
    return new.tolist(), torch.stack(logprobs, 1).tolist(), torch.stack(margins, 1).tolist()


def variant_checks(model, name, spec, load_dir, media, checks):
    """The sliding window and the rope scaling must change the logits (i.e. they are really in effect)."""
    from transformers import VideoLlavaForConditionalGeneration

    _, inputs = build_inputs(load_dir, media, "image_video")
    pos, lab = positions_and_labels(inputs)
    base = forward(model, inputs, pos, lab).logits
    cfg = copy.deepcopy(model.config)
    if spec["text"] == "mistral":
        cfg.text_config.sliding_window = None
        key = "sliding_window_off_diff_first64_vs_after"
    elif cfg.text_config.rope_scaling:
        cfg.text_config.rope_scaling = None
        key = "rope_scaling_off_diff"
    else:
        return
    other = VideoLlavaForConditionalGeneration(cfg).eval()
    other.load_state_dict(model.state_dict(), strict=False)
    diff = (forward(other, inputs, pos, lab).logits - base).abs()
    w = getattr(model.config.text_config, "sliding_window", None) or 0
    checks[key] = [float(diff[:, :w].max()) if w else 0.0, float(diff[:, w:].max())]


def max_diff_masked(a, b, mask):
    return float((a - b)[mask].abs().max())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", default=None, help="variants to write (default: all)")
    args = ap.parse_args()

    from transformers import VideoLlavaForConditionalGeneration

    torch.use_deterministic_algorithms(True)
    ckpt_root = os.path.join(args.out, "checkpoints")
    model_dir = os.path.join(args.out, "model")
    media = os.path.join(args.out, "media")
    os.makedirs(model_dir, exist_ok=True)

    for name, spec in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as work:
            path, load_dir, mem_model = write_variant(ckpt_root, name, spec, work)
            # The expected outputs come from the checkpoint as transformers loads it back, in float32
            # (for bf16 that is the bf16-rounded weights upcast).
            model, info = VideoLlavaForConditionalGeneration.from_pretrained(
                load_dir, dtype=torch.float32, output_loading_info=True)
            model.eval()
            assert not any(info.values()), f"{name}: loading info {info}"
            eager = VideoLlavaForConditionalGeneration.from_pretrained(
                load_dir, dtype=torch.float32, attn_implementation="eager").eval()
            print(f"{name}: attn {model.config._attn_implementation}, "
                  f"files {sorted(os.listdir(path))}")
            if spec["dtype"] == "bfloat16":
                # Round the parameters only (`.to(bf16)` would also round the rotary inv_freq buffer).
                mem_model = copy.deepcopy(mem_model)
                with torch.no_grad():
                    for p in mem_model.parameters():
                        p.copy_(p.to(torch.bfloat16).to(torch.float32))
            notes = (
                f"transformers 4.57.6, float32, sdpa, {spec['dtype']} checkpoint; position_ids = cumsum(mask)-1 "
                "with pads 1; labels -100 at pads, placeholders and first real token; loss = transformers "
                "ForCausalLMLoss (mean over shifted non -100 labels, no mask filtering); hidden_states[-1] is "
                "after the final norm; video pixels from the Pillow image processor frame by frame; logits and hidden "
                "states at pad positions are implementation-defined (torch sdpa gives a zero attention output for "
                "a fully masked query row, eager a uniform average): compare only where attention_mask == 1"
            )
            checks = {}
            greedy_out = {
                "checkpoint": name,
                "max_new_tokens": 8,
                "notes": "model.generate(input_ids, attention_mask, pixel values as stored in "
                         "model/<checkpoint>-<case>.safetensors, max_new_tokens=8, do_sample=False); float32, "
                         "sdpa; generate builds position_ids = cumsum(mask)-1 (pads 1) itself; logprobs = "
                         "log_softmax(scores) in f32 of the chosen token; ids >= 803 are unused padded vocab rows",
                "cases": {},
            }
            for case in CASES:
                inputs, out, arrays, meta = run_case(model, name, load_dir, media, case, notes, checks)
                pos, lab = torch.from_numpy(arrays["position_ids"]), torch.from_numpy(arrays["labels"])
                mask = inputs["attention_mask"].bool()
                mem = forward(mem_model, inputs, pos, lab)
                checks["reload_vs_memory"] = max(checks.get("reload_vs_memory", 0.0),
                                                 float((mem.logits - out.logits).abs().max()))
                ea = forward(eager, inputs, pos, lab)
                checks["eager_vs_sdpa_real"] = max(checks.get("eager_vs_sdpa_real", 0.0),
                                                   max_diff_masked(ea.logits, out.logits, mask))
                if not mask.all():
                    checks["eager_vs_sdpa_pad"] = max(checks.get("eager_vs_sdpa_pad", 0.0),
                                                      max_diff_masked(ea.logits, out.logits, ~mask))
                fn = os.path.join(model_dir, f"{name}-{case}.safetensors")
                save_file(arrays, fn, metadata={"meta": meta})
                print(f"  {case}: L={arrays['input_ids'].shape} loss={float(arrays['loss']):.4f} "
                      f"logits std={arrays['logits'].std():.3f} {os.path.getsize(fn)} B")
                if case in GREEDY_CASES:
                    ids, lps, margins = greedy(model, inputs)
                    greedy_out["cases"][case] = {
                        "prompts": CASES[case][0],
                        "prompt_length": int(inputs["input_ids"].shape[1]),
                        "new_tokens": ids,
                        "logprobs": lps,
                        "top1_minus_top2_logprob": margins,
                    }
            variant_checks(model, name, spec, load_dir, media, checks)
            with open(os.path.join(model_dir, f"{name}-greedy.json"), "w") as f:
                json.dump(greedy_out, f, indent=1, sort_keys=True)
                f.write("\n")
            print("  checks:", json.dumps(checks, sort_keys=True))


if __name__ == "__main__":
    main()
