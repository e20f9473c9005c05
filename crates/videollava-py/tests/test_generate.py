"""`VideoLlava.generate` / `stream` / `generate_batch` against the CLI and transformers."""

from __future__ import annotations

import gc
import json
import threading
import time

import numpy as np
import pytest

from conftest import FIXTURES, MEDIA, cli_generate, read_safetensors

import videollava
from videollava import GenerationOutput, VideoLlava

VIDEO = str(MEDIA / "clip.mp4")
IMAGE = str(MEDIA / "landscape.png")

CASES = [
    ("Why is this video funny?", None, VIDEO),
    ("What is shown in this picture?", IMAGE, None),
    ("Tell me a joke about rabbits.", None, None),
    # Already in the chat format: used verbatim.
    ("USER: <image>\nWhat is shown in this picture? ASSISTANT:", IMAGE, None),
    # Placeholders placed by the user: wrapped as they are.
    ("<video>\nDescribe the clip.", None, VIDEO),
]


@pytest.mark.parametrize("prompt,image,video", CASES)
def test_generate_equals_the_cli_token_for_token(model: VideoLlava, prompt, image, video):
    want = cli_generate(prompt, image=image, video=video, max_new_tokens=12)
    got = model.generate(prompt, image=image, video=video, max_new_tokens=12)
    assert got.token_ids == want["token_ids"]
    assert got.text == want["text"]
    assert got.finish_reason == want["finish_reason"]
    assert got.prompt_tokens == want["prompt_tokens"]
    assert len(got.logprobs) == len(want["logprobs"])
    for a, b in zip(got.logprobs, want["logprobs"]):
        assert abs(a - b) <= 1e-5
    assert set(got.timings) == {"load", "media", "preprocess", "vision", "prefill", "decode"}


def test_sampled_generation_equals_the_cli(model: VideoLlava):
    extra = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "7", "--stop", "zzz"]
    want = cli_generate("Why is this video funny?", video=VIDEO, max_new_tokens=10, extra=extra)
    got = model.generate(
        "Why is this video funny?", video=VIDEO, max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=7,
        stop="zzz",
    )
    assert got.token_ids == want["token_ids"]
    assert got.text == want["text"]


def reference_frames(seed: int) -> np.ndarray:
    """The synthetic clip `scripts/reference/model_fixtures.py` gave transformers."""
    return np.random.default_rng(seed).integers(0, 256, (8, 36, 48, 3), dtype=np.uint8)


def test_greedy_ids_equal_transformers_generate(model: VideoLlava):
    """The cases of `model/model-llama-greedy.json` (transformers' `generate`, float32)."""
    cases = json.loads((FIXTURES / "model" / "model-llama-greedy.json").read_text())
    n = cases["max_new_tokens"]
    # The numpy clip is the one transformers saw: its pixel values equal the stored ones.
    stored, _ = read_safetensors(FIXTURES / "model" / "model-llama-video.safetensors")
    frames = reference_frames(100)
    pixels = model.processor(text="USER: <video>\nHi ASSISTANT:", videos=frames)["pixel_values_videos"]
    assert float(np.abs(pixels - stored["pixel_values_videos"]).max()) <= 1e-5
    for name, media in (
        ("video", {"video": frames}),
        ("image", {"image": IMAGE}),
        ("image_video", {"image": str(MEDIA / "portrait.jpg"), "video": frames}),
    ):
        case = cases["cases"][name]
        out = model.generate(case["prompts"][0], raw_prompt=True, max_new_tokens=n, **media)
        assert out.token_ids == case["new_tokens"][0], name
        assert out.prompt_tokens == case["prompt_length"], name
        for a, b in zip(out.logprobs, case["logprobs"][0]):
            assert abs(a - b) <= 1e-4, name
    case = cases["cases"]["batch"]
    outs = model.generate_batch(
        case["prompts"], images=[IMAGE, None], videos=[None, frames], raw_prompt=True, max_new_tokens=n
    )
    assert [o.token_ids for o in outs] == case["new_tokens"]


def test_stream_concatenates_to_the_answer(model: VideoLlava):
    want = model.generate("Why is this video funny?", video=VIDEO, max_new_tokens=24, ignore_eos=True)
    stream = model.stream("Why is this video funny?", video=VIDEO, max_new_tokens=24, ignore_eos=True)
    assert stream.output is None
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == want.text
    assert stream.output is not None
    assert stream.output.token_ids == want.token_ids
    assert stream.output.text == want.text
    # Closing a finished stream changes nothing.
    stream.close()
    assert not stream.cancelled
    assert stream.output.token_ids == want.token_ids


# Far more tokens than an abandoned stream may cost: the text prompt leaves ~4000 of the
# checkpoint's 4096 positions, so without a cancellation the worker would generate them all.
LONG = 3500
TEXT = "Tell me a joke about rabbits."


def _leave_by_break(model: VideoLlava) -> None:
    for _piece in model.stream(TEXT, max_new_tokens=LONG, ignore_eos=True):
        break


def _leave_by_del(model: VideoLlava) -> None:
    stream = model.stream(TEXT, max_new_tokens=LONG, ignore_eos=True)
    next(stream)
    del stream


def _leave_to_the_garbage_collector(model: VideoLlava) -> None:
    stream = model.stream(TEXT, max_new_tokens=LONG, ignore_eos=True)
    next(stream)
    stream.cycle = stream  # only the cycle collector can free it
    del stream
    gc.collect()


def _leave_by_close(model: VideoLlava) -> None:
    stream = model.stream(TEXT, max_new_tokens=LONG, ignore_eos=True)
    next(stream)
    stream.close()
    assert stream.cancelled
    assert list(stream) == [] and stream.output is None


@pytest.mark.parametrize("leave", [_leave_by_break, _leave_by_del, _leave_to_the_garbage_collector, _leave_by_close])
def test_an_abandoned_stream_stops_generating(model: VideoLlava, leave):
    before = model.tokens_generated
    leave(model)
    # The next call needs the model, which the stream's worker holds until its generation ends:
    # once it returns, the counter holds every token the abandoned stream generated.
    out = model.generate(TEXT, max_new_tokens=2, ignore_eos=True)
    spent = model.tokens_generated - before - len(out.token_ids)
    assert len(out.token_ids) == 2
    # It stops at its first decode step after the drop: a few tokens past the first piece, far
    # from the LONG it was asked for.
    assert 1 <= spent <= LONG // 10, f"the abandoned stream generated {spent} of {LONG} tokens"


def test_generate_batch_equals_one_by_one(model: VideoLlava):
    prompts = ["Why is this video funny?", "What is shown in this picture?", "Tell me a joke."]
    outs = model.generate_batch(prompts, videos=[VIDEO, None, None], images=[None, IMAGE, None], max_new_tokens=8)
    assert len(outs) == 3
    for prompt, out, kw in zip(prompts, outs, [{"video": VIDEO}, {"image": IMAGE}, {}]):
        single = model.generate(prompt, max_new_tokens=8, **kw)
        assert out.prompt == single.prompt
        assert out.token_ids == single.token_ids, prompt
        assert out.text == single.text
    assert model.generate_batch([]) == []


def test_path_bytes_numpy_and_pil_inputs_give_the_same_answer(model: VideoLlava):
    from PIL import Image

    def answer(**media) -> GenerationOutput:
        return model.generate("Describe it.", max_new_tokens=10, **media)

    # Images: the engine's decoder equals Pillow's, so Pillow's own pixels must give the same answer.
    pil = Image.open(IMAGE)
    image_outs = [
        answer(image=IMAGE),
        answer(image=MEDIA / "landscape.png"),
        answer(image=open(IMAGE, "rb").read()),
        answer(image=np.asarray(pil.convert("RGB"))),
        answer(image=pil),
    ]
    assert all(o.token_ids == image_outs[0].token_ids for o in image_outs[1:])
    assert np.array_equal(videollava.load_image(IMAGE), np.asarray(pil.convert("RGB")))

    # Videos: the file's 8 chosen frames as an array, as a list of arrays and as PIL images.
    frames = videollava.load_video(VIDEO, num_frames=8)
    assert frames.shape[0] == 8 and frames.shape[3] == 3 and frames.dtype == np.uint8
    video_outs = [
        answer(video=VIDEO),
        answer(video=open(VIDEO, "rb").read()),
        answer(video=frames),
        answer(video=list(frames)),
        answer(video=[Image.fromarray(f) for f in frames]),
    ]
    assert all(o.token_ids == video_outs[0].token_ids for o in video_outs[1:])
    assert video_outs[0].token_ids != image_outs[0].token_ids


def test_the_gil_is_released_while_generating(model: VideoLlava):
    # A Python thread notes the time at every turn of a loop while a long generate runs. Were the
    # GIL held during the computation, the thread would stop for about the whole call (measured:
    # a gap of 99% of it); with the GIL released it keeps turning, its gaps a small fraction.
    stamps = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    t = threading.Thread(target=tick)
    t.start()
    try:
        while not stamps:
            time.sleep(0.001)
        start = time.perf_counter()
        model.generate("Why is this video funny?", video=VIDEO, max_new_tokens=1500, ignore_eos=True)
        end = time.perf_counter()
    finally:
        stop.set()
        t.join()
    inside = [start] + [s for s in stamps if start <= s <= end] + [end]
    longest = max(b - a for a, b in zip(inside, inside[1:]))
    assert longest < 0.5 * (end - start), f"the thread stood still {longest:.3f} s of a {end - start:.3f} s call"


def test_prompt_helper(model: VideoLlava):
    assert model.prompt("Hi?", videos=1) == "USER: <video>\nHi? ASSISTANT:"
    assert model.prompt("Hi?", images=2, videos=1) == "USER: <image>\n<image>\n<video>\nHi? ASSISTANT:"
    verbatim = "USER: <image>\nWhat? ASSISTANT:"
    assert model.prompt(verbatim, images=1) == verbatim
    out = model.generate("What is shown in this picture?", image=IMAGE, max_new_tokens=2)
    assert out.prompt == "USER: <image>\nWhat is shown in this picture? ASSISTANT:"


def test_top_logprobs_and_output_dict(model: VideoLlava):
    out = model.generate("Tell me a joke.", max_new_tokens=4, top_logprobs=3)
    assert len(out.top_logprobs) == len(out.token_ids)
    for token, alts in zip(out.token_ids, out.top_logprobs):
        assert len(alts) == 3
        assert alts[0][0] == token  # greedy: the chosen token is the most likely
        assert isinstance(alts[0][1], str)
    d = out.to_dict()
    assert d["token_ids"] == out.token_ids and d["text"] == out.text
    json.dumps(d)
