"""The quality bound: next-token agreement with fp32 on a fixed, seeded probe.

The probe is random images at the model's resolution and random token prompts (so it needs
no tokenizer and runs on random-weight models), each extended by the fp32 model's greedy
continuation. A candidate's next-token logits over the same contexts (teacher-forced, every
position from the last visual token on) are compared with fp32's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastvlm.processing import IMAGE_TOKEN_INDEX

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

MIN_AGREEMENT = 0.99  # next-token top-1 agreement with fp32 that a candidate needs
PROBE_SEED = 1234
PROBE_PROMPTS = 4  # one random image each
PROBE_TOKENS_BEFORE_IMAGE = 4
PROBE_TOKENS_AFTER_IMAGE = 24
PROBE_GREEDY_TOKENS = 16  # so 4 x (24 + 16 + 1) = 164 positions are compared


@dataclass
class Probe:
    """The fixed inputs of the quality check, and fp32's answers to them."""

    pixel_values: torch.Tensor  # [P, 3, S, S] random images in [0, 1]
    sequences: torch.Tensor  # [P, L]: random prompt with one -200 image marker, then fp32's greedy continuation
    prompt_length: int  # L - PROBE_GREEDY_TOKENS
    positions: torch.Tensor  # [K] positions (after image expansion) whose next-token logits are compared
    reference_logits: torch.Tensor  # [P, K, V] fp32's logits there


@dataclass
class Quality:
    """How a candidate compares with fp32 on the probe."""

    agreement: float  # next-token top-1 agreement
    max_logit_diff: float  # max |logit - fp32 logit| (inf when a logit is not finite)
    greedy_match: bool  # the candidate's own greedy continuation equals fp32's
    admissible: bool  # agreement >= the bound and every logit finite


def random_token_ids(model: FastVLM, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Random ids of the decoder's vocabulary, never the image token id (which would be read as an image)."""
    vocab = model.config.text.vocab_size
    ids = torch.randint(0, vocab, shape, generator=generator)
    if model.config.image_token_id is not None:
        ids[ids == model.config.image_token_id] = (model.config.image_token_id + 1) % vocab
    return ids


def _greedy(model: FastVLM, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """[P, PROBE_GREEDY_TOKENS] greedy tokens of ``model`` (no stop tokens)."""
    from fastvlm.generation import generate_tokens

    steps = generate_tokens(
        model, input_ids, pixel_values=pixel_values, max_new_tokens=PROBE_GREEDY_TOKENS, stop_ids=set()
    )
    return torch.stack([token.cpu() for token, _ in steps], dim=1)


@torch.inference_mode()
def _logits_at(model: FastVLM, sequences: torch.Tensor, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[P, K, V] next-token logits of ``model`` at ``positions``, as float (the LM head runs only there)."""
    inputs = model.prepare_inputs(sequences, pixel_values=pixels)
    hidden = model.language_model.model(
        inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
    ).last_hidden_state  # [P, L, H]
    return model.language_model.lm_head(hidden[:, positions.to(hidden.device)]).float().cpu()


def make_probe(model: FastVLM) -> Probe:
    """The seeded probe for ``model`` (the fp32 reference): the same inputs on every machine."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    size = model.config.image_size
    pixels = torch.rand(PROBE_PROMPTS, 3, size, size, generator=generator)
    text = random_token_ids(model, (PROBE_PROMPTS, PROBE_TOKENS_BEFORE_IMAGE + PROBE_TOKENS_AFTER_IMAGE), generator)
    marker = torch.full((PROBE_PROMPTS, 1), IMAGE_TOKEN_INDEX)
    prompts = torch.cat([text[:, :PROBE_TOKENS_BEFORE_IMAGE], marker, text[:, PROBE_TOKENS_BEFORE_IMAGE:]], dim=1)
    sequences = torch.cat([prompts, _greedy(model, prompts, pixels)], dim=1)
    image_end = PROBE_TOKENS_BEFORE_IMAGE + model.config.num_image_tokens()  # after the marker's expansion
    length = image_end + PROBE_TOKENS_AFTER_IMAGE + PROBE_GREEDY_TOKENS
    positions = torch.arange(image_end - 1, length)  # from the last visual token on: each predicts a text token
    return Probe(
        pixel_values=pixels,
        sequences=sequences,
        prompt_length=prompts.shape[1],
        positions=positions,
        reference_logits=_logits_at(model, sequences, pixels, positions),
    )


def check_quality(candidate: FastVLM, probe: Probe, min_agreement: float = MIN_AGREEMENT) -> Quality:
    """How ``candidate`` (a converted model) compares with the fp32 answers in ``probe``."""
    logits = _logits_at(candidate, probe.sequences, probe.pixel_values, probe.positions)
    reference = probe.reference_logits
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    finite = bool(torch.isfinite(logits).all())
    greedy = _greedy(candidate, probe.sequences[:, : probe.prompt_length], probe.pixel_values)
    return Quality(
        agreement=agreement,
        max_logit_diff=(logits - reference).abs().max().item() if finite else float("inf"),
        greedy_match=bool(torch.equal(greedy, probe.sequences[:, probe.prompt_length :])),
        admissible=finite and agreement >= min_agreement,
    )
