"""Tiny Video-LLaVA checkpoints in the real Hugging Face layout, for tests.

Each checkpoint directory holds what `save_pretrained` writes: config.json, preprocessor_config.json,
(optionally) processor_config.json, generation_config.json and the project's own tokenizer files.
`--weights` also writes random weights (model.safetensors) through transformers itself.

    python scripts/reference/checkpoints.py --out crates/videollava/tests/fixtures/checkpoints
"""

import argparse
import os
import shutil
import tempfile

import make_tokenizer

# Ids of the added tokens in the project's tokenizer (make_tokenizer.py, vocab 800 + 3 added).
IMAGE_ID, VIDEO_ID, PAD_ID = 800, 801, 802
VOCAB = 832  # 803 padded to a multiple of 64, as the conversion script pads 32003 to 32064

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
    projection_dim=16,
)
TINY_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    pad_token_id=0,
)
TINY_MISTRAL = dict(TINY_LLAMA, sliding_window=64, rope_theta=1e6)

# name -> (text model_type, text kwargs, VideoLlavaConfig kwargs, write processor_config.json)
VARIANTS = {
    # processor_config.json present (patch 7, strategy default), GQA Llama.
    "tiny-llama": ("llama", TINY_LLAMA, dict(vision_feature_select_strategy="default", vision_feature_layer=-2), True),
    # hub-like: no processor_config.json; strategy full comes from config.json; Mistral.
    "tiny-mistral-full": (
        "mistral",
        TINY_MISTRAL,
        dict(vision_feature_select_strategy="full", vision_feature_layer=-1),
        False,
    ),
}

PREPROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})


def make_config(text_type, text_kwargs, top_kwargs):
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, VideoLlavaConfig

    text_cls = LlamaConfig if text_type == "llama" else MistralConfig
    return VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION).to_dict(),
        text_config=text_cls(**text_kwargs).to_dict(),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        pad_token_id=PAD_ID,
        vocab_size=VOCAB,
        image_seq_length=(28 // 7) ** 2,
        video_seq_length=((28 // 7) ** 2 + 1) * 8,
        **top_kwargs,
    )


def write_checkpoint(out_dir, name, weights=False, seed=0):
    from transformers import (
        GenerationConfig,
        LlamaTokenizerFast,
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    text_type, text_kwargs, top_kwargs, with_processor_config = VARIANTS[name]
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    config = make_config(text_type, text_kwargs, top_kwargs)
    config.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID).save_pretrained(path)

    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer.save(make_tokenizer.build(800, 0), tmp)
        tokenizer = LlamaTokenizerFast.from_pretrained(tmp)
    image_processor = VideoLlavaImageProcessor(**PREPROCESSOR)
    if with_processor_config:
        processor = VideoLlavaProcessor(
            image_processor=image_processor,
            video_processor=VideoLlavaVideoProcessor(**PREPROCESSOR),
            tokenizer=tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        processor.save_pretrained(path)
    else:
        image_processor.save_pretrained(path)
        tokenizer.save_pretrained(path)
    # Files we do not read; keep the fixture folder small and ours.
    for extra in ("video_preprocessor_config.json",):
        p = os.path.join(path, extra)
        if os.path.exists(p):
            os.remove(p)

    if weights:
        import torch

        torch.manual_seed(seed)
        model = VideoLlavaForConditionalGeneration(config).eval()
        model.save_pretrained(path)
    return path


def load_processor(path):
    """The processor transformers builds for a checkpoint directory (hub-like when no processor_config.json)."""
    from transformers import (
        AutoConfig,
        LlamaTokenizerFast,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    config = AutoConfig.from_pretrained(path)
    tokenizer = LlamaTokenizerFast.from_pretrained(path)
    image_processor = VideoLlavaImageProcessor.from_pretrained(path)
    if os.path.exists(os.path.join(path, "processor_config.json")):
        proc = VideoLlavaProcessor.from_pretrained(path)
        assert proc.patch_size is not None
        return proc
    return VideoLlavaProcessor(
        image_processor=image_processor,
        video_processor=VideoLlavaVideoProcessor(**PREPROCESSOR),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", action="store_true")
    args = ap.parse_args()
    for name in VARIANTS:
        print("wrote", write_checkpoint(args.out, name, weights=args.weights))


if __name__ == "__main__":
    main()
