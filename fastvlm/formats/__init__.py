"""Checkpoint formats: which one a folder is in, and reading and writing each.

Three formats describe the same model (see :class:`CheckpointFormat`); each has its
module here, which owns its ``config.json`` translation, its tensor names and its
tokenizer fixes. Everything else asks :func:`get_format` for the format object instead of
comparing format names. Reading and writing files goes through :mod:`fastvlm.files`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from fastvlm.config import FastVLMConfig
from fastvlm.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from fastvlm.files import atomic_dir, read_checkpoint_tensors, read_json, save_safetensors_atomic, weight_files
from fastvlm.formats.base import (
    OUR_LM_HEAD,
    OUR_TOWER_PREFIX,
    CheckpointFormat,
    Format,
    placeholder_token_id,
    vocab_image_token,
)
from fastvlm.formats.fast_vlm import FastVlm
from fastvlm.formats.llava_qwen2 import LlavaQwen2
from fastvlm.formats.native import Native
from fastvlm.vision.layouts import infer_tower_config

__all__ = [
    "CheckpointFormat",
    "Format",
    "FORMATS",
    "FORMAT_NAMES",
    "Checkpoint",
    "get_format",
    "format_of_config",
    "read_checkpoint_config",
    "read_checkpoint",
    "load_tokenizer",
    "write_checkpoint",
    "vocab_image_token",
    "placeholder_token_id",
]

FORMATS: dict[CheckpointFormat, Format] = {f.name: f for f in (Native(), LlavaQwen2(), FastVlm())}
FORMAT_NAMES = tuple(f.value for f in CheckpointFormat)  # for command-line choices
_BY_MODEL_TYPE = {f.model_type: f for f in FORMATS.values()}
# Files whose presence means a folder has a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def get_format(name: str | CheckpointFormat) -> Format:
    """The format called ``name`` ("fastvlm", "apple" or "hf")."""
    try:
        return FORMATS[CheckpointFormat(name)]
    except ValueError:
        *first, last = FORMAT_NAMES
        raise ConfigError(f"unknown format {name!r}; expected {', '.join(first)} or {last}") from None


def format_of_config(raw: dict, source: str | Path = "config.json") -> Format:
    """The format of a checkpoint whose ``config.json`` (read from ``source``) is ``raw``."""
    model_type = raw.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not a FastVLM checkpoint; expected one of "
            f"{sorted(_BY_MODEL_TYPE)} (the authors' llava_qwen2, transformers' fast_vlm, or ours)"
        )
    return _BY_MODEL_TYPE[model_type]


def read_checkpoint_config(folder: Path) -> tuple[dict, Format]:
    """config.json of a checkpoint folder and its format."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointNotFoundError(f"{folder} has no config.json; is it a FastVLM checkpoint folder?")
    raw = read_json(config_path)
    return raw, format_of_config(raw, config_path)


@dataclass
class Checkpoint:
    """A checkpoint folder read into our terms: its config and its tensors under our names."""

    folder: Path
    format: Format
    config: FastVLMConfig
    tensors: dict[str, torch.Tensor]  # our names
    names: dict[str, str] = field(repr=False)  # {checkpoint name: our name}

    @cached_property
    def _original_names(self) -> dict[str, str]:
        return {ours: theirs for theirs, ours in self.names.items()}

    def name_of(self, key: str) -> str:
        """Our ``key`` as this checkpoint spells it (for error messages)."""
        return self._original_names.get(key) or self.format.keys_from_ours([key], self.config.vision)[key]


def read_checkpoint(folder: Path, *, shapes_only: bool = False) -> Checkpoint:
    """The config and tensors of a checkpoint folder in any format (tokenizer excluded).

    The tower's architecture is read from its tensors; the unused CLIP head
    (``head.proj``) is kept when present, so that checkpoints round-trip.
    ``shapes_only`` reads no tensor data (the tensors are meta tensors): enough for the
    config, the names and the shapes, as an engine that loads the weights itself needs.
    """
    raw, fmt = read_checkpoint_config(folder)
    tensors = read_checkpoint_tensors(folder, shapes_only=shapes_only)
    names = fmt.keys_to_ours(tensors)
    ours = {names[k]: v for k, v in tensors.items()}
    tower = {k[len(OUR_TOWER_PREFIX) :]: v for k, v in ours.items() if k.startswith(OUR_TOWER_PREFIX)}
    if not tower:
        raise CheckpointError(f"{folder}: the checkpoint holds no vision-tower tensors")
    vision = infer_tower_config(tower, keep_head=True)
    config = fmt.config_from_json(raw, vision, folder)
    return Checkpoint(folder=folder, format=fmt, config=config, tensors=ours, names=names)


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has none."""
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        return None
    # AutoTokenizer reads config.json too and warns that llava_qwen2 is not a type it knows: expected here.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(level)


def write_checkpoint(
    directory: Path,
    fmt: Format,
    config: FastVLMConfig,
    tokenizer: Any,
    state: dict[str, torch.Tensor],
) -> Path:
    """Write a checkpoint folder in ``fmt`` from our config, tokenizer and state dict.

    The files are assembled in a staging folder and moved into ``directory`` at the end
    (merged into it when it exists: only the files written here, and stale weight files
    that would shadow them, are replaced).
    """
    config, tokenizer, state = fmt.prepare_for_saving(config, tokenizer, dict(state))
    if config.text.tie_word_embeddings:
        state.pop(OUR_LM_HEAD, None)
    names = fmt.keys_from_ours(state, config.vision)
    tensors = {names[k]: v for k, v in state.items()}
    with atomic_dir(directory, merge=True) as staging:
        save_safetensors_atomic(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(fmt.config_to_json(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for stale in weight_files(directory) if directory.is_dir() else []:
            stale.unlink()
    return directory
