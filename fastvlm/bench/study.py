"""The paper's efficiency study: encoders x resolutions x LLMs, TTFT = vision + prefill.

For each encoder and input side: visual tokens, parameters, GFLOPs, median latency and
peak memory. For each LLM: prefill time of the visual tokens (the paper's protocol: no
text tokens). TTFT pairs the two. Everything runs with random weights of the published
architectures; the paper's own numbers are reported beside ours, as ratios.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from fastvlm.bench.baselines import ENCODERS, build_encoder
from fastvlm.bench.paper import (
    ENCODER_LATENCY_MS,
    PAPER_RATIOS,
    PREFILL_MS,
    PUBLISHED_AVG5,
    PUBLISHED_PARAMS_M,
    PUBLISHED_TTFT_MS,
    TILED_TTFT_MS,
    TILED_VISION_MS,
)
from fastvlm.errors import ConfigError
from fastvlm.measure import count_flops, median_latency_ms, peak_memory_mb, synchronize

if TYPE_CHECKING:
    from tqdm import tqdm as ProgressBar
    from transformers import PretrainedConfig, PreTrainedModel

QUICK_ENCODERS = ["fastvithd", "vit_l14", "convnext_l"]
QUICK_RESOLUTIONS = [256, 512, 1024]
DEFAULT_ENCODERS = list(ENCODERS)
DEFAULT_RESOLUTIONS = [256, 512, 768, 1024]
LLM_NAMES = ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "vicuna-7b"]
# A call slower than this is timed once: its one-time costs are noise, and repeating it would cost minutes.
LONG_CALL_S = 10.0
# The sides at which the paper quotes a baseline (measured in addition, so its ratios can be checked).
REFERENCE_SIDES = {"vit_l14": [336], "siglip_so400m": [384]}
# The paper's AnyRes: a 2x2 grid of tiles at half the side plus a global view = 5 passes.
ANYRES_TILES = 5
# An LLM is built only when its weights fit with this margin (activations, KV cache, allocator slack).
LLM_MEMORY_MARGIN = 1.2
GIB = 2**30
MS_PER_S = 1e3
INIT_STD = 0.02  # the random weights' standard deviation (Qwen2's and Llama's initializer_range)


@dataclass
class EncoderResult:
    encoder: str
    label: str
    resolution: int
    input_px: int
    tiles: int
    tokens: int
    params_m: float
    published_params_m: float | None
    gflops: float
    latency_ms: float
    peak_mb: float | None
    paper_latency_ms: float | None
    paper_source: str | None
    device: str
    dtype: str


@dataclass
class PrefillResult:
    llm: str
    tokens: int
    prefill_ms: float
    paper_prefill_ms: float | None
    device: str
    dtype: str


@dataclass
class TTFTResult:
    encoder: str
    resolution: int
    tiles: int
    llm: str
    tokens: int
    vision_ms: float
    prefill_ms: float
    ttft_ms: float
    paper_ttft_ms: float | None
    published_avg5: float | None
    avg5_source: str | None
    recipe: str | None


@dataclass
class RatioResult:
    claim: str
    ours: float | None
    paper: float
    source: str
    note: str


@dataclass
class StudyResults:
    meta: dict
    encoders: list[EncoderResult] = field(default_factory=list)
    prefill: list[PrefillResult] = field(default_factory=list)
    ttft: list[TTFTResult] = field(default_factory=list)
    ratios: list[RatioResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ LLMs


def llm_config(name: str) -> PretrainedConfig:
    """Decoder configuration of a published LLM (Qwen2 chat sizes of FastVLM; Vicuna-7B of LLaVA-1.5)."""
    from transformers import LlamaConfig

    from fastvlm.presets import QWEN2_PRESETS, qwen2_config

    if name.startswith("qwen2-"):
        size = name.removeprefix("qwen2-")
        if size not in QWEN2_PRESETS:
            raise ConfigError(f"unknown LLM {name!r}; expected one of {LLM_NAMES}")
        return qwen2_config(size)
    if name == "vicuna-7b":  # lmsys/vicuna-7b-v1.5's config.json
        return LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
        )
    raise ConfigError(f"unknown LLM {name!r}; expected one of {LLM_NAMES}")


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_llm(
    name: str, *, device: torch.device, dtype: torch.dtype, config: PretrainedConfig | None = None
) -> PreTrainedModel | str:
    """A random-weight decoder, or a string saying why it was skipped (not enough memory)."""
    from transformers import AutoModelForCausalLM

    config = config or llm_config(name)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(dtype)  # allocate in the target dtype only
    need = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_memory_bytes()
    if free is not None and need * LLM_MEMORY_MARGIN > free:
        return (
            f"{name} skipped: its {dtype} weights need {need / GIB:.1f} GiB and {free / GIB:.1f} GiB "
            f"is free on {device}"
        )
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, INIT_STD, generator=gen)
        for m in model.modules():  # norms start at 1, as after real training they are near it
            if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
    with torch.device(device):  # rotary tables are non-persistent buffers: rebuild them after to_empty
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def measure_prefill(model: PreTrainedModel, tokens: int, device: torch.device, *, repeats: int) -> float:
    """Median ms to run ``tokens`` embeddings through the decoder, building its KV cache."""
    hidden = model.config.hidden_size
    embeds = torch.randn(1, tokens, hidden, device=device, generator=torch.Generator(device=device).manual_seed(0))
    embeds = (embeds * INIT_STD).to(next(model.parameters()).dtype)

    def run() -> None:
        model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        return warm_then_time(run, device, repeats)[0]


def warm_then_time(
    fn: Callable[[], Any], device: torch.device, repeats: int, *, with_peak: bool = False
) -> tuple[float, float | None]:
    """(median ms, peak MiB or None) of ``fn`` after a timed warm-up call.

    A warm-up slower than ``LONG_CALL_S`` is itself the measurement (and, with
    ``with_peak``, the memory one). Otherwise the memory is taken on a second call, after
    one-time allocations (packed weights, kernel caches) are made, then ``repeats`` calls
    are timed.
    """
    start = time.perf_counter()
    peak = peak_memory_mb(fn, device) if with_peak else fn()
    synchronize(device)
    first_ms = (time.perf_counter() - start) * MS_PER_S
    if first_ms > LONG_CALL_S * MS_PER_S:
        return first_ms, peak if with_peak else None
    if with_peak:
        peak = peak_memory_mb(fn, device)
    return median_latency_ms({"call": fn}, device, warmup=0, repeats=repeats)["call"], peak


# ------------------------------------------------------------------------------------------ study


def _sides(encoders: list[str], resolutions: list[int]) -> dict[str, list[int]]:
    sides = {name: list(resolutions) for name in encoders}
    for name, extra in REFERENCE_SIDES.items():
        if name in sides:
            sides[name] = sorted(set(sides[name]) | set(extra))
    return sides


def run_study(
    encoders: list[str],
    resolutions: list[int],
    llms: list[str],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    llm_dtype: torch.dtype | None = None,
    repeats: int = 3,
    tiling: bool = False,
    progress: bool = True,
    llm_configs: dict | None = None,
    meta: dict | None = None,
) -> StudyResults:
    """Measure everything; see the module docstring. ``llm_configs`` overrides configurations (tests)."""
    dev = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    run = {"device": device, "dtype": dtype_name, "repeats": repeats, "tiling": tiling}
    results = StudyResults(meta=dict(meta or {}) | run)
    jobs = [(name, side, 1) for name, sides in _sides(encoders, resolutions).items() for side in sides]
    if tiling:  # the paper's AnyRes at twice the largest side
        jobs += [(name, 2 * max(resolutions), ANYRES_TILES) for name in encoders]
    bar = tqdm(total=len(jobs) + len(llms), desc="efficiency study", unit="step", disable=not progress)
    for name in encoders:
        sides = [(side, tiles) for job_name, side, tiles in jobs if job_name == name]
        results.encoders += _measure_encoder(name, sides, device, dtype, repeats=repeats, bar=bar)
        _release_cuda_cache(dev)  # what mem_get_info reports as free must be free for the LLMs
    token_counts = sorted({r.tokens for r in results.encoders})
    for llm in llms:
        bar.set_postfix_str(f"{llm} prefill")
        ldtype = llm_dtype or (torch.bfloat16 if llm.endswith("7b") or dev.type == "cuda" else torch.float32)
        model = build_llm(llm, device=dev, dtype=ldtype, config=(llm_configs or {}).get(llm))
        if isinstance(model, str):
            results.skipped.append(model)
        else:
            results.prefill += _measure_prefills(llm, model, token_counts, device, ldtype, repeats=repeats)
            del model
            _release_cuda_cache(dev)
        bar.update()
    bar.close()
    results.ttft = pair_ttft(results.encoders, results.prefill, llms)
    results.ratios = compute_ratios(results, llms)
    return results


def _release_cuda_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_encoder(
    name: str,
    sides: list[tuple[int, int]],
    device_name: str,
    dtype: torch.dtype,
    *,
    repeats: int,
    bar: ProgressBar,
) -> list[EncoderResult]:
    """One row per (side, tiles) of encoder ``name``: latency and memory on the device, FLOPs on meta."""
    device = torch.device(device_name)
    spec = ENCODERS[name]
    model = build_encoder(name, device=device, dtype=dtype)
    with torch.device("meta"):
        meta_model = build_encoder(name, device="meta", fused=False)
    params = spec.num_parameters(meta_model) / 1e6
    rows = []
    for side, tiles in sides:
        bar.set_postfix_str(f"{spec.label} @ {side}" + (" tiled" if tiles > 1 else ""))
        tile_side = spec.input_side(side // 2 if tiles > 1 else side)
        pixels = torch.rand(tiles, 3, tile_side, tile_side, device=device).to(dtype)
        call = functools.partial(spec.encode, model, pixels)
        with torch.inference_mode():
            latency, peak = warm_then_time(call, device, repeats, with_peak=True)
        meta_pixels = torch.empty(tiles, 3, tile_side, tile_side, device="meta")
        flops = count_flops(functools.partial(spec.encode, meta_model, meta_pixels))
        del call, pixels
        paper_ms: float | None
        paper_source: str | None
        if tiles > 1:
            paper_ms, paper_source = TILED_VISION_MS.get((name, side)), "Tab. 10 (AnyRes)"
        else:
            paper_ms, paper_source = ENCODER_LATENCY_MS.get((name, side), (None, None))
        rows.append(
            EncoderResult(
                encoder=name,
                label=spec.label,
                resolution=side,
                input_px=tile_side,
                tiles=tiles,
                tokens=tiles * spec.tokens(tile_side),
                params_m=round(params, 2),
                published_params_m=PUBLISHED_PARAMS_M.get(name),
                gflops=round(flops / 1e9, 2),
                latency_ms=latency,
                peak_mb=peak,
                paper_latency_ms=paper_ms,
                paper_source=paper_source,
                device=device_name,
                dtype=str(dtype).removeprefix("torch."),
            )
        )
        bar.update()
    return rows


def _measure_prefills(
    llm: str, model: PreTrainedModel, token_counts: list[int], device_name: str, dtype: torch.dtype, *, repeats: int
) -> list[PrefillResult]:
    device = torch.device(device_name)
    return [
        PrefillResult(
            llm=llm,
            tokens=n,
            prefill_ms=measure_prefill(model, n, device, repeats=repeats),
            paper_prefill_ms=PREFILL_MS.get((llm, n)),
            device=device_name,
            dtype=str(dtype).removeprefix("torch."),
        )
        for n in token_counts
    ]


def pair_ttft(encoders: list[EncoderResult], prefills: list[PrefillResult], llms: list[str]) -> list[TTFTResult]:
    """TTFT = vision + prefill of the same number of tokens, for every encoder row and measured LLM."""
    prefill = {(p.llm, p.tokens): p.prefill_ms for p in prefills}
    rows = []
    for enc in encoders:
        for llm in llms:
            if (llm, enc.tokens) not in prefill:
                continue
            key = (enc.encoder, enc.resolution, llm)
            source, recipe, avg5 = PUBLISHED_AVG5.get(key, (None, None, None)) if enc.tiles == 1 else (None,) * 3
            paper_ttft = PUBLISHED_TTFT_MS.get(key) if enc.tiles == 1 else TILED_TTFT_MS.get(key)
            rows.append(
                TTFTResult(
                    encoder=enc.encoder,
                    resolution=enc.resolution,
                    tiles=enc.tiles,
                    llm=llm,
                    tokens=enc.tokens,
                    vision_ms=enc.latency_ms,
                    prefill_ms=prefill[(llm, enc.tokens)],
                    ttft_ms=enc.latency_ms + prefill[(llm, enc.tokens)],
                    paper_ttft_ms=paper_ttft,
                    published_avg5=avg5,
                    avg5_source=source,
                    recipe=recipe,
                )
            )
    return rows


def compute_ratios(results: StudyResults, llms: list[str]) -> list[RatioResult]:
    """The paper's headline ratios next to ours, where we measured both sides."""
    latency = {(e.encoder, e.resolution): e for e in results.encoders if e.tiles == 1}
    ttft = {(t.encoder, t.resolution, t.llm): t.ttft_ms for t in results.ttft if t.tiles == 1}
    out = []
    for claim in PAPER_RATIOS:
        num, den = claim.numerator, claim.denominator
        ours: float | None = None
        note = ""
        if num not in latency or den not in latency:
            note = f"not measured: needs {num[0]}@{num[1]} and {den[0]}@{den[1]}"
        elif claim.kind == "latency":
            ours = latency[num].latency_ms / latency[den].latency_ms
        elif claim.kind == "tokens":
            ours = latency[num].tokens / latency[den].tokens
        elif claim.kind == "params":
            ours = latency[num].params_m / latency[den].params_m
        else:  # TTFT: with the claim's own LLM when measured, else the first measured one (said so)
            measured = [llm for llm in llms if (*num, llm) in ttft and (*den, llm) in ttft]
            llm = claim.llm if claim.llm in measured else (measured[0] if measured else None)
            if llm is None:
                note = "not measured: no LLM prefill"
            else:
                num_key, den_key = (*num, llm), (*den, llm)
                ours = ttft[num_key] / ttft[den_key]
                note = f"ours with {llm}" + ("" if llm == claim.llm else f"; the paper's is with {claim.llm}")
        source = f"{claim.source} ({claim.llm})" if claim.llm else claim.source
        out.append(
            RatioResult(
                claim=claim.label,
                ours=None if ours is None else round(ours, 2),
                paper=round(claim.paper, 2),
                source=source,
                note=note,
            )
        )
    return out
