"""Each stage of FastVLM as a fraction of this machine's limits, both measured in one run.

A latency means little on its own: 470 ms for an encoder is good on two cores and poor
on sixty-four. This benchmark measures the machine's ceilings and the model's stages
side by side and reports the ratio, which carries over between machines:

- **Ceilings.** The matmul rate of each dtype (an n x n x n product, 2 n^3 FLOPs, n = 4096
  by default) and the memory read bandwidth (``torch.sum`` over a buffer far larger than
  the last-level cache, 1 GiB by default; bytes read / time). The copy bandwidth that
  :mod:`fastvlm.bench.gpu` reports is timed here too (:func:`copy_rate`), so the two
  benchmarks time their ceilings one way.
- **Encoder.** The fused tower + projector on one image: FLOPs as
  :func:`fastvlm.bench.gpu_common.encoder_flops` counts them, per second, against the
  matmul rate of the same dtype.
- **Prefill.** The decoder over the visual tokens and a template-sized text prompt:
  FLOPs counted the same way (torch's FLOP counter on the meta device, where attention
  is counted as the two full L x L products), per second, against the matmul rate.
- **Decode.** One cached greedy step after that prompt reads every decoder weight once
  (the embedding table only as the tied LM head, not again for the one-row lookup; see
  :func:`~fastvlm.bench.gpu_common.decode_weight_bytes`) and the KV cache: those bytes
  per second against the read bandwidth. The steps run one after another from the
  prompt's cache, as in generation; the KV length given is the median timed step's.
- **Decode step floor.** What a step costs besides moving weights: the same steps on a
  decoder of the same depth and heads whose widths are cut to :data:`FLOOR_HEAD_DIM` per
  head, with a small vocabulary and a tiny tower (:func:`floor_config`), after a prompt as
  long as the largest resolution's. It is Python, dispatch and small ops, and it does not
  shrink with the weights' bytes, so the report also gives the tokens/s bound of bytes at
  the bandwidth plus this floor: what lower precisions can reach without a leaner step.
- **Quantized decode.** On the CPU, the same decode steps (and floor) with the fp32 model's
  decoder quantized (``quantizations``, default ``int8-head``: :mod:`fastvlm.quantization`),
  their bytes counted as stored (int8 weights and their scales), against the read bandwidth.

``rounds`` repeats the whole set (ceilings included) one round after another, so a
shared or throttling machine drifts over ceilings and stages alike; every fraction is
taken within its round, and the report gives the median fraction and the min-max over
rounds. Models are FastVLM-sized with random weights (speed does not depend on the
values), built once per device and dtype. ``LimitSettings.smoke()`` is the same run at
toy sizes, for tests.
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from fastvlm.bench.gpu_common import (
    TINY,
    batch_prompt,
    build_fastvlm,
    decode_weight_bytes,
    encoder_flops,
    kv_bytes_per_row,
    median_ms,
    model_config,
    prompt_inputs,
    with_tiny_vocab_and_tower,
)
from fastvlm.bench.limits_report import (
    FLOOR,
    MATMUL,
    READ,
    READ_DTYPE,
    STAGES,
    LimitsReport,
    Sample,
    limit_key,
    summarize,
)
from fastvlm.decoding import DecodeSteps, cache_argument, prefill
from fastvlm.dtypes import DTYPES
from fastvlm.greedy_head import greedy_head_of
from fastvlm.measure import count_flops, machine_description
from fastvlm.model import FastVLM
from fastvlm.presets import resize_text_config
from fastvlm.quantization import decode_step_bytes as quantized_step_bytes
from fastvlm.quantization import quantize_decoder

if TYPE_CHECKING:
    from fastvlm.config import FastVLMConfig
    from fastvlm.model import ModelInputs

BYTES_PER_MIB = 2**20
FLOOR_HEAD_DIM = 8  # the floor decoder's width per attention head (AVX-512 holds 16 fp32 values)


@dataclass(frozen=True)
class LimitSettings:
    """What one run measures (the defaults are FastVLM-0.5B on the CPU)."""

    llm: str = "0.5b"  # a released decoder size, or "tiny" (the smoke model)
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("fp32", "bf16")  # names in fastvlm.dtypes.DTYPES
    quantizations: tuple[str, ...] = ("int8-head",)  # decode also timed with the decoder quantized (CPU only)
    resolutions: tuple[int, ...] = (256, 512, 1024)
    rounds: int = 3
    text_tokens: int = 32  # around the image marker: a template plus a short question
    warmup: int = 1  # untimed calls before each encoder, prefill and ceiling measurement
    repeats: int = 3  # timed calls (median)
    decode_warmup: int = 2
    decode_steps: int = 8  # timed decode steps (median)
    matmul_n: int = 4096
    buffer_mib: int = 1024

    @classmethod
    def smoke(cls, **changes: Any) -> LimitSettings:
        """The whole run at toy sizes (a tiny tower and decoder, a small GEMM and buffer): seconds."""
        small: dict[str, Any] = {
            "llm": TINY,
            "resolutions": (128,),
            "rounds": 2,
            "text_tokens": 8,
            "repeats": 1,
            "decode_warmup": 1,
            "decode_steps": 2,
            "matmul_n": 128,
            "buffer_mib": 8,
        }
        return cls(**(small | changes))

    def with_changes(self, **changes: Any) -> LimitSettings:
        """These settings with ``changes`` (None values ignored): the command line's overrides."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# ------------------------------------------------------------------------------ ceilings


@dataclass(frozen=True)
class Timed:
    """Work done by one call (FLOPs or bytes) and the median time of a call."""

    work: float
    ms: float

    @property
    def per_s(self) -> float:
        return self.work / (self.ms / 1e3)


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, *, warmup: int, repeats: int) -> Timed:
    """An n x n by n x n product of random matrices: 2 n^3 FLOPs per call."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    return Timed(work=2 * n**3, ms=median_ms(lambda: a @ b, device, warmup=warmup, repeats=repeats))


def read_rate(nbytes: int, device: torch.device, *, warmup: int, repeats: int) -> Timed:
    """``torch.sum`` over an fp32 buffer of ``nbytes``: bytes read per call.

    The buffer is written first: untouched pages may all map to one zero page, which
    would be read from the cache.
    """
    buffer = torch.full((nbytes // 4,), 1.0, device=device)
    return Timed(work=buffer.nbytes, ms=median_ms(lambda: buffer.sum(), device, warmup=warmup, repeats=repeats))


def copy_rate(nbytes: int, device: torch.device, *, warmup: int, repeats: int) -> Timed:
    """A copy of an ``nbytes`` buffer into another: bytes read plus bytes written per call."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return Timed(work=2 * src.nbytes, ms=median_ms(lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats))


# ------------------------------------------------------------------------------ work per stage


def prefill_flops(text: Qwen2Config, tokens: int) -> int:
    """FLOPs of the decoder over ``tokens`` embedded positions, keeping one position's logits.

    Counted on the meta device (no compute), as the encoder's are. No mask or positions
    are passed: transformers reads their values to choose a mask, which meta tensors do
    not have; a prompt without padding takes the same causal path.
    """
    text = copy.deepcopy(text)  # building a model edits its config
    text._attn_implementation = "sdpa"
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(text).eval()
        embeds = torch.empty(1, tokens, text.hidden_size)
        return count_flops(
            lambda: lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **{cache_argument(lm): DynamicCache()})
        )


def decode_step_bytes(text: Qwen2Config, dtype: torch.dtype, kv_tokens: int) -> int:
    """Bytes one batch-1 decode step reads: the decoder weights and a ``kv_tokens``-long KV cache."""
    return decode_weight_bytes(text, dtype) + kv_bytes_per_row(text, dtype, kv_tokens)


def screened_head_saving(model: FastVLM) -> int:
    """Bytes a greedy step of ``model`` reads less through its screened head than through the whole head (0: none)."""
    screen = greedy_head_of(model)
    return screen.saved_bytes if screen is not None else 0


def floor_config(config: FastVLMConfig) -> FastVLMConfig:
    """``config`` with the decoder's depth and heads kept, its widths cut to :data:`FLOOR_HEAD_DIM`
    per head, a small vocabulary and a tiny tower (``with_tiny_vocab_and_tower``): a decode step
    of this model does all the real step's work except moving the weights."""
    width = config.text.num_attention_heads * FLOOR_HEAD_DIM
    narrow = resize_text_config(config.text, hidden_size=width, intermediate_size=width)
    return with_tiny_vocab_and_tower(config, narrow)


# ------------------------------------------------------------------------------ the run


class _Round:
    """One round on one device: ceilings first, then every stage; each result appended to ``samples``."""

    def __init__(
        self,
        settings: LimitSettings,
        device: torch.device,
        index: int,
        samples: list[Sample],
        counts: dict[tuple[str, int], int],
    ) -> None:
        self.settings, self.device, self.index = settings, device, index
        self.samples, self.counts = samples, counts  # counts: FLOPs per (stage, resolution), shared by the rounds
        self.timing = {"warmup": settings.warmup, "repeats": settings.repeats}
        self.ceilings: dict[tuple[str, str], float] = {}  # (kind, dtype) -> per second, this round

    def record(
        self, stage: str, dtype: str, timed: Timed, resolution: int | None = None, tokens: int | None = None
    ) -> None:
        sample = Sample(
            round=self.index,
            device=str(self.device),
            stage=stage,
            dtype=dtype,
            resolution=resolution,
            tokens=tokens,
            work=timed.work,
            ms=timed.ms,
            per_s=timed.per_s,
        )
        if stage in STAGES:
            sample.limit_per_s = self.ceilings[limit_key(stage, dtype)]
            sample.fraction = sample.per_s / sample.limit_per_s
            if stage == "decode" and (FLOOR, dtype) in self.ceilings:
                sample.floor_ms = 1e3 / self.ceilings[(FLOOR, dtype)]
        else:
            self.ceilings[(stage, dtype)] = sample.per_s
        self.samples.append(sample)

    def flops(self, stage: str, resolution: int, count: Callable[[], int]) -> int:
        if (stage, resolution) not in self.counts:
            self.counts[(stage, resolution)] = count()
        return self.counts[(stage, resolution)]

    def measure_ceilings(self, tick: Callable[[str], None]) -> None:
        for dtype in self.settings.dtypes:
            self.record(MATMUL, dtype, matmul_rate(self.settings.matmul_n, DTYPES[dtype], self.device, **self.timing))
            tick(f"matmul {dtype}")
        nbytes = self.settings.buffer_mib * BYTES_PER_MIB
        self.record(READ, READ_DTYPE, read_rate(nbytes, self.device, **self.timing))
        tick("read bandwidth")

    def measure_floors(self, floor_models: dict[str, FastVLM], tick: Callable[[str], None]) -> None:
        """The decode step floor in each dtype: steps of a :func:`floor_config` model after a prompt
        as long as the largest resolution's."""
        resolution = max(self.settings.resolutions)
        for dtype, model in floor_models.items():
            inputs = prompt_inputs(model, resolution, text_tokens=self.settings.text_tokens, batch=1)
            ms, _ = self.time_decode(model, inputs, *prefill(model, inputs))
            self.record(FLOOR, dtype, Timed(1, ms))
            tick(f"decode floor {dtype}")

    def measure_quantized_decode(self, model: FastVLM, name: str, resolution: int, tick: Callable[[str], None]) -> None:
        """Decode steps of ``model`` (its decoder quantized as ``name``) after a prompt of ``resolution`` px,
        against the bytes its weights (as stored) and fp32 KV cache take per step."""
        inputs = prompt_inputs(model, resolution, text_tokens=self.settings.text_tokens, batch=1)
        ms, kv = self.time_decode(model, inputs, *prefill(model, inputs))
        step_bytes = quantized_step_bytes(model) + kv_bytes_per_row(model.config.text, torch.float32, kv)
        step_bytes -= screened_head_saving(model)
        self.record("decode", name, Timed(step_bytes, ms), resolution, kv)
        tick(f"{name} {resolution} px decode")

    def measure_stages(self, model: FastVLM, dtype: str, resolution: int, tick: Callable[[str], None]) -> None:
        """Encoder, prefill and decode of ``model`` (weights in ``dtype``) on one image of ``resolution`` px."""
        config = model.config
        gen = torch.Generator().manual_seed(0)
        pixels = torch.rand(1, 3, resolution, resolution, generator=gen).to(self.device)
        features: list[torch.Tensor] = []  # the last call's visual tokens, for the prompt

        def encode() -> None:
            features[:] = [model.encode_images(pixels)]

        flops = self.flops("encoder", resolution, lambda: encoder_flops(config, resolution))
        ms = median_ms(encode, self.device, **self.timing)
        self.record("encoder", dtype, Timed(flops, ms), resolution, config.num_image_tokens(resolution))
        tick(f"{dtype} {resolution} px encoder")

        ids = batch_prompt(self.settings.text_tokens, config.text.vocab_size, 1)
        inputs = model.prepare_inputs(ids, image_features=features[0])
        length = inputs.inputs_embeds.shape[1]
        last: list[tuple[DynamicCache, torch.Tensor]] = []  # the last prefill's cache and logits

        def run_prefill() -> None:
            last[:] = [prefill(model, inputs)]

        flops = self.flops("prefill", resolution, lambda: prefill_flops(config.text, length))
        ms = median_ms(run_prefill, self.device, **self.timing)
        self.record("prefill", dtype, Timed(flops, ms), resolution, length)
        tick(f"{dtype} {resolution} px prefill")

        self.measure_decode(model, dtype, resolution, inputs, *last[0])
        tick(f"{dtype} {resolution} px decode")

    def measure_decode(
        self,
        model: FastVLM,
        dtype: str,
        resolution: int,
        inputs: ModelInputs,
        cache: DynamicCache,
        prompt_logits: torch.Tensor,
    ) -> None:
        """Decode steps from the prompt's ``cache``, against the bytes each one reads."""
        ms, kv = self.time_decode(model, inputs, cache, prompt_logits)
        step_bytes = decode_step_bytes(model.config.text, DTYPES[dtype], kv) - screened_head_saving(model)
        self.record("decode", dtype, Timed(step_bytes, ms), resolution, kv)

    def time_decode(
        self, model: FastVLM, inputs: ModelInputs, cache: DynamicCache, prompt_logits: torch.Tensor
    ) -> tuple[float, int]:
        """Median ms of greedy steps one after another from the prompt's ``cache``, as generation
        takes them (through the model's int8-screened head where it has one, :mod:`fastvlm.greedy_head`),
        and the KV length of the median timed step."""
        token = prompt_logits.argmax(-1)  # [1]
        mask = inputs.attention_mask  # [1, L], one column more per step
        position = inputs.position_ids[:, -1:]  # [1, 1]
        warmup, steps = self.settings.decode_warmup, self.settings.decode_steps
        decode = DecodeSteps(model, cache, capacity=mask.shape[1] + warmup + steps + 1)

        def step() -> None:
            nonlocal token, mask, position
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            position = position + 1
            token = decode.greedy(token[:, None], mask, position)

        kv = inputs.inputs_embeds.shape[1] + warmup + steps // 2 + 1  # the KV length of the median timed step
        return median_ms(step, self.device, warmup=warmup, repeats=steps), kv


def build_floor_model(llm: str, resolution: int, device: str, dtype: str) -> FastVLM:
    """A random :func:`floor_config` model of ``llm`` on ``device`` in ``dtype``, its tower fused."""
    model = FastVLM.from_config(floor_config(model_config(llm, resolution)), device=device, dtype=DTYPES[dtype])
    model.vision_tower.fuse(dtype=DTYPES[dtype])
    return model


def build_quantized(llm: str, resolution: int, name: str) -> FastVLM:
    """The fp32 random model of ``llm`` on the CPU, its tower fused, its decoder quantized as ``name``."""
    return quantize_decoder(build_fastvlm(llm, resolution, device=torch.device("cpu"), dtype=torch.float32), name)


def run_limits(settings: LimitSettings, *, progress: bool = True) -> LimitsReport:
    """Every ceiling and stage of ``settings``, ``settings.rounds`` times over, summarised."""
    report = LimitsReport(meta=run_description(), settings=asdict(settings))
    models = {
        (device, dtype): build_fastvlm(
            settings.llm, settings.resolutions[0], device=torch.device(device), dtype=DTYPES[dtype]
        )
        for device in settings.devices
        for dtype in settings.dtypes
    }
    floor_models = {
        device: {d: build_floor_model(settings.llm, max(settings.resolutions), device, d) for d in settings.dtypes}
        for device in settings.devices
    }
    quantized = {}  # on the CPU only: our int8 layers are CPU kernels
    for name in settings.quantizations if "cpu" in settings.devices else ():
        quantized[name] = build_quantized(settings.llm, settings.resolutions[0], name)
        floor = build_floor_model(settings.llm, max(settings.resolutions), "cpu", "fp32")
        floor_models["cpu"][name] = quantize_decoder(floor, name)
    per_round = 2 * len(settings.dtypes) + 1 + len(STAGES) * len(settings.dtypes) * len(settings.resolutions)
    per_quantization = 1 + len(settings.resolutions)  # its floor, then decode at each resolution
    total = settings.rounds * (len(settings.devices) * per_round + len(quantized) * per_quantization)
    counts: dict[tuple[str, int], int] = {}
    with torch.inference_mode(), tqdm(total=total, desc="limits", unit="measurement", disable=not progress) as bar:
        for index in range(settings.rounds):
            for device in settings.devices:

                def tick(what: str, where: str = f"round {index + 1} {device}") -> None:
                    bar.set_postfix_str(f"{where}: {what}")
                    bar.update()

                one = _Round(settings, torch.device(device), index, report.samples, counts)
                one.measure_ceilings(tick)
                one.measure_floors(floor_models[device], tick)
                for dtype in settings.dtypes:
                    for resolution in settings.resolutions:
                        one.measure_stages(models[(device, dtype)], dtype, resolution, tick)
                for name, model in quantized.items() if device == "cpu" else ():
                    for resolution in settings.resolutions:
                        one.measure_quantized_decode(model, name, resolution, tick)
    report.ceilings, report.rows = summarize(report.samples)
    return report


def run_description() -> dict:
    """The machine, plus the library version the decoder's speed depends on."""
    return machine_description() | {"transformers": importlib.metadata.version("transformers")}
