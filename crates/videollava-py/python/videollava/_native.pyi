"""Type stubs of the compiled module ``videollava._native`` (see ``src/lib.rs``).

Use the public API of :mod:`videollava` instead: it converts media to the tuples read here and
the ``(bytearray, shape, dtype)`` triples returned here to numpy arrays.
"""

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

#: ``("path", str, ())``, ``("bytes", bytes, ())`` or ``("pixels", bytes, (H, W, 3) | (T, H, W, 3))``.
MediaTuple = Tuple[str, Union[str, bytes], Tuple[int, ...]]
#: Array data, shape and numpy dtype string (``"<i8"``, ``"<f4"``, ``"|u1"``).
ArrayTriple = Tuple[bytearray, List[int], str]

__version__: str
DEFAULT_MODEL: str
MAX_FRAMES: int

class NativeModel:
    @staticmethod
    def load(
        model: str,
        dtype: str,
        quantize: Optional[str],
        quantized_cache: Optional[str],
        mmap: bool,
        kv_cache: str,
        feature_cache_mib: int,
        prefill_chunk: Optional[int],
    ) -> NativeModel: ...
    def chat_prompt(self, text: str, images: int, videos: int) -> str: ...
    def processor(self) -> NativeProcessor: ...
    @property
    def model_dir(self) -> str: ...
    @property
    def load_ms(self) -> float: ...
    @property
    def tokens_generated(self) -> int: ...
    def generate(
        self,
        prompts: List[str],
        images: List[MediaTuple],
        videos: List[MediaTuple],
        num_frames: int,
        frame_sampling: str,
        max_new_tokens: Optional[int],
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repetition_penalty: float,
        seed: int,
        stop: List[str],
        ignore_eos: bool,
        top_logprobs: int,
    ) -> List[Dict[str, Any]]: ...
    def stream(
        self,
        prompts: List[str],
        images: List[MediaTuple],
        videos: List[MediaTuple],
        num_frames: int,
        frame_sampling: str,
        max_new_tokens: Optional[int],
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repetition_penalty: float,
        seed: int,
        stop: List[str],
        ignore_eos: bool,
        top_logprobs: int,
    ) -> NativeStream: ...

class NativeStream(Iterator[Tuple[int, str]]):
    def __iter__(self) -> NativeStream: ...
    def __next__(self) -> Tuple[int, str]: ...
    def close(self) -> None: ...
    @property
    def cancelled(self) -> bool: ...
    def result(self) -> Optional[List[Dict[str, Any]]]: ...

class NativeProcessor:
    @staticmethod
    def load(model: str) -> NativeProcessor: ...
    def process(
        self,
        prompts: List[str],
        images: List[MediaTuple],
        videos: List[MediaTuple],
        num_frames: int,
        frame_sampling: str,
    ) -> Dict[str, ArrayTriple]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

def load_image(medium_tuple: MediaTuple) -> ArrayTriple: ...
def load_video(medium_tuple: MediaTuple, num_frames: int, frame_sampling: str) -> Tuple[ArrayTriple, List[int]]: ...
