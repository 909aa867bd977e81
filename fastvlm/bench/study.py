"""The paper's efficiency study: encoders x resolutions x LLMs, TTFT = vision + prefill.

For each encoder and input side: visual tokens, parameters, GFLOPs, median latency and
peak memory. For each LLM: prefill time of the visual tokens (the paper's protocol: no
text tokens). TTFT pairs the two. Everything runs with random weights of the published
architectures; the paper's own numbers are reported beside ours, as ratios.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from fastvlm.bench.measure import count_flops, median_latency_ms, peak_memory_mb, synchronize
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
from fastvlm.vision.baselines import ENCODERS, build_encoder

QUICK_ENCODERS = ["fastvithd", "vit_l14", "convnext_l"]
QUICK_RESOLUTIONS = [256, 512, 1024]
DEFAULT_ENCODERS = list(ENCODERS)
DEFAULT_RESOLUTIONS = [256, 512, 768, 1024]
LLM_NAMES = ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "vicuna-7b"]
# A call slower than this is timed once: its one-time costs are noise, and repeating it would cost minutes.
LONG_CALL_S = 10.0
# The sides at which the paper quotes a baseline (measured in addition, so its ratios can be checked).
REFERENCE_SIDES = {"vit_l14": [336], "siglip_so400m": [384]}


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


def llm_config(name: str):
    """Decoder configuration of a published LLM (Qwen2 chat sizes of FastVLM; Vicuna-7B of LLaVA-1.5)."""
    from transformers import LlamaConfig

    from fastvlm.model import QWEN2_PRESETS, qwen2_config

    if name.startswith("qwen2-"):
        size = name.removeprefix("qwen2-")
        if size not in QWEN2_PRESETS:
            raise ValueError(f"unknown LLM {name!r}; expected one of {LLM_NAMES}")
        return qwen2_config(size)
    if name == "vicuna-7b":
        return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    raise ValueError(f"unknown LLM {name!r}; expected one of {LLM_NAMES}")


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_llm(name: str, *, device: torch.device, dtype: torch.dtype, config=None):
    """A random-weight decoder, or a string saying why it was skipped (not enough memory)."""
    from transformers import AutoModelForCausalLM

    config = config or llm_config(name)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(dtype)  # allocate in the target dtype only
    need = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_memory_bytes()
    if free is not None and need * 1.2 > free:
        return (f"{name} skipped: its {dtype} weights need {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB "
                f"is free on {device}")  # fmt: skip
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for m in model.modules():  # norms start at 1, as after real training they are near it
            if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
    with torch.device(device):  # rotary tables are non-persistent buffers: rebuild them after to_empty
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def measure_prefill(model, tokens: int, device: torch.device, *, repeats: int) -> float:
    """Median ms to run ``tokens`` embeddings through the decoder, building its KV cache."""
    hidden = model.config.hidden_size
    embeds = torch.randn(1, tokens, hidden, device=device, generator=torch.Generator(device=device).manual_seed(0))
    embeds = (embeds * 0.02).to(next(model.parameters()).dtype)

    def run() -> None:
        model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        return warm_then_time(run, device, repeats)[0]


def warm_then_time(fn, device: torch.device, repeats: int, *, with_peak: bool = False) -> tuple[float, float | None]:
    """(median ms, peak MiB or None) of ``fn`` after a timed warm-up call.

    A warm-up slower than ``LONG_CALL_S`` is itself the measurement (and, with
    ``with_peak``, the memory one). Otherwise the memory is taken on a second call, after
    one-time allocations (packed weights, kernel caches) are made, then ``repeats`` calls
    are timed.
    """
    start = time.perf_counter()
    peak = peak_memory_mb(fn, device) if with_peak else fn()
    synchronize(device)
    first_ms = (time.perf_counter() - start) * 1e3
    if first_ms > LONG_CALL_S * 1e3:
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
    results = StudyResults(meta=dict(meta or {}) | {"device": device, "dtype": str(dtype).removeprefix("torch."),
                                                    "repeats": repeats, "tiling": tiling})  # fmt: skip
    jobs = [(name, side, 1) for name, sides in _sides(encoders, resolutions).items() for side in sides]
    if tiling:  # the paper's AnyRes: a 2x2 grid of tiles at half the side plus a global view = 5 passes
        jobs += [(name, 2 * max(resolutions), 5) for name in encoders]
    bar = tqdm(total=len(jobs) + len(llms), desc="efficiency study", unit="step", disable=not progress)
    for name in encoders:
        spec = ENCODERS[name]
        model = build_encoder(name, device=dev, dtype=dtype)
        with torch.device("meta"):
            meta_model = build_encoder(name, device="meta", fused=False)
        params = spec.num_parameters(meta_model) / 1e6
        for _, side, tiles in [j for j in jobs if j[0] == name]:
            bar.set_postfix_str(f"{spec.label} @ {side}" + (" tiled" if tiles > 1 else ""))
            tile_side = spec.input_side(side // 2 if tiles > 1 else side)
            pixels = torch.rand(tiles, 3, tile_side, tile_side, device=dev).to(dtype)
            call = functools.partial(spec.encode, model, pixels)
            with torch.inference_mode():
                latency, peak = warm_then_time(call, dev, repeats, with_peak=True)
            meta_pixels = torch.empty(tiles, 3, tile_side, tile_side, device="meta")
            flops = count_flops(functools.partial(spec.encode, meta_model, meta_pixels))
            del call, pixels
            if tiles > 1:
                paper_ms, paper_source = TILED_VISION_MS.get((name, side)), "Tab. 10 (AnyRes)"
            else:
                paper_ms, paper_source = ENCODER_LATENCY_MS.get((name, side), (None, None))
            results.encoders.append(EncoderResult(
                encoder=name, label=spec.label, resolution=side, input_px=tile_side, tiles=tiles,
                tokens=tiles * spec.tokens(tile_side), params_m=round(params, 2),
                published_params_m=PUBLISHED_PARAMS_M.get(name), gflops=round(flops / 1e9, 2),
                latency_ms=latency, peak_mb=peak, paper_latency_ms=paper_ms, paper_source=paper_source,
                device=device, dtype=str(dtype).removeprefix("torch."),
            ))  # fmt: skip
            bar.update()
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # what mem_get_info reports as free must be free for the LLMs

    token_counts = sorted({r.tokens for r in results.encoders})
    for llm in llms:
        bar.set_postfix_str(f"{llm} prefill")
        ldtype = llm_dtype or (torch.bfloat16 if llm.endswith("7b") or dev.type == "cuda" else torch.float32)
        config = (llm_configs or {}).get(llm)
        model = build_llm(llm, device=dev, dtype=ldtype, config=config)
        if isinstance(model, str):
            results.skipped.append(model)
            bar.update()
            continue
        for n in token_counts:
            ms = measure_prefill(model, n, dev, repeats=repeats)
            results.prefill.append(PrefillResult(llm, n, ms, PREFILL_MS.get((llm, n)), device,
                                                 str(ldtype).removeprefix("torch.")))  # fmt: skip
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        bar.update()
    bar.close()

    prefill = {(p.llm, p.tokens): p.prefill_ms for p in results.prefill}
    for enc in results.encoders:
        for llm in llms:
            if (llm, enc.tokens) not in prefill:
                continue
            key = (enc.encoder, enc.resolution, llm)
            source, recipe, avg5 = PUBLISHED_AVG5.get(key, (None, None, None)) if enc.tiles == 1 else (None,) * 3
            paper_ttft = PUBLISHED_TTFT_MS.get(key) if enc.tiles == 1 else TILED_TTFT_MS.get(key)
            results.ttft.append(TTFTResult(
                encoder=enc.encoder, resolution=enc.resolution, tiles=enc.tiles, llm=llm, tokens=enc.tokens,
                vision_ms=enc.latency_ms, prefill_ms=prefill[(llm, enc.tokens)],
                ttft_ms=enc.latency_ms + prefill[(llm, enc.tokens)],
                paper_ttft_ms=paper_ttft, published_avg5=avg5, avg5_source=source, recipe=recipe,
            ))  # fmt: skip
    results.ratios = compute_ratios(results, llms)
    return results


def compute_ratios(results: StudyResults, llms: list[str]) -> list[RatioResult]:
    """The paper's headline ratios next to ours, where we measured both sides."""
    latency = {(e.encoder, e.resolution): e for e in results.encoders if e.tiles == 1}
    ttft = {(t.encoder, t.resolution, t.llm): t.ttft_ms for t in results.ttft if t.tiles == 1}
    out = []
    for claim, kind, num, den, paper, source, claim_llm in PAPER_RATIOS:
        ours, note = None, ""
        if num not in latency or den not in latency:
            note = f"not measured: needs {num[0]}@{num[1]} and {den[0]}@{den[1]}"
        elif kind == "latency":
            ours = latency[num].latency_ms / latency[den].latency_ms
        elif kind == "tokens":
            ours = latency[num].tokens / latency[den].tokens
        elif kind == "params":
            ours = latency[num].params_m / latency[den].params_m
        else:  # TTFT: with the claim's own LLM when measured, else the first measured one (said so)
            measured = [llm for llm in llms if (*num, llm) in ttft and (*den, llm) in ttft]
            llm = claim_llm if claim_llm in measured else (measured[0] if measured else None)
            if llm is None:
                note = "not measured: no LLM prefill"
            else:
                ours = ttft[(*num, llm)] / ttft[(*den, llm)]
                note = f"ours with {llm}" + ("" if llm == claim_llm else f"; the paper's is with {claim_llm}")
        paper_note = f"{source} ({claim_llm})" if claim_llm else source
        out.append(RatioResult(claim, None if ours is None else round(ours, 2), round(paper, 2), paper_note, note))
    return out
