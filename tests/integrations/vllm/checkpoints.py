"""Small FastVLM checkpoints for the vLLM lane, in both released formats.

vLLM's CPU attention needs a head width of 64 (the shared fixtures have 16), so these
copy the fixture's tower and tokenizer with a wider decoder (hidden 128, 2 heads, 1 KV
head). Random weights at the usual scales give a degenerate model: the tower's output
barely depends on the image and greedy decoding repeats one token, which would let a
broken image path or position bug pass a token-equality test. So the weights are drawn
at scales that keep the signal alive through every layer (He-style for the tower, unit
layer scales, a wide decoder): each image and prompt then gives its own varied answer,
which the tests check before comparing engines.

The fixture's tokenizer is byte-level: a random answer would mostly be bytes that are no
whole UTF-8 character, whose text has no single right value (a streaming server holds
partial characters back; a one-shot decode shows U+FFFD). The output rows of those
tokens are zeroed, so greedy answers are readable text and servers' texts compare exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastvlm.model import FastVLM
from fastvlm.presets import resize_text_config
from tests.conftest import fixture_path

FORMATS = ("apple", "hf")
TOWER_GAIN = 1.7  # weight std x sqrt(fan-in) in the tower: the activations neither vanish nor explode
DECODER_STD = 0.3


@torch.no_grad()
def build_model(seed: int = 0) -> FastVLM:
    """The test model (training-form tower, fp32) with the fixture's tokenizer."""
    source = FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"), fuse=False)
    config = source.config
    config.vision = config.vision.replace(inference_mode=True)
    config.text = resize_text_config(config.text, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    model = FastVLM.from_config(config, seed=seed)
    model.tokenizer = source.tokenizer
    generator = torch.Generator().manual_seed(seed)

    def draw(param: torch.Tensor, std: float) -> None:
        param.copy_(torch.randn(param.shape, generator=generator) * std)

    for name, param in model.vision_tower.named_parameters():
        if "layer_scale" in name:
            param.fill_(1.0)
        elif param.dim() >= 2:
            draw(param, TOWER_GAIN / math.sqrt(param[0].numel()))
        else:
            param.zero_()
    for param in model.projector.parameters():
        draw(param, 1 / math.sqrt(param.shape[-1]) if param.dim() == 2 else 0.1)
    for param in model.language_model.parameters():
        if param.dim() == 2:
            draw(param, DECODER_STD)
    partial = [i for i in range(len(model.tokenizer)) if "\ufffd" in model.tokenizer.decode([i])]
    model.language_model.get_output_embeddings().weight[partial] = 0.0  # never the argmax: see above
    return model.eval()


def write_checkpoints(root: Path) -> dict[str, Path]:
    """{format: folder} of the test model saved in each released format under ``root``."""
    model = build_model()
    return {fmt: model.save_pretrained(root / fmt, format=fmt) for fmt in FORMATS}
