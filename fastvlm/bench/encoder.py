"""FastViTHD latency: the released (unfused) inference form against our fused form.

Both forms run in the same process on the same random weights (latency does not depend
on the values), interleaved call by call. Each row reports, for one device and input
resolution: visual tokens, GFLOPs, median latency of each form, their ratio, peak
memory of one call, and the largest difference between the two forms' outputs (a
guard that the speed-up is not bought with a different function). Where the fused form
runs our depthwise kernel (fp32 on a CPU that built it), the same fused tower with torch's
depthwise convs is timed alongside, interleaved too, for that kernel's own speed-up.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastvlm import native
from fastvlm.measure import count_flops, markdown_table, median_latency_ms, mib, peak_memory_mb
from fastvlm.vision import FastViTConfig, FastViTHD, kernels

# Random BatchNorm statistics: means ~ N(0, 0.1), variances ~ U(0.5, 1.5).
RUNNING_MEAN_STD = 0.1
RUNNING_VAR_MIN = 0.5


@dataclass
class EncoderRow:
    device: str
    dtype: str
    resolution: int
    batch: int
    tokens: int
    gflops: float
    unfused_ms: float
    fused_ms: float
    speedup: float
    unfused_peak_mb: float | None
    fused_peak_mb: float | None
    max_rel_diff: float
    torch_depthwise_ms: float | None = None  # the fused form with torch's depthwise convs, where ours run


def _with_torch_depthwise(call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``call`` with the fused tower's depthwise convs sent to torch's (kernels.NATIVE_DEPTHWISE off)."""

    def run() -> torch.Tensor:
        saved, kernels.NATIVE_DEPTHWISE = kernels.NATIVE_DEPTHWISE, False
        try:
            return call()
        finally:
            kernels.NATIVE_DEPTHWISE = saved

    return run


def randomize_statistics(model: torch.nn.Module, seed: int = 0, layer_scale_max: float = 0.2) -> None:
    """Move BatchNorm statistics and layer scales off their defaults so every path matters.

    Means ~ N(0, 0.1), variances ~ U(0.5, 1.5), layer scales ~ U(0, layer_scale_max):
    moderate enough to keep FastViTHD's 44 residual blocks numerically tame.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * RUNNING_MEAN_STD)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + RUNNING_VAR_MIN)
            elif "layer_scale" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * layer_scale_max)


def measure_forms(
    reference: FastViTHD,
    device_name: str,
    resolution: int,
    *,
    batch: int,
    repeats: int,
    warmup: int,
    fused_dtype: torch.dtype | None,
) -> EncoderRow:
    """One row: the released inference form and the fused form of ``reference`` on one device and size.

    ``fused_dtype`` None means float32 on CPU and bfloat16 on GPU.
    """
    device = torch.device(device_name)
    if fused_dtype is None:  # fp32 keeps CPU results within the parity tolerance; bf16 is what GPUs want
        fused_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    forms = {
        "unfused": copy.deepcopy(reference).to(device),
        "fused": copy.deepcopy(reference).to(device).fuse(dtype=fused_dtype),
    }
    x = torch.rand(batch, 3, resolution, resolution, device=device)
    calls: dict[str, Callable[[], torch.Tensor]] = {name: functools.partial(model, x) for name, model in forms.items()}
    ours_run = device.type == "cpu" and fused_dtype == torch.float32 and native.depthwise_conv_kernel() is not None
    if ours_run and kernels.NATIVE_DEPTHWISE:
        calls["torch depthwise"] = _with_torch_depthwise(calls["fused"])
    with torch.inference_mode():
        timings = median_latency_ms(calls, device, warmup=warmup, repeats=repeats)
        peaks = {name: peak_memory_mb(call, device) for name, call in calls.items()}
        a, b = calls["unfused"]().float(), calls["fused"]().float()
        diff = ((a - b).abs().max() / a.abs().max().clamp(min=1)).item()
    with torch.device("meta"):
        meta_model = FastViTHD(reference.config).eval()
        flops = count_flops(functools.partial(meta_model, torch.empty(batch, 3, resolution, resolution)))
    return EncoderRow(
        device=device_name,
        dtype=str(fused_dtype).removeprefix("torch."),
        resolution=resolution,
        batch=batch,
        tokens=reference.config.num_tokens(resolution),
        gflops=flops / 1e9,
        unfused_ms=timings["unfused"],
        fused_ms=timings["fused"],
        speedup=timings["unfused"] / timings["fused"],
        unfused_peak_mb=peaks["unfused"],
        fused_peak_mb=peaks["fused"],
        max_rel_diff=diff,
        torch_depthwise_ms=timings.get("torch depthwise"),
    )


def run_encoder_benchmark(
    resolutions: list[int],
    devices: list[str],
    *,
    config: FastViTConfig | None = None,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    fused_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[EncoderRow]:
    """Rows for every (device, resolution), all from one random-weight tower."""
    torch.manual_seed(0)
    reference = FastViTHD(config).eval()
    randomize_statistics(reference)
    jobs = [(d, r) for d in devices for r in resolutions]
    return [
        measure_forms(
            reference, device, resolution, batch=batch, repeats=repeats, warmup=warmup, fused_dtype=fused_dtype
        )
        for device, resolution in tqdm(jobs, desc="encoder latency", disable=not progress, unit="config")
    ]


def format_table(rows: list[EncoderRow]) -> str:
    """The rows as a markdown table, one line per (device, resolution)."""
    columns = [
        "device",
        "fused dtype",
        ">px",
        ">tokens",
        ">GFLOPs",
        ">unfused ms",
        ">fused ms",
        ">speed-up",
        ">unfused peak MiB",
        ">fused peak MiB",
        ">max rel diff",
        ">fused, torch's depthwise ms",
        ">our depthwise speed-up",
    ]
    cells = [
        [
            r.device,
            r.dtype,
            str(r.resolution),
            str(r.tokens),
            f"{r.gflops:.1f}",
            f"{r.unfused_ms:,.1f}",
            f"{r.fused_ms:,.1f}",
            f"{r.speedup:.2f}x",
            mib(r.unfused_peak_mb),
            mib(r.fused_peak_mb),
            f"{r.max_rel_diff:.1e}",
            "—" if r.torch_depthwise_ms is None else f"{r.torch_depthwise_ms:,.1f}",
            "—" if r.torch_depthwise_ms is None else f"{r.torch_depthwise_ms / r.fused_ms:.2f}x",
        ]
        for r in rows
    ]
    return markdown_table(columns, cells)
