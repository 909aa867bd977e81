"""Errors caused by what a user passed in, as opposed to bugs.

Every error that a person can fix by changing their input (an image, a prompt, a
checkpoint, a data record, a setting, a command-line flag) is a :class:`FastVLMError`.
The command line prints these as one line and exits with status 2; anything else is a
bug and keeps its traceback. Library callers can catch the base class.

Each subclass also derives from the built-in exception a caller would have caught
before this module existed (``ValueError`` for bad values, ``FileNotFoundError`` for
missing files, ``FileExistsError`` for outputs that would be overwritten), so
``except ValueError`` keeps working.
"""

from __future__ import annotations


class FastVLMError(Exception):
    """Base class of the errors a user can fix by changing their input."""


class ImageError(FastVLMError, ValueError):
    """An image that cannot be used: missing, unreadable, truncated, too large or of a bad shape."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than allowed (a guard against decompression bombs)."""


class PromptError(FastVLMError, ValueError):
    """A prompt that does not fit the model: placeholders vs images, or longer than the context."""


class CheckpointError(FastVLMError, ValueError):
    """A checkpoint whose files or tensors do not describe a model we can build."""


class CheckpointNotFoundError(FastVLMError, FileNotFoundError):
    """A checkpoint file, folder or hub id that cannot be found (or downloaded)."""


class OutputExistsError(FastVLMError, FileExistsError):
    """An output path that already exists and would be overwritten without permission."""


class ConfigError(FastVLMError, ValueError):
    """A setting (model, training or benchmark configuration) with a value that cannot work."""


class DataError(FastVLMError, ValueError):
    """A data set (training records, benchmark files) that cannot be read as expected."""


class UsageError(FastVLMError):
    """A combination of command-line flags that cannot work together."""
