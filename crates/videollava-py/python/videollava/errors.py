"""Exceptions raised by videollava. Each carries the engine's one-line message.

All derive from :class:`VideoLlavaError`; those about bad input also derive from
:class:`ValueError`, and :class:`FileError` from :class:`OSError`, so ordinary ``except``
clauses work too.
"""

from __future__ import annotations

__all__ = [
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


class VideoLlavaError(Exception):
    """Base class of every error the engine reports."""


class InputError(VideoLlavaError, ValueError):
    """Prompts and media do not fit together, or a setting is out of range."""


class MediaError(VideoLlavaError, ValueError):
    """An image or video cannot be decoded or is unusable (size, shape, format)."""


class ConfigError(VideoLlavaError):
    """A checkpoint's configuration file is malformed or inconsistent."""


class TokenizerError(VideoLlavaError):
    """The tokenizer failed."""


class ModelError(VideoLlavaError):
    """Weights are missing or malformed, or a tensor operation failed."""


class FileError(VideoLlavaError, OSError):
    """A file could not be opened or read."""


class OutputError(VideoLlavaError):
    """An output file could not be written."""


class CancelledError(VideoLlavaError):
    """The generation was stopped before its end (its stream was closed or abandoned)."""
