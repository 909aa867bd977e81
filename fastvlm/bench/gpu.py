"""FastVLM 0.5B/1.5B/7B on one GPU, against transformers' FastVLM on the same GPU.

For each size, with random weights in bf16: the fused encoder (tower + projector) at each
resolution, eager and replayed as a CUDA graph, with its FLOP rate against a measured
matmul rate; the decoder's prefill of the prompt (text + visual tokens); time to first
token through the generation API; greedy decode tokens/s at batch 1 and a large batch
against the copy-bandwidth bound (see :mod:`fastvlm.bench.gpu_common`), with peak
memory. transformers' ``FastVlmForConditionalGeneration`` gets the same measurements at
the first resolution (:mod:`fastvlm.bench.gpu_transformers`), and batch-1 decoding with
a static cache, eager and through ``torch.compile``, runs in a child process
(:mod:`fastvlm.bench.gpu_decode`). cuDNN picks its conv algorithms by timing them
(``cudnn.benchmark``), once per shape, inside the warm-ups, for both models alike.

A GPU is usually lent for minutes, so the run is built to lose as little as possible:
every measurement is attempted on its own (a failure is recorded and the rest go on),
the report is rewritten after each model (``gpu_speed.json`` and ``gpu_speed.md``), and
once the time budget is spent the remaining steps are listed as skipped, not run. The
ceilings (copy bandwidth, matmul rate) are measured in the same run, on the same GPU.
``GpuSettings.smoke()`` is the same run at toy sizes on a CPU, for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.metadata
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastvlm.bench.gpu_common import (
    DTYPE_NAMES,
    TINY,
    DecodeRow,
    LatencyRow,
    attempt,
    batch_prompt,
    build_fastvlm,
    dtype_name,
    encoder_flops,
    fill_bound,
    graph_replay_ms,
    median_ms,
    model_config,
    random_pixels,
    weights_gib,
    with_peak_gib,
)
from fastvlm.bench.gpu_decode import WARMUP_STEPS, run_isolated
from fastvlm.bench.gpu_report import fmt, format_report
from fastvlm.bench.limits import copy_rate, matmul_rate
from fastvlm.decoding import prefill
from fastvlm.generation import Timings, generate_tokens
from fastvlm.measure import machine_description
from fastvlm.model import FastVLM

REPORT_JSON = "gpu_speed.json"
REPORT_MD = "gpu_speed.md"
MIN_COMPILE_S = 60.0  # a compile step is not started with less of the budget left
BYTES_PER_MIB = 2**20


@dataclass(frozen=True)
class GpuSettings:
    """What one run measures and how long it may take (the defaults are the issue's GPU run)."""

    sizes: tuple[str, ...] = ("0.5b", "1.5b", "7b")
    resolutions: tuple[int, ...] = (1024, 512)  # decode and memory are measured at the first
    device: str = "cuda"
    dtype: str = "bfloat16"
    text_tokens: int = 32  # around the image marker: a template plus a short question
    new_tokens: int = 64
    batch: int = 32  # the large decode batch (batch 1 is always measured)
    warmup: int = 3
    repeats: int = 10
    decode_runs: int = 3
    budget_s: float = 300.0  # no new step starts after this many seconds
    transformers: bool = True
    compile_sizes: tuple[str, ...] = ("7b", "0.5b")  # 7B first: the size that can come near its bound
    compile_mode: str = "reduce-overhead"
    compile_timeout_s: float = 150.0
    copy_mib: int = 2048
    matmul_n: int = 8192
    cudnn_benchmark: bool = True  # let cuDNN time its conv algorithms once per shape (during warm-up)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]

    @classmethod
    def smoke(cls, **changes: Any) -> GpuSettings:
        """Every step at toy sizes on the CPU (seconds): for tests and for checking a setup."""
        small: dict[str, Any] = {
            "sizes": (TINY,),
            "resolutions": (128,),
            "device": "cpu",
            "dtype": "float32",
            "text_tokens": 8,
            "new_tokens": 4,
            "batch": 2,
            "warmup": 1,
            "repeats": 1,
            "decode_runs": 1,
            "compile_sizes": (TINY,),
            "compile_timeout_s": 120.0,
            "copy_mib": 16,
            "matmul_n": 256,
        }
        return cls(**(small | changes))


@dataclass
class Ceilings:
    """What the device can do at best, measured in this run."""

    device_name: str
    copy_mib: int
    copy_gb_per_s: float | None = None  # bytes read + bytes written per second, / 1e9
    matmul_n: int = 0
    matmul_dtype: str = ""
    matmul_tflops: float | None = None  # n x n x n product, 2 n^3 FLOPs
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class CompiledDecodeRow:
    """Batch-1 decode: the generation API against a static cache, eager and compiled (child process)."""

    llm: str
    resolution: int
    kv_tokens: int
    mode: str | None
    generate_tokens_per_s: float | None = None  # the generation API (DynamicCache), from the decode table
    eager_static_tokens_per_s: float | None = None
    compiled_tokens_per_s: float | None = None
    compile_s: float | None = None  # the first compiled step's wall time
    speedup: float | None = None  # compiled over the generation API
    bound_fraction: float | None = None  # compiled tokens/s over the decode table's bound
    same_tokens: float | None = None  # fraction of compiled greedy tokens equal to the eager static ones
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class GpuReport:
    meta: dict
    settings: dict
    ceilings: Ceilings | None = None
    latency: list[LatencyRow] = field(default_factory=list)
    decode: list[DecodeRow] = field(default_factory=list)
    compiled_decode: list[CompiledDecodeRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    complete: bool = False


# ------------------------------------------------------------------------------ ceilings


def measure_ceilings(settings: GpuSettings) -> Ceilings:
    """Device-to-device copy bandwidth and the rate of a large square matmul, on random data."""
    device = settings.torch_device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ceilings = Ceilings(device_name=name, copy_mib=settings.copy_mib)
    timing = {"warmup": settings.warmup, "repeats": settings.repeats}
    nbytes, n = settings.copy_mib * BYTES_PER_MIB, settings.matmul_n
    ceilings.copy_gb_per_s = attempt(ceilings.notes, "copy", lambda: copy_rate(nbytes, device, **timing).per_s / 1e9)
    ceilings.matmul_n, ceilings.matmul_dtype = n, settings.dtype
    ceilings.matmul_tflops = attempt(
        ceilings.notes, "matmul", lambda: matmul_rate(n, settings.torch_dtype, device, **timing).per_s / 1e12
    )
    return ceilings


# ------------------------------------------------------------------------------ ours


def _first_token(model: FastVLM, ids: torch.Tensor, pixels: torch.Tensor) -> None:
    for _ in generate_tokens(model, ids, pixel_values=pixels, max_new_tokens=1):
        pass


def _last_timings(model: FastVLM, ids: torch.Tensor, pixels: torch.Tensor, new_tokens: int) -> Timings:
    timings = Timings()
    for _, step_timings in generate_tokens(model, ids, pixel_values=pixels, max_new_tokens=new_tokens):
        timings = step_timings
    return timings


def fastvlm_latency(model: FastVLM, size: str, resolution: int, settings: GpuSettings) -> LatencyRow:
    """Encoder (eager and as a CUDA graph), prefill and TTFT of our model at batch 1."""
    device = settings.torch_device
    timing = {"warmup": settings.warmup, "repeats": settings.repeats}
    pixels = random_pixels(1, resolution, device)
    ids = batch_prompt(settings.text_tokens, model.config.text.vocab_size, 1)
    with torch.inference_mode():
        inputs = model.prepare_inputs(ids, image_features=model.encode_images(pixels))
    row = LatencyRow(
        impl="fastvlm",
        llm=size,
        resolution=resolution,
        dtype=dtype_name(settings.torch_dtype),
        visual_tokens=inputs.visual_tokens,
        prompt_tokens=inputs.input_ids.shape[1],
    )
    with torch.inference_mode():
        encode = lambda: model.encode_images(pixels)
        row.encoder_ms = attempt(row.notes, "encoder", lambda: median_ms(encode, device, **timing))
        if device.type == "cuda":
            row.encoder_graph_ms = attempt(
                row.notes, "encoder_graph", lambda: graph_replay_ms(encode, device, **timing)
            )
        else:
            row.notes["encoder_graph"] = "skipped: CUDA graphs need a GPU"
        row.prefill_ms = attempt(
            row.notes, "prefill", lambda: median_ms(lambda: prefill(model, inputs), device, **timing)
        )
    row.ttft_ms = attempt(
        row.notes, "ttft", lambda: median_ms(lambda: _first_token(model, ids, pixels), device, **timing)
    )
    return row


def fastvlm_decode(
    model: FastVLM, size: str, resolution: int, batch: int, settings: GpuSettings, copy_bytes_per_s: float | None
) -> DecodeRow:
    """Greedy decode tokens/s of :func:`generate_tokens` at ``batch`` (each row its own image) and peak memory."""
    device, n = settings.torch_device, settings.new_tokens
    pixels = random_pixels(batch, resolution, device)
    ids = batch_prompt(settings.text_tokens, model.config.text.vocab_size, batch)
    row = DecodeRow(
        impl="fastvlm",
        llm=size,
        resolution=resolution,
        dtype=dtype_name(settings.torch_dtype),
        batch=batch,
        kv_tokens=ids.shape[1] - 1 + model.config.num_image_tokens(resolution) + n,  # the marker expands
        new_tokens=n,
        weights_gib=weights_gib(model),
    )

    def measure() -> float:
        _last_timings(model, ids, pixels, 2)  # warm-up
        timings, row.peak_gib = with_peak_gib(lambda: _last_timings(model, ids, pixels, n), device)
        rates = [timings.decode_tokens_per_s]
        rates += [_last_timings(model, ids, pixels, n).decode_tokens_per_s for _ in range(settings.decode_runs - 1)]
        return sorted(rates)[len(rates) // 2]

    row.tokens_per_s = attempt(row.notes, "decode", measure)
    fill_bound(row, model.config.text, settings.torch_dtype, copy_bytes_per_s)
    return row


# ------------------------------------------------------------------------------ the run


class _Run:
    """One benchmark run: the report, the clock, progress lines and the flushes to ``out_dir``."""

    def __init__(self, settings: GpuSettings, out_dir: Path, log: Callable[[str], None]) -> None:
        self.settings, self.out_dir, self._log = settings, out_dir, log
        self.start = time.perf_counter()
        self.report = GpuReport(meta=run_description(settings), settings=asdict(settings))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.settings.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        self._log(f"[{self.elapsed():6.1f} s] {message}")

    def step(self, what: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` unless the budget is spent; a failure is recorded as skipped; then flush."""
        if self.left() <= 0:
            self.report.skipped.append(f"{what}: not run, past the {self.settings.budget_s:.0f} s budget")
            self.log(f"{what}: skipped (budget)")
            return
        self.log(f"{what} ...")
        notes: dict[str, str] = {}
        attempt(notes, what, fn)
        self.report.skipped += [f"{what}: {note}" for note in notes.values()]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.flush()

    def flush(self) -> None:
        self.report.elapsed_s = round(self.elapsed(), 1)
        write_report(self.report, self.out_dir)


def run_description(settings: GpuSettings) -> dict:
    """The machine plus the library versions the figures depend on."""
    meta = machine_description() | {"transformers": importlib.metadata.version("transformers")}
    try:
        meta["timm"] = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        meta["timm"] = None
    if settings.torch_device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


def run_gpu_benchmark(
    settings: GpuSettings, out_dir: str | os.PathLike, log: Callable[[str], None] = print
) -> GpuReport:
    """Measure everything the module docstring lists; the report is in ``out_dir`` after every step.

    Order, most wanted first in case the budget runs out: ceilings, our model at every
    size, the first compiled-decode size, transformers' model, the other compiled sizes.
    """
    run = _Run(settings, Path(out_dir), log)
    report = run.report
    previous_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark  # restored below
    try:
        run.step("ceilings", lambda: setattr(report, "ceilings", measure_ceilings(settings)))
        ceilings = report.ceilings
        bandwidth = ceilings.copy_gb_per_s * 1e9 if ceilings and ceilings.copy_gb_per_s else None
        matmul = ceilings.matmul_tflops if ceilings else None
        for size in settings.sizes:
            run.step(f"fastvlm {size}", functools.partial(_measure_ours, run, size, bandwidth, matmul))
        compile_sizes = list(settings.compile_sizes)
        if compile_sizes:
            _compile_step(run, compile_sizes.pop(0))
        if settings.transformers:
            for size in settings.sizes:
                run.step(f"transformers {size}", functools.partial(_measure_theirs, run, size, bandwidth, matmul))
        for size in compile_sizes:
            _compile_step(run, size)
    finally:
        torch.backends.cudnn.benchmark = previous_benchmark
    report.complete = True
    run.flush()
    run.log(f"done; report in {Path(out_dir) / REPORT_MD}")
    return report


def _compile_step(run: _Run, size: str) -> None:
    what = f"static/compiled decode {size}"
    if run.left() < MIN_COMPILE_S:
        run.report.skipped.append(f"{what}: not run, under {MIN_COMPILE_S:.0f} s of the budget left")
        return
    run.step(what, functools.partial(_measure_compiled, run, size))


def fill_flops(row: LatencyRow, flops: int, matmul_tflops: float | None) -> None:
    row.encoder_gflops = flops / 1e9
    if row.encoder_ms:
        row.encoder_tflops_per_s = flops / (row.encoder_ms / 1e3) / 1e12
        if matmul_tflops:
            row.encoder_matmul_fraction = row.encoder_tflops_per_s / matmul_tflops


def _latency_line(row: LatencyRow) -> str:
    return (
        f"{row.impl} {row.llm} {row.resolution} px: encoder {fmt(row.encoder_ms, '.2f')} ms "
        f"(graph {fmt(row.encoder_graph_ms, '.2f')}), prefill {fmt(row.prefill_ms, '.2f')} ms, "
        f"TTFT {fmt(row.ttft_ms, '.2f')} ms"
    )


def _decode_line(row: DecodeRow) -> str:
    return (
        f"{row.impl} {row.llm} batch {row.batch}: {fmt(row.tokens_per_s, ',.0f')} tokens/s "
        f"(bound {fmt(row.bound_tokens_per_s, ',.0f')}), peak {fmt(row.peak_gib, '.2f')} GiB"
    )


def _measure_ours(run: _Run, size: str, bandwidth: float | None, matmul: float | None) -> None:
    settings = run.settings
    model = build_fastvlm(size, settings.resolutions[0], device=settings.torch_device, dtype=settings.torch_dtype)
    for resolution in settings.resolutions:
        row = fastvlm_latency(model, size, resolution, settings)
        fill_flops(row, encoder_flops(model.config, resolution), matmul)
        run.report.latency.append(row)
        run.log(_latency_line(row))
    for batch in dict.fromkeys((1, settings.batch)):
        decode = fastvlm_decode(model, size, settings.resolutions[0], batch, settings, bandwidth)
        run.report.decode.append(decode)
        run.log(_decode_line(decode))


def _measure_theirs(run: _Run, size: str, bandwidth: float | None, matmul: float | None) -> None:
    from fastvlm.bench import gpu_transformers as theirs

    settings = run.settings
    config = model_config(size, settings.resolutions[0])
    try:
        model = theirs.build_transformers_fastvlm(config, device=settings.torch_device, dtype=settings.torch_dtype)
    except ImportError as err:
        reason = " ".join(str(err).split())  # transformers' messages span lines
        run.report.skipped.append(f"transformers {size}: unavailable: {reason}")
        run.log(f"transformers {size}: unavailable: {reason}")
        return
    resolution = settings.resolutions[0]  # one resolution only: GPU time is short
    row = theirs.measure_latency(model, size, resolution, settings)
    fill_flops(row, encoder_flops(config, resolution), matmul)
    run.report.latency.append(row)
    run.log(_latency_line(row))
    for batch in dict.fromkeys((1, settings.batch)):
        decode = theirs.measure_decode(model, size, settings.resolutions[0], batch, settings, bandwidth)
        run.report.decode.append(decode)
        run.log(_decode_line(decode))


def _measure_compiled(run: _Run, size: str) -> None:
    settings = run.settings
    mode = settings.compile_mode if settings.torch_device.type == "cuda" else None
    job = {
        "size": size,
        "resolution": settings.resolutions[0],
        "device": settings.device,
        "dtype": settings.dtype,
        "text_tokens": settings.text_tokens,
        "new_tokens": settings.new_tokens,
        "compile_mode": mode,
    }
    with tempfile.TemporaryDirectory() as scratch:
        timeout = min(settings.compile_timeout_s, max(run.left(), MIN_COMPILE_S))
        result = run_isolated(job, timeout_s=timeout, result_path=Path(scratch) / "result.json")
    run.report.compiled_decode.append(compiled_row(job, result, run.report.decode))


def compiled_row(job: dict, result: dict, decode_rows: list[DecodeRow]) -> CompiledDecodeRow:
    """The child's result beside the generation API's batch-1 row of the same model."""
    size, mode = job["size"], job["compile_mode"]
    visual = model_config(size, job["resolution"]).num_image_tokens(job["resolution"])
    kv = job["text_tokens"] + visual + WARMUP_STEPS + job["new_tokens"]
    row = CompiledDecodeRow(llm=size, resolution=job["resolution"], kv_tokens=kv, mode=mode)
    api = next((r for r in decode_rows if r.impl == "fastvlm" and r.llm == size and r.batch == 1), None)
    row.generate_tokens_per_s = api.tokens_per_s if api else None
    if "error" in result:
        row.notes["child"] = result["error"]
    if "eager_static" in result:
        row.eager_static_tokens_per_s = result["eager_static"]["tokens_per_s"]
    if mode is None:
        row.notes["compiled"] = "skipped: torch.compile is measured on CUDA only"
    elif "compile_error" in result:
        row.notes["compiled"] = f"failed: {result['compile_error']}"
    elif "compiled" in result:
        row.compiled_tokens_per_s = result["compiled"]["tokens_per_s"]
        row.compile_s = result["compiled"]["first_call_s"]
        row.same_tokens = result["same_tokens"]
        if row.generate_tokens_per_s:
            row.speedup = row.compiled_tokens_per_s / row.generate_tokens_per_s
        if api and api.bound_tokens_per_s:
            row.bound_fraction = row.compiled_tokens_per_s / api.bound_tokens_per_s
    return row


def write_report(report: GpuReport, out_dir: Path) -> None:
    """``gpu_speed.json`` and ``gpu_speed.md`` in ``out_dir``, each replaced whole (never half-written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {REPORT_JSON: json.dumps(asdict(report), indent=2) + "\n", REPORT_MD: format_report(report)}
    for name, text in texts.items():
        partial = out_dir / f".{name}.partial"
        partial.write_text(text)
        partial.replace(out_dir / name)


def settings_with(settings: GpuSettings, **changes: Any) -> GpuSettings:
    """``settings`` with ``changes`` (None values ignored): the command line's overrides."""
    return dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
