"""transformers' ``FastVlmForConditionalGeneration`` on the same measurements as ours.

The model is built from the config our ``fast_vlm`` format writes for the same
architecture (a timm ``fastvit_mci3`` tower in its released inference form, the
2-layer projector, the same Qwen2 decoder), with random weights, on the device, in the
same dtype. Its tower needs timm; where timm (or the class, in an older transformers)
is missing, :func:`build_transformers_fastvlm` raises ``ImportError`` and the benchmark
reports the side as unavailable with that reason.

Measured through transformers' own API: the encoder is ``get_image_features`` (tower +
projector), the prefill a forward over the embedded prompt with the visual tokens given,
TTFT ``generate(max_new_tokens=1)`` from pixels on the device, and decode speed the
difference between ``generate`` of N tokens and of one, over the N - 1 decode steps.
Images are marked the transformers way: the image token repeated once per visual token.
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fastvlm.bench.gpu_common import (
    DecodeRow,
    LatencyRow,
    attempt,
    batch_prompt,
    dtype_name,
    fill_bound,
    graph_replay_ms,
    median_ms,
    random_pixels,
    weights_gib,
    with_peak_gib,
)
from fastvlm.formats import CheckpointFormat, get_format
from fastvlm.measure import synchronize
from fastvlm.processing import IMAGE_TOKEN_INDEX

if TYPE_CHECKING:
    from fastvlm.bench.gpu import GpuSettings
    from fastvlm.config import FastVLMConfig

IMPL = "transformers"


def build_transformers_fastvlm(config: FastVLMConfig, *, device: torch.device, dtype: torch.dtype) -> Any:
    """``FastVlmForConditionalGeneration`` with random weights for ``config``'s architecture.

    The image token is the vocabulary's last id. Raises ImportError when the installed
    transformers lacks the class or timm is missing or too old for ``fastvit_mci3``.
    """
    try:
        from transformers import FastVlmConfig, FastVlmForConditionalGeneration
    except ImportError as err:
        import transformers

        raise ImportError(f"transformers {transformers.__version__} has no FastVlm classes ({err})") from err
    config = dataclasses.replace(config, image_token_id=config.text.vocab_size - 1)
    raw = get_format(CheckpointFormat.FAST_VLM).config_to_json(config)
    hf_config: Any = FastVlmConfig.from_dict(raw)
    hf_config.text_config._attn_implementation = "sdpa"  # as ours (transformers' default too)
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = FastVlmForConditionalGeneration(hf_config)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def image_token_prompt(config: Any, text_tokens: int, visual_tokens: int, batch: int) -> torch.Tensor:
    """Our benchmark prompt with its image marker expanded to ``visual_tokens`` image tokens."""
    return expand_image_marker(batch_prompt(text_tokens, config.text_config.vocab_size, batch), config, visual_tokens)


def expand_image_marker(ids: torch.Tensor, config: Any, visual_tokens: int) -> torch.Tensor:
    """[B, L] ids with one image marker (-200) each -> the same prompt with ``visual_tokens`` image tokens."""
    split = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
    image = torch.full((ids.shape[0], visual_tokens), config.image_token_id, dtype=ids.dtype)
    return torch.cat([ids[:, :split], image, ids[:, split + 1 :]], dim=1)


def _projected(output: Any) -> torch.Tensor:
    """The projected visual tokens [N, T, H] from ``get_image_features``, whatever its return type."""
    if hasattr(output, "pooler_output"):
        output = output.pooler_output
    if isinstance(output, (list, tuple)):
        output = torch.cat(list(output))
    return output


def generate_ids(model: Any, ids: torch.Tensor, pixels: torch.Tensor, new_tokens: int, **options: Any) -> torch.Tensor:
    """Greedy ``generate`` of ``new_tokens`` tokens: [B, L + new_tokens] (the prompt first).

    ``options`` go to ``generate`` as well (a ``streamer``, say).
    """
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        max_new_tokens=new_tokens,
        do_sample=False,
        **options,
    )


def latency_calls(model: Any, ids: torch.Tensor, pixels: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed calls at one input: ``encoder``, ``prefill`` (visual tokens given) and ``ttft``.

    ``ids`` carry the image tokens (:func:`expand_image_marker`); the prefill's embedded
    prompt is computed here, once, so that each call does only the work it names.
    """
    with torch.inference_mode():
        features = _projected(model.get_image_features(pixel_values=pixels))
        embeds = model.get_input_embeddings()(ids)
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(model).forward).parameters else {}

    def encoder() -> object:
        return model.get_image_features(pixel_values=pixels)

    def prefill() -> object:
        return model(inputs_embeds=embeds, use_cache=True, **keep)

    return {"encoder": encoder, "prefill": prefill, "ttft": lambda: generate_ids(model, ids, pixels, 1)}


def measure_latency(model: Any, size: str, resolution: int, settings: GpuSettings) -> LatencyRow:
    """Encoder, prefill and TTFT at batch 1 (the FLOP-rate fields are filled by the caller)."""
    device = settings.torch_device
    timing = {"warmup": settings.warmup, "repeats": settings.repeats}
    pixels = random_pixels(1, resolution, device)
    with torch.inference_mode():
        features = _projected(model.get_image_features(pixel_values=pixels))
    ids = image_token_prompt(model.config, settings.text_tokens, features.shape[1], 1).to(device)
    row = LatencyRow(
        impl=IMPL,
        llm=size,
        resolution=resolution,
        dtype=dtype_name(settings.torch_dtype),
        visual_tokens=features.shape[1],
        prompt_tokens=ids.shape[1],
    )
    calls = latency_calls(model, ids, pixels)
    with torch.inference_mode():
        row.encoder_ms = attempt(row.notes, "encoder", lambda: median_ms(calls["encoder"], device, **timing))
        if device.type == "cuda":
            row.encoder_graph_ms = attempt(
                row.notes, "encoder_graph", lambda: graph_replay_ms(calls["encoder"], device, **timing)
            )
        row.prefill_ms = attempt(row.notes, "prefill", lambda: median_ms(calls["prefill"], device, **timing))
    row.ttft_ms = attempt(row.notes, "ttft", lambda: median_ms(calls["ttft"], device, **timing))
    if device.type != "cuda":
        row.notes["encoder_graph"] = "skipped: CUDA graphs need a GPU"
    return row


def _wall_s(fn: Any, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_decode(
    model: Any, size: str, resolution: int, batch: int, settings: GpuSettings, copy_bytes_per_s: float | None
) -> DecodeRow:
    """Decode tokens/s of ``generate`` at ``batch``: (N - 1) steps from the time of N tokens minus one token."""
    device, n = settings.torch_device, settings.new_tokens
    pixels = random_pixels(batch, resolution, device)
    with torch.inference_mode():
        visual = _projected(model.get_image_features(pixel_values=pixels[:1])).shape[1]
    ids = image_token_prompt(model.config, settings.text_tokens, visual, batch).to(device)
    row = DecodeRow(
        impl=IMPL,
        llm=size,
        resolution=resolution,
        dtype=dtype_name(settings.torch_dtype),
        batch=batch,
        kv_tokens=ids.shape[1] + n,
        new_tokens=n,
        weights_gib=weights_gib(model),
    )

    def measure() -> float:
        generate_ids(model, ids, pixels, 2)  # warm-up
        out, row.peak_gib = with_peak_gib(lambda: generate_ids(model, ids, pixels, n), device)
        if out.shape[1] - ids.shape[1] != n:
            row.notes["decode"] = f"generate stopped after {out.shape[1] - ids.shape[1]} of {n} tokens"
        full = statistics.median(
            _wall_s(lambda: generate_ids(model, ids, pixels, n), device) for _ in range(settings.decode_runs)
        )
        first = statistics.median(
            _wall_s(lambda: generate_ids(model, ids, pixels, 1), device) for _ in range(settings.decode_runs)
        )
        return batch * (n - 1) / max(full - first, 1e-9)

    row.tokens_per_s = attempt(row.notes, "decode", measure)
    fill_bound(row, model.config.text_config, settings.torch_dtype, copy_bytes_per_s)
    return row
