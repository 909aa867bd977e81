"""What vLLM's processor and model need to know about a FastVLM checkpoint, read once per process.

vLLM builds the processor (in the API server) and the model (in each worker) from the
checkpoint's path or hub id alone; both need our reading of it: the format, the tower's
architecture (from its tensor shapes), the input resolution and padding mode, and the
token id that marks image positions. :func:`describe_checkpoint` reads the safetensors
headers only, so describing a 7B checkpoint costs no memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fastvlm.config import FastVLMConfig
from fastvlm.errors import CheckpointError
from fastvlm.files import resolve_checkpoint
from fastvlm.formats import Checkpoint, read_checkpoint, vocab_image_token
from fastvlm.processing import DEFAULT_IMAGE_TOKEN

IMAGES_PER_PROMPT = 1  # FastVLM is trained on one image per conversation; the processor, server and engine say so


@dataclass(frozen=True)
class CheckpointFacts:
    """A checkpoint as vLLM sees it: its description (meta tensors) and the image placeholder id."""

    checkpoint: Checkpoint
    placeholder_id: int  # the token id vLLM's prompts carry at each visual-token position

    @property
    def config(self) -> FastVLMConfig:
        return self.checkpoint.config

    @property
    def tokens_per_image(self) -> int:
        return self.config.num_image_tokens()


@functools.lru_cache(maxsize=8)
def describe_checkpoint(model: str) -> Checkpoint:
    """The checkpoint at ``model`` (a folder or hub id) read without its tensor data."""
    return read_checkpoint(resolve_checkpoint(model), shapes_only=True)


def checkpoint_facts(model: str, tokenizer: object) -> CheckpointFacts:
    """:class:`CheckpointFacts` of ``model``, with ``tokenizer`` (vLLM's) choosing the placeholder id."""
    checkpoint = describe_checkpoint(model)
    return CheckpointFacts(checkpoint, placeholder_token_id(checkpoint.config, tokenizer))


def placeholder_token_id(config: FastVLMConfig, tokenizer: object) -> int:
    """The in-vocabulary id that stands for one visual token in vLLM's prompts.

    transformers' checkpoints name it (``image_token_index``); the authors' mark images with
    ``-200``, which vLLM refuses (it checks that every prompt id is a vocabulary id). For
    them the tokenizer's ``<image>`` is used when it has one, else the first id past the
    tokenizer's vocabulary that still has an embedding row (Qwen2's embedding has a few
    hundred spare rows). Its embedding is never read: image features replace it.
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
            f"cannot place images in vLLM's prompts: the tokenizer has no {DEFAULT_IMAGE_TOKEN} token and its "
            f"{spare} tokens fill the decoder's {vocab_size} embedding rows, so no spare id is left; add "
            f"{DEFAULT_IMAGE_TOKEN} to the tokenizer (`fastvlm convert --format hf` does)"
        )
    return spare
