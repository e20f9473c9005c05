"""`Processor` against transformers' `VideoLlavaProcessor`: the committed fixtures of
`crates/videollava/tests/fixtures/processor` (made by `scripts/reference/processor_fixtures.py`).
Token ids and masks must be identical, pixel values within 1e-5 (as the Rust parity test)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CHECKPOINTS, FIXTURES, MEDIA, read_safetensors

import videollava
from videollava import Processor, VideoLlava

PIXEL_TOLERANCE = 1e-5
CASES = sorted((FIXTURES / "processor").glob("*.safetensors"))


def test_there_are_fixtures():
    assert len(CASES) >= 8


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_processor_equals_transformers(case):
    want, meta = read_safetensors(case)
    processor = Processor.from_pretrained(CHECKPOINTS / meta["checkpoint"])
    got = processor(
        text=json.loads(meta["prompts"]),
        images=[str(MEDIA / p) for p in json.loads(meta["images"])],
        videos=[str(MEDIA / p) for p in json.loads(meta["videos"])],
        num_frames=int(meta["num_frames"]),
        frame_sampling=meta["sampling"],
    )
    assert set(got) == set(want)
    for key in ("input_ids", "attention_mask"):
        assert got[key].dtype == np.int64 and got[key].shape == want[key].shape
        assert np.array_equal(got[key], want[key]), key
    for key in ("pixel_values_images", "pixel_values_videos"):
        if key in want:
            assert got[key].dtype == np.float32 and got[key].shape == want[key].shape, key
            diff = float(np.abs(got[key] - want[key]).max())
            assert diff <= PIXEL_TOLERANCE, f"{key}: max abs diff {diff}"


def test_model_processor_equals_the_standalone_processor(model: VideoLlava):
    video = str(MEDIA / "clip.mp4")
    text = ["USER: <video>\nWhy is this video funny? ASSISTANT:"]
    a = model.processor(text=text, videos=[video])
    b = Processor.from_pretrained(model.model_dir)(text=text, videos=[video])
    assert set(a) == {"input_ids", "attention_mask", "pixel_values_videos"}
    for k in a:
        assert np.array_equal(a[k], b[k])
    # The outputs are ordinary writable arrays, as transformers returns them.
    a["input_ids"][0, 0] = 0


def test_array_and_pil_inputs_equal_paths():
    from PIL import Image

    p = Processor.from_pretrained(CHECKPOINTS / "tiny-llama")
    image_path, video_path = str(MEDIA / "portrait.jpg"), str(MEDIA / "clip.mp4")
    text = "USER: <image>\n<video>\nWhat? ASSISTANT:"
    by_path = p(text=text, images=image_path, videos=video_path)
    frames = videollava.load_video(video_path)
    pil = Image.open(image_path)
    cases = [
        (np.asarray(pil.convert("RGB")), frames),  # one image, one video as arrays
        ([pil], [[Image.fromarray(f) for f in frames]]),  # lists of media; the video as PIL frames
        ([open(image_path, "rb").read()], [open(video_path, "rb").read()]),  # encoded bytes
    ]
    for images, videos in cases:
        got = p(text=[text], images=images, videos=videos)
        for k in by_path:
            assert np.array_equal(got[k], by_path[k]), k


def test_return_tensors_and_decode():
    p = Processor.from_pretrained(CHECKPOINTS / "tiny-llama")
    as_lists = p(text="USER: Hi ASSISTANT:", return_tensors=None)
    assert isinstance(as_lists["input_ids"], list)
    ids = as_lists["input_ids"][0]
    assert p.decode(ids) == "USER: Hi ASSISTANT:"
    assert p.batch_decode([ids], skip_special_tokens=False)[0].startswith("<s>")
    with pytest.raises(ValueError, match="return_tensors"):
        p(text="Hi", return_tensors="tf")
