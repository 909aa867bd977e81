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
from fastvlm.files import resolve_checkpoint
from fastvlm.formats import Checkpoint, placeholder_token_id, read_checkpoint

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
