"""Speed per stage: the candidates of one stage timed interleaved, on the model at its resolution.

Encoder: one image through tower and projector. Decoder: a prefill of one image's visual
tokens plus ``PREFILL_TEXT_TOKENS`` text tokens, and one cached decode step (its token is
cropped from the cache again, so every timed step sees the same context). Prefill and decode
share the decoder's weights, so the decoder's cost is ``prefill + ANSWER_TOKENS x decode``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from fastvlm.measure import median_latency_ms
from fastvlm.precision.candidates import REFERENCE
from fastvlm.precision.quality import PROBE_SEED, random_token_ids
from fastvlm.processing import IMAGE_TOKEN_INDEX

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

ANSWER_TOKENS = 64  # decoder cost = prefill ms + ANSWER_TOKENS x decode ms per token
PREFILL_TEXT_TOKENS = 32  # text tokens after the image in the timed prefill
REPEATS = 5  # timed calls per candidate (after one warm-up)

# (name -> call, device) -> name -> ms; tests pass their own to pin the ranking.
Timer = Callable[[Mapping[str, Callable[[], object]], torch.device], dict[str, float]]


def default_timer(fns: Mapping[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Median ms of ``REPEATS`` interleaved calls after one warm-up call each."""
    return median_latency_ms(fns, device, warmup=1, repeats=REPEATS)


@torch.inference_mode()
def stage_timings(
    stage: str, models: Mapping[str, FastVLM], image: torch.Tensor, timer: Timer
) -> dict[str, dict[str, float]]:
    """Per candidate name: ``{"ms": cost}``, plus ``prefill_ms`` and ``decode_ms`` for the decoder.

    ``models[REFERENCE]`` is the fp32 model; ``image`` is [1, 3, S, S].
    """
    reference = models[REFERENCE]
    image = image.to(reference.device)
    if stage == "encoder":
        times = timer({name: _encode_call(model, image) for name, model in models.items()}, reference.device)
        return {name: {"ms": times[name]} for name in models}
    features = reference.encode_images(image)  # [1, T, H]
    text = random_token_ids(reference, (1, PREFILL_TEXT_TOKENS), torch.Generator().manual_seed(PROBE_SEED + 1))
    ids = torch.cat([torch.full((1, 1), IMAGE_TOKEN_INDEX), text], dim=1)
    fns: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        fns[f"{name}/prefill"], fns[f"{name}/decode"] = _decoder_calls(model, ids, features)
    times = timer(fns, reference.device)
    result = {}
    for name in models:
        prefill_ms, decode_ms = times[f"{name}/prefill"], times[f"{name}/decode"]
        result[name] = {"ms": prefill_ms + ANSWER_TOKENS * decode_ms, "prefill_ms": prefill_ms, "decode_ms": decode_ms}
    return result


def _encode_call(model: FastVLM, image: torch.Tensor) -> Callable[[], object]:
    return lambda: model.encode_images(image)


def _decoder_calls(
    model: FastVLM, ids: torch.Tensor, features: torch.Tensor
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(one prefill, one cached greedy decode step as ``generate`` takes it) of ``model`` on ``features``, ``ids``."""
    from fastvlm.decoding import DecodeSteps, prefill

    inputs = model.prepare_inputs(ids, image_features=features.to(model.dtype))
    cache, logits = prefill(model, inputs)
    length = inputs.attention_mask.shape[1]
    steps = DecodeSteps(model, cache, capacity=length + 1)
    token = logits.argmax(-1, keepdim=True)  # [1, 1]
    mask = torch.ones(1, length + 1, dtype=torch.long, device=model.device)
    position = torch.full((1, 1), length, device=model.device)

    def decode() -> None:
        steps.greedy(token, mask, position)  # the int8-screened head where the model has one (fastvlm.greedy_head)
        steps.rewind(1)  # drop the step's token again

    return (lambda: prefill(model, inputs)), decode
