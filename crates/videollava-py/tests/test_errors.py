"""Bad input raises Python exceptions carrying the engine's message (the CLI prints the same)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CHECKPOINTS, MEDIA, MODEL, run_cli

import videollava
from videollava import FileError, InputError, MediaError, VideoLlava, VideoLlavaError

VIDEO = str(MEDIA / "clip.mp4")
IMAGE = str(MEDIA / "landscape.png")


def cli_error(*args: str) -> str:
    proc = run_cli(["generate", "--model", str(MODEL), "--dtype", "f32", "--max-new-tokens", "2", *args], check=False)
    assert proc.returncode != 0
    return proc.stderr


def test_a_missing_file_raises_file_error_with_the_cli_message(model: VideoLlava, tmp_path):
    missing = str(tmp_path / "nope.mp4")
    with pytest.raises(FileError) as e:
        model.generate("Why?", video=missing)
    assert isinstance(e.value, OSError) and isinstance(e.value, VideoLlavaError)
    assert missing in str(e.value)
    assert str(e.value) in cli_error("--prompt", "Why?", "--video", missing)


def test_undecodable_media_raise_media_error(model: VideoLlava, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(MediaError) as e:
        model.generate("What?", image=str(junk))
    assert str(e.value) in cli_error("--prompt", "What?", "--image", str(junk))
    with pytest.raises(MediaError, match="image #1"):
        model.generate("What?", image=b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(MediaError, match="video #1"):
        model.generate("What?", video=b"not a video")
    with pytest.raises(ValueError):  # MediaError is a ValueError too
        model.generate("What?", image=b"")


def test_bad_arrays_raise(model: VideoLlava):
    with pytest.raises(MediaError, match=r"shape \(H, W, 3\)"):
        model.generate("What?", image=np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(MediaError, match=r"shape \(T, H, W, 3\)"):
        model.generate("What?", video=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(MediaError, match="no pixels"):
        model.generate("What?", image=np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(MediaError, match="frames"):
        model.generate("What?", video=[])
    with pytest.raises(MediaError, match="frames must share one size"):
        model.generate("What?", video=[np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)])
    with pytest.raises(MediaError, match="over the limit"):
        model.generate("What?", image=np.broadcast_to(np.zeros(3, np.uint8), (20000, 1, 3)))
    with pytest.raises(TypeError, match="uint8"):
        model.generate("What?", image=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="expected a path"):
        model.generate("What?", image=12)


def test_prompts_and_media_that_do_not_fit_raise_input_error(model: VideoLlava):
    raw = "USER: <image> <image>\nWhat? ASSISTANT:"
    with pytest.raises(InputError, match="2 <image> placeholders but 1 image was given") as e:
        model.generate(raw, image=IMAGE)
    assert str(e.value) in cli_error("--raw-prompt", "--prompt", raw, "--image", IMAGE)
    with pytest.raises(InputError, match="entries in `videos` for 2 prompts"):
        model.generate_batch(["a", "b"], videos=[VIDEO])
    with pytest.raises(TypeError, match="not both"):
        model.generate("What?", image=IMAGE, images=[IMAGE])


def test_bad_settings_raise_input_error(model: VideoLlava):
    with pytest.raises(InputError, match="temperature must be >= 0"):
        model.generate("Hi", temperature=-1.0)
    with pytest.raises(InputError, match="top_p must be in"):
        model.generate("Hi", temperature=1.0, top_p=0.0)
    with pytest.raises(InputError, match="max_new_tokens must be >= 0"):
        model.generate("Hi", max_new_tokens=-3)
    with pytest.raises(InputError, match="frame sampling"):
        videollava.load_video(VIDEO, frame_sampling="random")
    with pytest.raises(InputError, match="num_frames"):
        videollava.load_video(VIDEO, num_frames=0)


def test_stream_raises_on_bad_input_before_iterating(model: VideoLlava):
    with pytest.raises(InputError):
        model.stream("Hi", temperature=-1.0)
    stream = model.stream("USER: <video>\nWhat? ASSISTANT:", raw_prompt=True)  # no video given
    with pytest.raises(InputError, match="1 <video> placeholder but no video was given"):
        next(stream)


def test_loading_errors_raise(tmp_path):
    with pytest.raises(InputError, match="unknown dtype"):
        VideoLlava.from_pretrained(MODEL, dtype="f8")
    with pytest.raises(VideoLlavaError, match="q4"):
        VideoLlava.from_pretrained(MODEL, quantize="nf3")
    with pytest.raises(VideoLlavaError):
        VideoLlava.from_pretrained(tmp_path)  # an empty folder is no checkpoint
    # A processor needs no weights; a checkpoint folder without weights cannot load as a model.
    with pytest.raises(VideoLlavaError):
        VideoLlava.from_pretrained(CHECKPOINTS / "tiny-llama")
