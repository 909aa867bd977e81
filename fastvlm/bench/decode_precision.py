"""Batch-1 decode tokens/s by weight precision, all variants in one process, interleaved.

Decode at batch 1 is memory-bound: a step reads every decoder weight once, so tokens/s
should follow the bytes per step. Each variant is the same random FastVLM-sized model
(``fastvlm_config(llm)``, seed 0), built afresh: fp32; bf16 as ``model.to(bf16)`` gives it;
fp32 and bf16 with their steps through transformers' forward and ``DynamicCache`` instead of
:mod:`fastvlm.decoding`'s preallocated buffers (``model.lean_decode = False``), and with the
layers of each step run one by one from Python instead of in one compiled call
(``python layers``: ``model.native_decode = False``; int8-head too);
bf16 with its few-row steps through ``F.linear`` (:func:`~fastvlm.quantization.use_gemv_decode`
turned off), through ``torch.mv`` (``GemvLinear.use_kernel`` off) and through our bf16 kernel,
the default; int8, with and without the int8 copy of
the tied head (``int8-head``), on the default kernel (ours, :mod:`fastvlm.native`, where it
builds) and on ATen's (``aten``); torchao's eager int8 (the old path);
and torchao int4 with fp32 and with bf16 activations. Greedy steps go through the int8-screened
head (:mod:`fastvlm.greedy_head`: the head's own argmax, reading an int8 copy and a few rows) as
``generate`` takes them; ``full head`` variants read the whole head instead
(``model.screen_greedy_head = False``). Attention runs through our decode kernel
(:func:`fastvlm.native.decode_attention_kernel`), ``aten attention`` variants through ATen's
``scaled_dot_product_attention`` (``model.native_attention = False``). The variants take turns
in each round (so load from other processes spreads over all of them) and each reports the
median of its rounds.

The prompt is ``visual_tokens`` random image features plus ``text_tokens`` random text ids,
prefilled once per run; decode runs through :func:`fastvlm.generation.generate_tokens`, the
path ``generate`` takes. Quality is against fp32: the share of greedy tokens equal to fp32's
(free-running: one early difference changes what follows, and random weights have near-ties)
and, teacher-forced on fp32's tokens, the top-1 agreement and the largest logit difference.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastvlm.bench.limits import screened_head_saving
from fastvlm.decoding import DecodeSteps, prefill
from fastvlm.generation import generate_tokens
from fastvlm.linears import GemvLinear
from fastvlm.measure import markdown_table
from fastvlm.model import FastVLM
from fastvlm.presets import fastvlm_config
from fastvlm.processing import IMAGE_TOKEN_INDEX
from fastvlm.quantization import decode_step_bytes, quantization_kernel, quantize_decoder, use_gemv_decode

VOCAB_EDGE = 1000  # prompt ids are drawn this far from both ends of the vocabulary


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype
    quantization: str | None = None
    kernel: str = "auto"
    gemv: bool = True  # few-row bf16 steps through a GEMV kernel, as every FastVLM decodes (False: F.linear)
    gemv_kernel: bool = True  # that kernel ours where built, as every FastVLM (False: torch.mv)
    lean: bool = True  # steps over preallocated KV buffers, as generate takes them (False: transformers' forward)
    native: bool = True  # all layers of a step in one compiled call, as generate takes them (False: a Python loop)
    screen: bool = True  # greedy steps through the int8-screened head, as generate takes them (False: the whole head)
    attention: bool = True  # attention through our decode kernel, as generate takes it (False: ATen's SDPA)


VARIANTS = (
    Variant("fp32", torch.float32),
    Variant("fp32 full head", torch.float32, screen=False),
    Variant("fp32 aten attention", torch.float32, attention=False),
    Variant("fp32 python layers", torch.float32, native=False),
    Variant("fp32 transformers step", torch.float32, lean=False),
    Variant("bf16 F.linear", torch.bfloat16, gemv=False),
    Variant("bf16 torch.mv", torch.bfloat16, gemv_kernel=False),
    Variant("bf16", torch.bfloat16),
    Variant("bf16 full head", torch.bfloat16, screen=False),
    Variant("bf16 python layers", torch.bfloat16, native=False),
    Variant("bf16 transformers step", torch.bfloat16, lean=False),
    Variant("int8", torch.float32, "int8"),
    Variant("int8 aten", torch.float32, "int8", "aten"),
    Variant("int8-head", torch.float32, "int8-head"),
    Variant("int8-head aten attention", torch.float32, "int8-head", attention=False),
    Variant("int8-head python layers", torch.float32, "int8-head", native=False),
    Variant("int8-head aten", torch.float32, "int8-head", "aten"),
    Variant("int8-head bf16", torch.bfloat16, "int8-head"),
    Variant("int8 torchao", torch.float32, "int8", "torchao"),
    Variant("int4", torch.float32, "int4"),
    Variant("int4 bf16", torch.bfloat16, "int4"),
)


@dataclass
class DecodeRow:
    variant: str
    dtype: str
    quantization: str | None
    kernel: str
    step_weight_mb: float  # weights read per decode step (quantization.decode_read_bytes)
    tokens_per_s: float  # median over rounds
    runs: list[float]
    vs_fp32: float
    greedy_agreement: float  # share of the free-running greedy tokens equal to fp32's
    top1_agreement: float  # teacher-forced on fp32's tokens
    max_logit_diff: float  # teacher-forced, largest |logit - fp32 logit|


def build_variant(variant: Variant, llm: str, build: Callable[..., FastVLM] = FastVLM.from_config) -> FastVLM:
    """The random model of ``llm``'s size in ``variant``'s dtype and quantization."""
    model = build(fastvlm_config(llm), dtype=variant.dtype, seed=0)
    if variant.quantization is not None:
        quantize_decoder(model, variant.quantization, kernel=variant.kernel)
    if not variant.gemv:
        use_gemv_decode(model, enabled=False)
    for module in model.language_model.modules():
        if isinstance(module, GemvLinear):
            module.use_kernel = variant.gemv_kernel
    model.lean_decode = variant.lean
    model.native_decode = variant.native
    model.screen_greedy_head = variant.screen
    model.native_attention = variant.attention
    return model


def prompt_inputs(model: FastVLM, visual_tokens: int, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text ids around one image marker, and random image features [1, visual_tokens, hidden]."""
    gen = torch.Generator().manual_seed(0)
    vocab, hidden = model.config.text.vocab_size, model.config.text.hidden_size
    ids = torch.randint(VOCAB_EDGE, vocab - VOCAB_EDGE, (text_tokens,), generator=gen)
    half = text_tokens // 2
    ids = torch.cat([ids[:half], torch.tensor([IMAGE_TOKEN_INDEX]), ids[half:]])[None]
    features = torch.randn(1, visual_tokens, hidden, generator=gen) * 0.02  # the scale of the embeddings
    return ids, features


def greedy_decode(model: FastVLM, ids: torch.Tensor, features: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """``steps`` greedy tokens after the prompt and the decode tokens/s (prefill excluded)."""
    tokens, rate = [], 0.0
    features = features.to(model.dtype)
    for token, timings in generate_tokens(model, ids, image_features=features, max_new_tokens=steps):
        tokens.append(int(token[0]))
        rate = timings.decode_tokens_per_s
    return tokens, rate


@torch.inference_mode()
def forced_logits(model: FastVLM, ids: torch.Tensor, features: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The logits [len(tokens), V] (fp32) of each step when the model is fed ``tokens``, teacher-forced."""
    inputs = model.prepare_inputs(ids, None, image_features=features.to(model.dtype), padding_side="left")
    cache, logits = prefill(model, inputs)
    mask, position = inputs.attention_mask, inputs.position_ids[:, -1:] + 1
    steps = DecodeSteps(model, cache, capacity=mask.shape[1] + len(tokens))
    out = [logits[0].float()]
    for token in tokens[:-1]:
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        step = steps(torch.tensor([[token]]), mask, position)
        out.append(step[0].float())
        position = position + 1
    return torch.stack(out)


def run_decode_precision(
    *,
    llm: str = "0.5b",
    variants: tuple[Variant, ...] = VARIANTS,
    visual_tokens: int = 256,
    text_tokens: int = 44,
    steps: int = 32,
    rounds: int = 3,
    build: Callable[..., FastVLM] = FastVLM.from_config,
) -> list[DecodeRow]:
    """One row per variant, the first being the fp32 reference the ratios and agreements are against."""
    first = variants[0]
    if first.dtype != torch.float32 or first.quantization is not None or not (first.lean and first.native):
        raise ValueError(f"the first variant is the reference and must be plain fp32, not {variants[0]}")
    models = {}
    for v in variants:
        models[v.name] = build_variant(v, llm, build)
        gc.collect()
    ids, features = prompt_inputs(models[variants[0].name], visual_tokens, text_tokens)
    tokens: dict[str, list[int]] = {}
    runs: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:  # warm-up: one short run each
        greedy_decode(models[v.name], ids, features, 2)
    for _ in range(rounds):
        for v in variants:
            tokens[v.name], rate = greedy_decode(models[v.name], ids, features, steps)
            runs[v.name].append(rate)
    reference = variants[0].name
    want = tokens[reference]
    want_logits = forced_logits(models[reference], ids, features, want)
    base = statistics.median(runs[reference])
    rows = []
    for v in variants:
        model = models[v.name]
        got_logits = want_logits if v.name == reference else forced_logits(model, ids, features, want)
        rate = statistics.median(runs[v.name])
        rows.append(
            DecodeRow(
                variant=v.name,
                dtype=str(v.dtype).removeprefix("torch."),
                quantization=v.quantization,
                kernel=quantization_kernel(model) or "-",
                step_weight_mb=(decode_step_bytes(model) - screened_head_saving(model)) / 1e6,
                tokens_per_s=rate,
                runs=runs[v.name],
                vs_fp32=rate / base,
                greedy_agreement=sum(a == b for a, b in zip(tokens[v.name], want, strict=True)) / len(want),
                top1_agreement=float((got_logits.argmax(-1) == want_logits.argmax(-1)).float().mean()),
                max_logit_diff=float((got_logits - want_logits).abs().max()),
            )
        )
    return rows


def format_decode_table(rows: list[DecodeRow]) -> str:
    """The rows as a markdown table (ratios against the first row)."""
    columns = [
        "variant",
        ">weights MB/step",
        ">bytes vs fp32",
        ">decode tok/s",
        ">x fp32",
        ">greedy = fp32",
        ">top-1 (forced)",
        ">max logit diff",
    ]
    base = rows[0].step_weight_mb
    cells = [
        [
            r.variant,
            f"{r.step_weight_mb:,.0f}",
            f"{r.step_weight_mb / base:.2f}",
            f"{r.tokens_per_s:.2f}",
            f"{r.vs_fp32:.2f}",
            f"{r.greedy_agreement:.0%}",
            f"{r.top1_agreement:.0%}",
            f"{r.max_logit_diff:.3f}",
        ]
        for r in rows
    ]
    return markdown_table(columns, cells)
