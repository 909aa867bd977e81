"""What the GPU benchmark's parts share: models, prompts, timers, rows and the decode bound.

Latency on a GPU is timed with CUDA events around each call (median after warm-ups),
and with wall clock plus synchronisation elsewhere; calls that synchronise inside (the
generation API) are timed the same way. Models have random weights of the published
architectures, built directly on the device. The ``tiny`` size exists for ``--smoke``
runs and tests: a few-layer decoder and a five-block tower that run in seconds on a CPU.

The decode bound: one decode step must read every decoder weight once (the embedding
table only for the rows it looks up, unless it doubles as the tied LM head) and each
row's KV cache, so at best it takes (weight bytes + batch x KV bytes) / copy bandwidth,
with the bandwidth measured as a device-to-device copy (bytes read plus bytes written).
"""

from __future__ import annotations

import copy
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastvlm.bench.ttft import prompt_ids
from fastvlm.measure import count_flops, synchronize
from fastvlm.model import FastVLM, MultiModalProjector
from fastvlm.presets import QWEN2_PRESETS, fastvlm_config, resize_text_config
from fastvlm.quantization import decode_read_bytes
from fastvlm.vision import FastViT, FastViTConfig

if TYPE_CHECKING:
    from fastvlm.config import FastVLMConfig
    from fastvlm.model import ModelInputs

T = TypeVar("T")

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY = "tiny"  # the --smoke size: runs in seconds on a CPU
SIZES = (*QWEN2_PRESETS, TINY)
GIB = 2**30
TINY_VOCAB = 4096  # above twice the prompt's distance from the vocabulary's ends
TINY_TOWER = FastViTConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128))
TINY_TEXT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
NOTE_CHARS = 300  # a failure's message is cut to this length in the report


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_config(size: str, resolution: int) -> FastVLMConfig:
    """The architecture of FastVLM-``size`` (or the tiny smoke model) for ``resolution`` px inputs."""
    config = fastvlm_config("0.5b" if size == TINY else size, image_size=resolution)
    if size != TINY:
        return config
    return with_tiny_vocab_and_tower(config, resize_text_config(config.text, **TINY_TEXT))


def with_tiny_vocab_and_tower(config: FastVLMConfig, text: Qwen2Config) -> FastVLMConfig:
    """A copy of ``config`` whose decoder is ``text`` with a :data:`TINY_VOCAB`-token vocabulary
    (special tokens moved inside it) and whose tower is :data:`TINY_TOWER`."""
    special = {"bos_token_id": TINY_VOCAB - 2, "eos_token_id": TINY_VOCAB - 1}
    small = copy.deepcopy(config)
    small.text = Qwen2Config(**{**text.to_dict(), "vocab_size": TINY_VOCAB, **special})
    small.vision = TINY_TOWER
    return small


def build_fastvlm(size: str, resolution: int, *, device: torch.device, dtype: torch.dtype) -> FastVLM:
    """Our model with random weights on ``device`` in ``dtype``, its tower fused for inference."""
    model = FastVLM.from_config(model_config(size, resolution), device=device, dtype=dtype)
    model.vision_tower.fuse(dtype=dtype)
    return model


def random_pixels(batch: int, resolution: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[batch, 3, resolution, resolution] in [0, 1], already on the device (as after GPU preprocessing)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(batch, 3, resolution, resolution, generator=gen, device=device)


def batch_prompt(text_tokens: int, vocab: int, batch: int) -> torch.Tensor:
    """[batch, text_tokens + 1]: the same random prompt in every row, with one image marker (-200)."""
    return prompt_ids(text_tokens, vocab).repeat(batch, 1)


def prompt_inputs(model: FastVLM, resolution: int, *, text_tokens: int, batch: int) -> ModelInputs:
    """The decoder's inputs for ``batch`` copies of the prompt, each with its own random image."""
    pixels = random_pixels(batch, resolution, model.device)
    with torch.inference_mode():
        features = model.encode_images(pixels)
        return model.prepare_inputs(
            batch_prompt(text_tokens, model.config.text.vocab_size, batch), image_features=features
        )


# ------------------------------------------------------------------------------ timers


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median ms of ``fn()`` over ``repeats`` calls after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def graph_replay_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median ms of replaying ``fn()`` captured as one CUDA graph (its inputs fixed; CUDA only).

    What is left of ``fn``'s time once kernel-launch overhead is gone.
    """
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up on a side stream before capture, as CUDA graphs require
        for _ in range(max(warmup, 2)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, device, warmup=1, repeats=repeats)


def with_peak_gib(fn: Callable[[], T], device: torch.device) -> tuple[T, float | None]:
    """``fn()`` and the most GPU memory allocated during it, weights included (None off CUDA)."""
    if device.type != "cuda":
        return fn(), None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) / GIB


def attempt(notes: dict[str, str], key: str, fn: Callable[[], T]) -> T | None:
    """``fn()``, or None with the failure recorded in ``notes[key]`` (and its traceback printed).

    The benchmark keeps going past a failed measurement (an out-of-memory error, an API
    that differs in the installed transformers): one failure must not lose the others.
    """
    try:
        return fn()
    except Exception as err:  # recorded in the report, traceback printed: see the docstring
        traceback.print_exc()
        notes[key] = f"failed: {type(err).__name__}: {err}"[:NOTE_CHARS]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


# ------------------------------------------------------------------------------ FLOPs and bytes


def encoder_flops(config: FastVLMConfig, resolution: int) -> int:
    """FLOPs of tower + projector for one image, counted on the meta device (no compute)."""
    with torch.device("meta"):
        tower = FastViT(config.vision).eval()
        projector = MultiModalProjector(config.vision.out_channels, config.hidden_size, config.projector_depth)
        pixels = torch.empty(1, 3, resolution, resolution)
        return count_flops(lambda: projector(tower.image_embeddings(pixels)))


def decode_weight_bytes(text: Qwen2Config, dtype: torch.dtype) -> int:
    """Bytes of the decoder weights one decode step reads (see the module docstring)."""
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(copy.deepcopy(text))  # building a model edits its config
    nn.Module.to(lm, dtype)
    return decode_read_bytes(lm)


def kv_bytes_per_row(text: Qwen2Config, dtype: torch.dtype, kv_tokens: int) -> int:
    """Bytes of one row's KV cache over ``kv_tokens`` positions."""
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    values = 2 * text.num_hidden_layers * kv_heads * head_dim * kv_tokens
    return values * torch.finfo(dtype).bits // 8


def decode_bound_tokens_per_s(
    text: Qwen2Config, dtype: torch.dtype, *, batch: int, kv_tokens: int, copy_bytes_per_s: float
) -> float:
    """Tokens/s (all rows together) if every step ran at the copy bandwidth."""
    step_bytes = decode_weight_bytes(text, dtype) + batch * kv_bytes_per_row(text, dtype, kv_tokens)
    return batch * copy_bytes_per_s / step_bytes


# ------------------------------------------------------------------------------ rows


@dataclass
class LatencyRow:
    """Batch 1 at one resolution: the encoder, the prefill, and time to first token."""

    impl: str  # "fastvlm" (ours) or "transformers" (FastVlmForConditionalGeneration)
    llm: str
    resolution: int
    dtype: str
    visual_tokens: int
    prompt_tokens: int  # text + visual tokens in the prefill
    encoder_ms: float | None = None  # tower + projector, eager
    encoder_graph_ms: float | None = None  # the same, replayed as a CUDA graph
    encoder_gflops: float | None = None
    encoder_tflops_per_s: float | None = None  # from encoder_ms
    encoder_matmul_fraction: float | None = None  # of the measured bf16 matmul rate
    prefill_ms: float | None = None  # decoder over the whole prompt, visual tokens given
    ttft_ms: float | None = None  # pixels on the device -> first token, through the public API
    notes: dict[str, str] = field(default_factory=dict)  # measurement -> why it has no value


@dataclass
class DecodeRow:
    """Greedy decoding through the public API at one batch size."""

    impl: str
    llm: str
    resolution: int
    dtype: str
    batch: int
    kv_tokens: int  # prompt + new tokens: the KV cache at the end
    new_tokens: int
    tokens_per_s: float | None = None  # all rows together, decode steps only
    bound_tokens_per_s: float | None = None  # the copy-bandwidth bound (module docstring)
    bound_fraction: float | None = None  # tokens_per_s / bound_tokens_per_s
    peak_gib: float | None = None  # most GPU memory allocated during one generation, weights included
    weights_gib: float | None = None  # all of the model's weights
    notes: dict[str, str] = field(default_factory=dict)


def weights_gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / GIB


def fill_bound(row: DecodeRow, text: Qwen2Config, dtype: torch.dtype, copy_bytes_per_s: float | None) -> None:
    """Set ``row``'s bound and the fraction of it achieved (when both are known)."""
    if copy_bytes_per_s is None:
        row.notes.setdefault("bound", "no copy bandwidth was measured")
        return
    row.bound_tokens_per_s = decode_bound_tokens_per_s(
        text, dtype, batch=row.batch, kv_tokens=row.kv_tokens, copy_bytes_per_s=copy_bytes_per_s
    )
    if row.tokens_per_s is not None:
        row.bound_fraction = row.tokens_per_s / row.bound_tokens_per_s
