"""What every checkpoint format provides, and the key map the two foreign formats share.

A format is one way of writing a FastVLM checkpoint folder: a ``config.json`` with its own
``model_type`` and field names, tensors under its own names (the tower's in one of the
layouts of :mod:`fastvlm.vision.layouts`), and its own rule for marking images in the
token stream. A :class:`CheckpointFormat` names a format; its :class:`Format` object
translates both ways between the folder and our format-neutral :class:`FastVLMConfig`
and state-dict layout (``vision_tower.*``, ``projector.linear_N.*``,
``language_model.model.*``, ``language_model.lm_head.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config

from fastvlm.config import FastVLMConfig
from fastvlm.errors import CheckpointError
from fastvlm.processing import DEFAULT_IMAGE_TOKEN
from fastvlm.vision.config import FastViTConfig
from fastvlm.vision.layouts import TOWER_PREFIXES, TowerLayout, tower_keys_from_ours, tower_keys_to_ours

# Where each part of the model sits in our state-dict layout.
OUR_TOWER_PREFIX = TOWER_PREFIXES[TowerLayout.OURS]
OUR_LLM_PREFIX = "language_model.model."
OUR_LM_HEAD = "language_model.lm_head.weight"
LM_HEAD = "lm_head.weight"  # the same tensor in both foreign formats
_OUR_PROJECTOR = re.compile(r"^projector\.linear_(\d+)\.(weight|bias)$")
# Qwen2Config fields that describe the file rather than the decoder.
_TEXT_META_FIELDS = ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype")

# (config, tokenizer, state dict in our layout): what a format may adjust before saving.
SaveParts = tuple[FastVLMConfig, Any, dict[str, torch.Tensor]]


class CheckpointFormat(str, Enum):
    """A checkpoint format; the values are the names users pass (``--format hf``)."""

    NATIVE = "fastvlm"  # ours
    LLAVA_QWEN2 = "apple"  # the authors' llava_qwen2
    FAST_VLM = "hf"  # transformers' fast_vlm

    def __str__(self) -> str:
        return str(self.value)


class Format:
    """One checkpoint format. Subclasses set the class attributes and the config translation.

    The key maps here serve the foreign formats, whose decoder, projector and tower sit
    under prefixes of their own; our format overrides them with the identity.
    """

    name: ClassVar[CheckpointFormat]
    model_type: ClassVar[str]  # config.json's model_type
    tower_layout: ClassVar[TowerLayout]
    llm_prefix: ClassVar[str]  # where Qwen2's own ``model.*`` tensors sit

    @property
    def tower_prefix(self) -> str:
        """Where the tower's tensors sit in a whole checkpoint of this format."""
        return TOWER_PREFIXES[self.tower_layout]

    # ------------------------------------------------------------------ config.json
    def config_from_json(self, raw: dict, vision: FastViTConfig, folder: Path | None = None) -> FastVLMConfig:
        """Our config from this format's ``config.json`` and the tower's inferred config."""
        raise NotImplementedError

    def config_to_json(self, config: FastVLMConfig) -> dict:
        """This format's ``config.json`` for ``config``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ tensor names
    def projector_key_to_ours(self, key: str) -> str | None:
        """Our name of a projector tensor of this format; None when ``key`` is not one."""
        raise NotImplementedError

    def projector_key_from_ours(self, layer: int, param: str) -> str:
        """This format's name of ``projector.linear_{layer}.{param}``."""
        raise NotImplementedError

    def keys_to_ours(self, keys: Iterable[str]) -> dict[str, str]:
        """{checkpoint key: our key} for a whole-model checkpoint of this format."""
        keys = list(keys)
        prefix = self.tower_prefix
        tower_keys = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
        tower = tower_keys_to_ours(tower_keys, self.tower_layout) if tower_keys else {}
        out = {}
        for key in keys:
            if key.startswith(prefix):
                out[key] = OUR_TOWER_PREFIX + tower[key[len(prefix) :]]
            elif (ours := self.projector_key_to_ours(key) or self._llm_key_to_ours(key)) is not None:
                out[key] = ours
            else:
                raise CheckpointError(f"unexpected tensor {key!r} in a {self.name}-format FastVLM checkpoint")
        return out

    def _llm_key_to_ours(self, key: str) -> str | None:
        if key.startswith(self.llm_prefix):
            return OUR_LLM_PREFIX + key[len(self.llm_prefix) :]
        return OUR_LM_HEAD if key == LM_HEAD else None

    def keys_from_ours(self, keys: Iterable[str], vision: FastViTConfig) -> dict[str, str]:
        """{our key: checkpoint key} for writing a whole-model checkpoint in this format."""
        keys = list(keys)
        tower_keys = [k[len(OUR_TOWER_PREFIX) :] for k in keys if k.startswith(OUR_TOWER_PREFIX)]
        tower = tower_keys_from_ours(tower_keys, self.tower_layout, vision)
        out = {}
        for key in keys:
            if key.startswith(OUR_TOWER_PREFIX):
                out[key] = self.tower_prefix + tower[key[len(OUR_TOWER_PREFIX) :]]
            elif m := _OUR_PROJECTOR.match(key):
                out[key] = self.projector_key_from_ours(int(m[1]), m[2])
            elif key == OUR_LM_HEAD:
                out[key] = LM_HEAD
            elif key.startswith(OUR_LLM_PREFIX):
                out[key] = self.llm_prefix + key[len(OUR_LLM_PREFIX) :]
            else:
                raise CheckpointError(f"not a FastVLM tensor name in our layout: {key!r}")
        return out

    # ------------------------------------------------------------------ saving
    def prepare_for_saving(self, config: FastVLMConfig, tokenizer: Any, state: dict[str, torch.Tensor]) -> SaveParts:
        """(config, tokenizer, state) as this format stores them; by default unchanged."""
        return config, tokenizer, state


# ---------------------------------------------------------------------- shared helpers


def require(raw: dict, key: str, fmt: CheckpointFormat) -> Any:
    """``raw[key]``, or a :class:`CheckpointError` naming the format's missing field."""
    if key not in raw:
        raise CheckpointError(f"config.json of this {fmt}-format checkpoint has no {key!r}")
    return raw[key]


def nested_text_config(raw: dict, fmt: CheckpointFormat) -> dict:
    """The decoder's fields of a nested ``text_config`` (transformers' and our format), as Qwen2Config kwargs."""
    text = dict(require(raw, "text_config", fmt))
    text.pop("model_type", None)
    return text


def text_config_fields(text: Qwen2Config) -> dict:
    """The decoder's config as a dict, without the fields that describe a file."""
    fields = text.to_dict()
    for key in _TEXT_META_FIELDS:
        fields.pop(key, None)
    return fields


def vocab_image_token(tokenizer: PreTrainedTokenizerBase | None, vocab_size: int) -> int | None:
    """Id of the tokenizer's ``<image>`` token when it exists and has an embedding row, else None."""
    if tokenizer is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id or not 0 <= token_id < vocab_size:
        return None
    return token_id


def placeholder_token_id(config: FastVLMConfig, tokenizer: object) -> int:
    """The in-vocabulary id that stands for one visual token where ids must be vocabulary ids.

    vLLM's prompts and the exported ONNX graphs' ``input_ids`` both need one: transformers'
    checkpoints name it (``image_token_index``); the authors' mark images with ``-200``,
    which is no embedding row. For them the tokenizer's ``<image>`` is used when it has one,
    else the first id past the tokenizer's vocabulary that still has an embedding row
    (Qwen2's embedding has a few hundred spare rows). Its embedding is never read: image
    features replace it.
    """
    if config.image_token_id is not None:
        return config.image_token_id
    vocab_size = config.text.vocab_size
    token_id = vocab_image_token(tokenizer, vocab_size)  # type: ignore[arg-type]
    if token_id is not None:
        return token_id
    spare = len(tokenizer)  # type: ignore[arg-type]
    if spare >= vocab_size:
        raise CheckpointError(
            f"cannot place images in token ids: the tokenizer has no {DEFAULT_IMAGE_TOKEN} token and its "
            f"{spare} tokens fill the decoder's {vocab_size} embedding rows, so no spare id is left; add "
            f"{DEFAULT_IMAGE_TOKEN} to the tokenizer (`fastvlm convert --format hf` does)"
        )
    return spare
