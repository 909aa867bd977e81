"""Time to first token of a FastVLM-sized model with random weights, by input resolution.

TTFT = vision encoding (fused FastViTHD + projector) + LLM prefill of the text and the
visual tokens (+ picking the first token); decode speed is measured over the following
tokens with the KV cache. Latency does not depend on the weights' values, so random
weights of the published architecture give the real figures.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastvlm.generation import Timings, generate_tokens
from fastvlm.measure import markdown_table, mib, peak_memory_mb
from fastvlm.model import FastVLM
from fastvlm.presets import fastvlm_config
from fastvlm.processing import IMAGE_TOKEN_INDEX

# Prompt ids are drawn this far from both ends of the vocabulary, away from special tokens.
VOCAB_EDGE = 1000
WARMUP_NEW_TOKENS = 2  # the warm-up and memory runs: one prefill and one decode step


@dataclass
class TTFTRow:
    device: str
    dtype: str
    llm: str
    resolution: int
    visual_tokens: int
    prompt_tokens: int
    vision_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_tokens_per_s: float
    peak_mb: float | None


def prompt_ids(text_tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """A template-sized prompt: random text ids around one image marker."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB_EDGE, vocab - VOCAB_EDGE, (text_tokens,), generator=gen)
    half = text_tokens // 2
    return torch.cat([ids[:half], torch.tensor([IMAGE_TOKEN_INDEX]), ids[half:]])[None]


def _run(model: FastVLM, ids: torch.Tensor, pixels: torch.Tensor, new_tokens: int) -> Timings:
    timings = Timings()
    for _, step_timings in generate_tokens(model, ids, pixel_values=pixels, max_new_tokens=new_tokens):
        timings = step_timings
    return timings


def run_ttft_benchmark(
    resolutions: list[int],
    *,
    llm: str = "0.5b",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_tokens: int = 40,
    new_tokens: int = 16,
    repeats: int = 3,
    progress: bool = True,
) -> list[TTFTRow]:
    """One row per resolution: medians of ``repeats`` generations after a warm-up, and one call's peak memory."""
    model = FastVLM.from_config(fastvlm_config(llm), device=device, dtype=dtype)
    model.vision_tower.fuse(dtype=dtype)
    ids = prompt_ids(text_tokens, model.config.text.vocab_size)
    rows = []
    for resolution in tqdm(resolutions, desc="TTFT", unit="resolution", disable=not progress):
        pixels = torch.rand(1, 3, resolution, resolution)
        _run(model, ids, pixels, WARMUP_NEW_TOKENS)  # warm-up
        runs = [_run(model, ids, pixels, new_tokens) for _ in range(repeats)]
        warm_run = functools.partial(_run, model, ids, pixels, WARMUP_NEW_TOKENS)
        peak = peak_memory_mb(warm_run, torch.device(device))

        def median(field: str, runs: list[Timings] = runs) -> float:
            return statistics.median(getattr(t, field) for t in runs)

        rows.append(
            TTFTRow(
                device=device,
                dtype=str(dtype).removeprefix("torch."),
                llm=llm,
                resolution=resolution,
                visual_tokens=runs[0].visual_tokens,
                prompt_tokens=runs[0].prompt_tokens,
                vision_ms=median("vision_ms"),
                prefill_ms=median("prefill_ms"),
                ttft_ms=median("ttft_ms"),
                decode_tokens_per_s=median("decode_tokens_per_s"),
                peak_mb=peak,
            )
        )
    return rows


def format_ttft_table(rows: list[TTFTRow]) -> str:
    """The rows as a markdown table, one line per (device, resolution)."""
    columns = [
        "device",
        "dtype",
        "LLM",
        ">px",
        ">visual tokens",
        ">prompt tokens",
        ">vision ms",
        ">prefill ms",
        ">TTFT ms",
        ">decode tok/s",
        ">peak MiB",
    ]
    cells = [
        [
            r.device,
            r.dtype,
            r.llm,
            str(r.resolution),
            str(r.visual_tokens),
            str(r.prompt_tokens),
            f"{r.vision_ms:,.0f}",
            f"{r.prefill_ms:,.0f}",
            f"{r.ttft_ms:,.0f}",
            f"{r.decode_tokens_per_s:.1f}",
            mib(r.peak_mb),
        ]
        for r in rows
    ]
    return markdown_table(columns, cells)
