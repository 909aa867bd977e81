"""The precisions tried per stage, and the stage-only copies they are tried on."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

STAGES = ("encoder", "decoder")
STAGE_MODULES = {"encoder": ("vision_tower", "projector"), "decoder": ("language_model",)}
REFERENCE = "fp32"  # every stage's reference candidate: the model as loaded, always admissible


@dataclass(frozen=True)
class Candidate:
    """One precision of one stage; ``apply`` converts that stage of a model in place.

    ``apply`` is given a model whose other stage is shared with the fp32 reference (see
    :func:`stage_copy`), so it must touch only its own stage's modules.
    """

    stage: str
    name: str
    apply: Callable[[FastVLM], None]


def cast_encoder(model: FastVLM, dtype: torch.dtype) -> None:
    """Tower and projector weights to ``dtype``; :meth:`FastVLM.encode_images` casts around them."""
    model.vision_tower.to(dtype)
    model.projector.to(dtype)


def cast_decoder(model: FastVLM, dtype: torch.dtype) -> None:
    """The decoder's parameters to ``dtype`` in place (tied weights stay tied).

    Parameters only: the rotary tables (buffers) stay fp32, as ``from_pretrained`` builds
    them for every dtype; positions rounded to bf16 would cost accuracy and no time.
    """
    with torch.no_grad():
        for param in model.language_model.parameters():
            param.data = param.data.to(dtype)


def quantize_int8(model: FastVLM) -> None:
    """int8 weight-only decoder (``quantize_decoder``: our int8 layers on CPU, torchao's elsewhere)."""
    from fastvlm.quantization import quantize_decoder

    quantize_decoder(model, "int8")


def quantize_int8_head(model: FastVLM) -> None:
    """int8 weight-only decoder with an int8 copy of a tied head, the largest read of a decode step."""
    from fastvlm.quantization import quantize_decoder

    quantize_decoder(model, "int8-head")


def bf16_int8(model: FastVLM) -> None:
    """bf16 decoder, then int8 weights: bf16 activations with int8 weights."""
    cast_decoder(model, torch.bfloat16)
    quantize_int8(model)


def default_candidates(device: torch.device | str = "cpu") -> list[Candidate]:
    """The lower precisions tried besides fp32 on ``device``; the int8 ones on CPU (our own int8
    layers, no extra package) and elsewhere where torchao is installed."""
    candidates = [
        Candidate("encoder", "bf16", lambda m: cast_encoder(m, torch.bfloat16)),
        Candidate("decoder", "bf16", lambda m: cast_decoder(m, torch.bfloat16)),
    ]
    if torch.device(device).type != "cpu":
        try:
            import torchao  # noqa: F401
        except ImportError:
            return candidates
    return [
        *candidates,
        Candidate("decoder", "int8", quantize_int8),
        Candidate("decoder", "int8-head", quantize_int8_head),
        Candidate("decoder", "bf16+int8", bf16_int8),
    ]


def stage_copy(model: FastVLM, stages: Sequence[str]) -> FastVLM:
    """A model owning deep copies of ``stages``' modules and sharing everything else with ``model``.

    The copy's own tables (modules, parameters, hooks) are copied, so converting a copied
    stage or hooking the copy never reaches ``model``; config, tokenizer and the other
    stage's weights are shared, so a candidate costs only its own stage's memory.
    """
    clone = copy.copy(model)
    for name, value in vars(model).items():
        if isinstance(value, dict):
            clone.__dict__[name] = copy.copy(value)
    for stage in stages:
        for name in STAGE_MODULES[stage]:
            clone._modules[name] = copy.deepcopy(model._modules[name])
    return clone


def converted(model: FastVLM, candidates: Sequence[Candidate]) -> FastVLM:
    """A :func:`stage_copy` of ``model`` with each candidate applied to its stage."""
    clone = stage_copy(model, [c.stage for c in candidates])
    for candidate in candidates:
        candidate.apply(clone)
    return clone.eval()
