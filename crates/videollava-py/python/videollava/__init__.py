"""Video-LLaVA on a native Rust engine.

>>> from videollava import VideoLlava
>>> model = VideoLlava.from_pretrained("LanguageBind/Video-LLaVA-7B-hf", dtype="bf16", quantize="q4k")
>>> out = model.generate("Why is this video funny?", video="clip.mp4", max_new_tokens=60)
>>> print(out.text, out.token_ids, out.timings)
>>> for piece in model.stream("What happens next?", video="clip.mp4"):
...     print(piece, end="")
>>> inputs = model.processor(text=["USER: <video>\\nHi ASSISTANT:"], videos=["clip.mp4"])

Media are accepted as a path, the bytes of an encoded file, a numpy ``uint8`` array
(``H x W x 3`` for an image, ``T x H x W x 3`` for a video) or a PIL image; a video may also be
a list of frames (arrays or PIL images). Video files give ``num_frames`` frames chosen by
``frame_sampling``; frames given by the caller are the clip as they are.

The engine releases the GIL while it loads, decodes, preprocesses and generates. Errors are
:mod:`videollava.errors` exceptions carrying the engine's message.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from .errors import (
    CancelledError,
    ConfigError,
    FileError,
    InputError,
    MediaError,
    ModelError,
    OutputError,
    TokenizerError,
    VideoLlavaError,
)

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

__all__ = [
    "VideoLlava",
    "Processor",
    "GenerationOutput",
    "TextStream",
    "load_image",
    "load_video",
    "DEFAULT_MODEL",
    "VideoLlavaError",
    "InputError",
    "MediaError",
    "ConfigError",
    "TokenizerError",
    "ModelError",
    "FileError",
    "OutputError",
    "CancelledError",
]

__version__: str = _native.__version__

#: The checkpoint loaded when no model is named.
DEFAULT_MODEL: str = _native.DEFAULT_MODEL

PathLike = Union[str, "os.PathLike[str]"]
#: An image: a path, encoded bytes, an ``H x W x 3`` uint8 array or a PIL image.
ImageInput = Union[PathLike, bytes, bytearray, memoryview, np.ndarray, "PIL.Image.Image"]
#: A video: a path, encoded bytes, a ``T x H x W x 3`` uint8 array, or a list of frames.
VideoInput = Union[PathLike, bytes, bytearray, memoryview, np.ndarray, Sequence[Union[np.ndarray, "PIL.Image.Image"]]]

_MediaTuple = Tuple[str, Union[str, bytes], Tuple[int, ...]]


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "convert")


def _pixels(array: np.ndarray, what: str) -> _MediaTuple:
    if array.dtype != np.uint8:
        raise TypeError(f"{what}: a pixel array must have dtype uint8, got {array.dtype}")
    return ("pixels", np.ascontiguousarray(array).tobytes(), tuple(int(d) for d in array.shape))


def _encoded(x: Any) -> Optional[_MediaTuple]:
    if isinstance(x, (str, os.PathLike)):
        return ("path", os.fspath(x), ())
    if isinstance(x, (bytes, bytearray, memoryview)):
        return ("bytes", bytes(x), ())
    return None


def _image_tuple(x: Any, what: str) -> _MediaTuple:
    t = _encoded(x)
    if t is not None:
        return t
    if _is_pil(x):
        x = np.asarray(x.convert("RGB"))
    if isinstance(x, np.ndarray):
        return _pixels(x, what)
    raise TypeError(f"{what}: expected a path, bytes, a uint8 numpy array or a PIL image, got {type(x).__name__}")


def _video_tuple(x: Any, what: str) -> _MediaTuple:
    t = _encoded(x)
    if t is not None:
        return t
    if isinstance(x, np.ndarray):
        return _pixels(x, what)
    if isinstance(x, (list, tuple)):
        if len(x) > _native.MAX_FRAMES:
            raise MediaError(f"{what}: a clip must have 1..={_native.MAX_FRAMES} frames, got {len(x)}")
        frames = [np.asarray(f.convert("RGB")) if _is_pil(f) else f for f in x]
        for i, f in enumerate(frames):
            if not isinstance(f, np.ndarray):
                raise TypeError(f"{what}: frame {i} is a {type(f).__name__}, expected a numpy array or a PIL image")
            if f.shape != frames[0].shape:
                raise MediaError(f"{what}: frame {i} has shape {f.shape}, frame 0 {frames[0].shape}: frames must share one size")
        if not frames:
            return ("pixels", b"", (0, 0, 0, 3))
        return _pixels(np.stack(frames), what)
    raise TypeError(
        f"{what}: expected a path, bytes, a uint8 numpy array (T, H, W, 3) or a list of frames, got {type(x).__name__}"
    )


def _as_list(x: Any) -> List[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _one_or_many(one: Any, many: Optional[Sequence[Any]], name: str) -> List[Any]:
    if one is not None and many is not None:
        raise TypeError(f"give `{name}` or `{name}s`, not both")
    if one is not None:
        return [one]
    return list(many) if many is not None else []


def _array(triple: Tuple[bytearray, Sequence[int], str]) -> np.ndarray:
    data, shape, dtype = triple
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(tuple(shape))


def load_image(image: ImageInput) -> np.ndarray:
    """Decodes an image as the engine does (= ``PIL.Image.open(f).convert("RGB")``): ``H x W x 3`` uint8."""
    return _array(_native.load_image(_image_tuple(image, "image")))


def load_video(video: VideoInput, num_frames: int = 8, frame_sampling: str = "uniform") -> np.ndarray:
    """Decodes a video to the clip the engine uses: ``num_frames x H x W x 3`` uint8.

    ``frame_sampling`` is ``"uniform"`` (``np.arange(0, total, total / num_frames)``, the Hugging
    Face recipe) or ``"linspace"`` (``np.linspace(0, total - 1, num_frames)``).
    """
    array, _indices = _native.load_video(_video_tuple(video, "video"), num_frames, frame_sampling)
    return _array(array)


@dataclass(frozen=True)
class GenerationOutput:
    """The answer to one prompt."""

    #: The generated text, without special tokens, cut before a stop string.
    text: str
    #: The generated token ids (an EOS that ended the answer included, as transformers returns it).
    token_ids: List[int]
    #: The log-probability of each generated token.
    logprobs: List[float]
    #: ``"stop"`` (EOS or a stop string) or ``"length"`` (``max_new_tokens`` or the context's end).
    finish_reason: str
    #: Tokens of the prompt (placeholders expanded).
    prompt_tokens: int
    #: Milliseconds per stage: ``load``, ``media``, ``preprocess``, ``vision``, ``prefill``, ``decode``
    #: (the stages of one call, shared by the prompts of a batch).
    timings: Dict[str, float]
    #: The prompt as the model saw it (in the chat format).
    prompt: str = ""
    #: With ``top_logprobs=K``: per token, the K most likely ``(token_id, token, logprob)``.
    top_logprobs: List[List[Tuple[int, str, float]]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def _from_native(cls, d: Dict[str, Any], prompt: str) -> "GenerationOutput":
        return cls(
            text=d["text"],
            token_ids=list(d["token_ids"]),
            logprobs=list(d["logprobs"]),
            finish_reason=d["finish_reason"],
            prompt_tokens=d["prompt_tokens"],
            timings=dict(d["timings"]),
            prompt=prompt,
            top_logprobs=[[tuple(a) for a in alts] for alts in d["top_logprobs"]],
        )


class TextStream(Iterator[str]):
    """The answer's text as it is generated, piece by piece (from :meth:`VideoLlava.stream`).

    Generation runs on a worker thread; each ``next()`` waits for the next piece without holding
    the GIL. After the last piece, :attr:`output` holds the full :class:`GenerationOutput`.

    Abandoning the stream stops the generation: when the iterator is dropped (a ``for`` loop left
    with ``break``, ``del``, garbage collection) the worker stops before its next decode step and
    frees its cache. :meth:`close` does the same and waits until the worker has ended; it is also
    a context manager (``with model.stream(...) as s:``) that closes on exit.
    """

    def __init__(self, native: Any, prompt: str) -> None:
        self._native = native
        self._prompt = prompt
        self._output: Optional[GenerationOutput] = None

    def __iter__(self) -> "TextStream":
        return self

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stops the generation if it is still running and waits until its worker has ended (the
        model is free for the next call on return). Iteration then ends; :attr:`output` stays
        ``None`` unless the answer was already complete. Closing again does nothing."""
        self._native.close()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`close` stopped the generation before its end."""
        return bool(self._native.cancelled)

    def __next__(self) -> str:
        try:
            _row, text = next(self._native)
        except StopIteration:
            result = self._native.result()
            if result is not None and self._output is None:
                self._output = GenerationOutput._from_native(result[0], self._prompt)
            raise
        return text

    @property
    def output(self) -> Optional[GenerationOutput]:
        """The complete answer once the stream is exhausted, else ``None``."""
        return self._output


class Processor:
    """A checkpoint's processor: transformers' ``VideoLlavaProcessor`` with numpy outputs."""

    def __init__(self, native: Any, num_frames: int = 8, frame_sampling: str = "uniform") -> None:
        self._native = native
        self.num_frames = num_frames
        self.frame_sampling = frame_sampling

    @classmethod
    def from_pretrained(
        cls, model: PathLike = DEFAULT_MODEL, *, num_frames: int = 8, frame_sampling: str = "uniform"
    ) -> "Processor":
        """Loads the processor files (configs, tokenizer; no weights) of a directory or hub id."""
        return cls(_native.NativeProcessor.load(os.fspath(model)), num_frames, frame_sampling)

    def __call__(
        self,
        *,
        text: Union[str, Sequence[str]],
        images: Union[ImageInput, Sequence[ImageInput], None] = None,
        videos: Union[VideoInput, Sequence[VideoInput], None] = None,
        num_frames: Optional[int] = None,
        frame_sampling: Optional[str] = None,
        return_tensors: Optional[str] = "np",
    ) -> Dict[str, Any]:
        """Tokenizes ``text`` (verbatim, with ``<image>`` / ``<video>`` placeholders) and
        preprocesses the media, consumed by the placeholders in order across the batch.

        Returns transformers' keys: ``input_ids`` and ``attention_mask`` (int64 ``[B, L]``,
        left-padded), ``pixel_values_images`` (float32 ``[N, 3, H, W]``) and
        ``pixel_values_videos`` (float32 ``[M, T, 3, H, W]``) when there are images / videos.
        ``return_tensors``: ``"np"`` (default), ``"pt"`` (torch tensors, needs torch) or ``None``
        (nested lists).
        """
        prompts = [text] if isinstance(text, str) else list(text)
        image_list = [images] if isinstance(images, np.ndarray) else _as_list(images)
        if isinstance(videos, np.ndarray) or not isinstance(videos, (list, tuple)):
            video_list = _as_list(videos)
        else:
            video_list = list(videos)
        out = self._native.process(
            prompts,
            [_image_tuple(x, f"image #{i + 1}") for i, x in enumerate(image_list)],
            [_video_tuple(x, f"video #{i + 1}") for i, x in enumerate(video_list)],
            num_frames if num_frames is not None else self.num_frames,
            frame_sampling if frame_sampling is not None else self.frame_sampling,
        )
        arrays = {k: _array(v) for k, v in out.items()}
        if return_tensors == "np":
            return arrays
        if return_tensors is None:
            return {k: v.tolist() for k, v in arrays.items()}
        if return_tensors == "pt":
            import torch

            return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
        raise ValueError(f"return_tensors must be 'np', 'pt' or None, got {return_tensors!r}")

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids to text."""
        return self._native.decode([int(t) for t in token_ids], skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> List[str]:
        """Each row of token ids to text."""
        return [self.decode(s, skip_special_tokens) for s in sequences]


class VideoLlava:
    """A loaded Video-LLaVA checkpoint (``VideoLlavaForConditionalGeneration``) on the CPU."""

    def __init__(self, native: Any, num_frames: int = 8, frame_sampling: str = "uniform") -> None:
        self._native = native
        self.num_frames = num_frames
        self.frame_sampling = frame_sampling
        self._processor: Optional[Processor] = None

    @classmethod
    def from_pretrained(
        cls,
        model: PathLike = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        quantize: Optional[str] = None,
        quantized_cache: Optional[PathLike] = None,
        mmap: bool = True,
        threads: Optional[int] = None,
        num_frames: int = 8,
        frame_sampling: str = "uniform",
        kv_cache: str = "model",
        feature_cache_mib: int = 256,
        prefill_chunk: Optional[int] = None,
    ) -> "VideoLlava":
        """Loads a checkpoint directory or Hugging Face hub id (``org/name[@revision]``, through
        the hub cache: ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``).

        - ``dtype``: ``"auto"`` (the checkpoint's), ``"f32"``, ``"bf16"`` or ``"f16"``.
        - ``quantize``: ``"q8_0"`` or ``"q4k"`` quantizes the language model's linear layers; the
          result is cached in ``quantized_cache`` (a directory, ``"off"``, or by default
          ``$VIDEOLLAVA_CACHE``, else ``~/.cache/videollava``).
        - ``mmap``: read BF16 weights in place from the memory-mapped files.
        - ``threads``: CPU threads of the kernels; sets ``RAYON_NUM_THREADS``, so it takes effect
          only before the process's first model runs.
        - ``num_frames`` / ``frame_sampling``: how video files become clips (8, ``"uniform"``).
        - ``kv_cache``: ``"model"`` (the compute dtype) or ``"q8_0"``.
        - ``feature_cache_mib``: MiB of visual features kept by content (0: off).
        - ``prefill_chunk``: prompt positions per decoder pass (0: all at once).
        """
        if threads is not None:
            if int(threads) < 1:
                raise InputError(f"threads must be at least 1, got {threads}")
            os.environ["RAYON_NUM_THREADS"] = str(int(threads))
        native = _native.NativeModel.load(
            os.fspath(model),
            dtype,
            quantize,
            os.fspath(quantized_cache) if quantized_cache is not None else None,
            bool(mmap),
            kv_cache,
            int(feature_cache_mib),
            prefill_chunk,
        )
        return cls(native, num_frames, frame_sampling)

    @property
    def processor(self) -> Processor:
        """The checkpoint's processor (see :class:`Processor`)."""
        if self._processor is None:
            self._processor = Processor(self._native.processor(), self.num_frames, self.frame_sampling)
        return self._processor

    @property
    def model_dir(self) -> str:
        """The checkpoint's directory (the hub cache's snapshot for a hub id)."""
        return self._native.model_dir

    @property
    def tokens_generated(self) -> int:
        """Tokens this model has generated since it was loaded, over every call (the tokens of a
        stream stopped early included)."""
        return int(self._native.tokens_generated)

    def prompt(self, text: str, images: int = 0, videos: int = 0) -> str:
        """The prompt the model sees for ``text``: verbatim when already in the chat format (it
        holds ``USER:`` or ``ASSISTANT:``), else the checkpoint's chat format around it with one
        ``<image>`` per image and one ``<video>`` per video (none added when ``text`` places them).
        """
        return self._native.chat_prompt(text, images, videos)

    def _prepare(
        self,
        prompts: Sequence[str],
        images: Sequence[List[Any]],
        videos: Sequence[List[Any]],
        raw_prompt: bool,
    ) -> Tuple[List[str], List[_MediaTuple], List[_MediaTuple]]:
        final, image_tuples, video_tuples = [], [], []
        for text, imgs, vids in zip(prompts, images, videos):
            if not isinstance(text, str):
                raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
            final.append(text if raw_prompt else self.prompt(text, len(imgs), len(vids)))
            image_tuples += [_image_tuple(x, f"image #{len(image_tuples) + 1}") for x in imgs]
            video_tuples += [_video_tuple(x, f"video #{len(video_tuples) + 1}") for x in vids]
        return final, image_tuples, video_tuples

    @staticmethod
    def _settings(
        max_new_tokens: Optional[int],
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repetition_penalty: float,
        seed: int,
        stop: Union[str, Sequence[str], None],
        ignore_eos: bool,
        top_logprobs: int,
    ) -> Tuple[Any, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k), ("top_logprobs", top_logprobs), ("seed", seed)):
            if value is not None and int(value) < 0:
                raise InputError(f"{name} must be >= 0, got {value}")
        return (
            max_new_tokens,
            float(temperature),
            int(top_k),
            float(top_p),
            float(min_p),
            float(repetition_penalty),
            int(seed),
            stops,
            bool(ignore_eos),
            int(top_logprobs),
        )

    def generate(
        self,
        prompt: str,
        *,
        image: Optional[ImageInput] = None,
        video: Optional[VideoInput] = None,
        images: Optional[Sequence[ImageInput]] = None,
        videos: Optional[Sequence[VideoInput]] = None,
        raw_prompt: bool = False,
        max_new_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        top_logprobs: int = 0,
    ) -> GenerationOutput:
        """Answers one prompt about an ``image`` / a ``video`` (or several: ``images`` / ``videos``).

        ``prompt`` is a question, wrapped in the checkpoint's chat format (see :meth:`prompt`), or
        with ``raw_prompt=True`` the exact prompt text. Decoding is greedy unless ``temperature >
        0`` (then ``top_k``, ``top_p``, ``min_p`` and ``seed`` apply); ``max_new_tokens`` defaults to
        the checkpoint's ``generation_config.json``, else 256; ``stop`` ends the answer at a string.
        """
        settings = self._settings(
            max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos, top_logprobs
        )
        return self._generate(
            [prompt], [_one_or_many(image, images, "image")], [_one_or_many(video, videos, "video")], raw_prompt, settings
        )[0]

    def stream(
        self,
        prompt: str,
        *,
        image: Optional[ImageInput] = None,
        video: Optional[VideoInput] = None,
        images: Optional[Sequence[ImageInput]] = None,
        videos: Optional[Sequence[VideoInput]] = None,
        raw_prompt: bool = False,
        max_new_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        top_logprobs: int = 0,
    ) -> TextStream:
        """Like :meth:`generate`, but returns the text piece by piece as it is generated; the
        pieces concatenate to ``generate``'s text. Errors in the inputs raise here, errors of the
        generation itself from the iteration. Leaving the stream early (``break``, dropping it,
        :meth:`TextStream.close`) stops the generation before its next decode step."""
        prompts, image_tuples, video_tuples = self._prepare(
            [prompt], [_one_or_many(image, images, "image")], [_one_or_many(video, videos, "video")], raw_prompt
        )
        settings = self._settings(
            max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos, top_logprobs
        )
        native = self._native.stream(
            prompts, image_tuples, video_tuples, self.num_frames, self.frame_sampling, *settings
        )
        return TextStream(native, prompts[0])

    def generate_batch(
        self,
        prompts: Sequence[str],
        *,
        images: Optional[Sequence[Union[ImageInput, Sequence[ImageInput], None]]] = None,
        videos: Optional[Sequence[Optional[VideoInput]]] = None,
        raw_prompt: bool = False,
        max_new_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        top_logprobs: int = 0,
    ) -> List[GenerationOutput]:
        """Answers several prompts in one batch (decoded together; a finished row stops costing).

        ``images[i]`` and ``videos[i]`` belong to ``prompts[i]``: ``None``, one medium, or for
        images a list of images. (A list in ``videos`` is one clip given as frames.) The other
        arguments are :meth:`generate`'s, shared by the batch; row ``i`` samples with seed
        ``seed + i``.
        """
        prompts = list(prompts)
        n = len(prompts)
        if n == 0:
            return []
        per_images = list(images) if images is not None else [None] * n
        per_videos = list(videos) if videos is not None else [None] * n
        for name, given in (("images", per_images), ("videos", per_videos)):
            if len(given) != n:
                raise InputError(f"{len(given)} entries in `{name}` for {n} prompts: give one per prompt (None for none)")
        image_lists = [_as_list(x) if not isinstance(x, np.ndarray) else [x] for x in per_images]
        video_lists = [[] if x is None else [x] for x in per_videos]
        settings = self._settings(
            max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos, top_logprobs
        )
        return self._generate(prompts, image_lists, video_lists, raw_prompt, settings)

    def _generate(
        self,
        prompts: Sequence[str],
        images: Sequence[List[Any]],
        videos: Sequence[List[Any]],
        raw_prompt: bool,
        settings: Tuple[Any, ...],
    ) -> List[GenerationOutput]:
        final, image_tuples, video_tuples = self._prepare(prompts, images, videos, raw_prompt)
        results = self._native.generate(final, image_tuples, video_tuples, self.num_frames, self.frame_sampling, *settings)
        return [GenerationOutput._from_native(d, p) for d, p in zip(results, final)]

    def __repr__(self) -> str:
        return f"VideoLlava({self.model_dir!r})"
