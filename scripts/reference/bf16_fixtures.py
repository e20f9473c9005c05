"""Expected BF16 logits: transformers run in bfloat16 on a committed checkpoint and case.

Our BF16 compute path is checked against transformers' own BF16 run (not only against f32):
the bf16-sharded tiny checkpoint (weights stored in bfloat16, so both sides use the same
weights), the image + video case of model_fixtures.py (same input ids and pixel values), sdpa
attention, `dtype=torch.bfloat16`. Writes `model-bf16/<checkpoint>-<case>.safetensors` with
`logits` (f32 copies of transformers' bf16 logits) and `attention_mask`.

    python scripts/reference/bf16_fixtures.py --out crates/videollava/tests/fixtures
"""

import argparse
import os

import torch
from safetensors.numpy import load_file, save_file

CHECKPOINT = "model-llama-bf16-sharded"
CASE = "image_video"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import VideoLlavaForConditionalGeneration

    torch.use_deterministic_algorithms(True)
    case = load_file(os.path.join(args.out, "model", f"{CHECKPOINT}-{CASE}.safetensors"))
    model = VideoLlavaForConditionalGeneration.from_pretrained(
        os.path.join(args.out, "checkpoints", CHECKPOINT), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(case["input_ids"]),
            attention_mask=torch.from_numpy(case["attention_mask"]),
            position_ids=torch.from_numpy(case["position_ids"]),
            pixel_values_images=torch.from_numpy(case["pixel_values_images"]).to(torch.bfloat16),
            pixel_values_videos=torch.from_numpy(case["pixel_values_videos"]).to(torch.bfloat16),
        )
    assert out.logits.dtype == torch.bfloat16
    logits = out.logits.float().numpy()
    os.makedirs(os.path.join(args.out, "model-bf16"), exist_ok=True)
    fn = os.path.join(args.out, "model-bf16", f"{CHECKPOINT}-{CASE}.safetensors")
    meta = (f"transformers, dtype=bfloat16, {model.config._attn_implementation}; inputs of "
            f"{CHECKPOINT}-{CASE}.safetensors; logits are bf16 values stored as f32")
    save_file({"logits": logits, "attention_mask": case["attention_mask"]}, fn, metadata={"meta": meta})
    f32 = case["logits"]
    real = case["attention_mask"][0].astype(bool)
    d = abs(logits[0][real] - f32[0][real])
    print(f"{fn}: {os.path.getsize(fn)} B; transformers bf16 vs f32 at real positions: "
          f"max {d.max():.4f} mean {d.mean():.5f}")


if __name__ == "__main__":
    main()
