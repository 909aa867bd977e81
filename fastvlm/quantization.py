"""Weight-only int8/int4 quantization of the decoder, for our own runtime.

``FastVLM.from_pretrained(path, quantization="int8" | "int8-head" | "int4")`` (and
``--quantization`` on ``fastvlm predict``/``chat``) call :func:`quantize_decoder` once the
weights are loaded.

What is quantized: every ``nn.Linear`` of the Qwen2 decoder (attention and MLP projections),
the part that holds nearly all of the weights and is read once per generated token. Left in
floating point:

* the vision tower: small (~125M parameters for FastViTHD), conv-heavy and run once per
  image, not once per token;
* the projector: two small linear layers run once per image, whose error would reach every
  visual token;
* the token embedding, and ``lm_head`` when it is tied to it (the released 0.5B and 1.5B
  checkpoints) under ``"int8"``: quantizing the shared matrix would either untie it or make
  the embedding lookups quantized. An untied ``lm_head`` (7B) is an ordinary linear layer and
  is quantized.

The methods (weight-only, activations stay in the model's dtype):

* ``int8``: symmetric, one scale per output row. On CPU our own
  :class:`fastvlm.linears.Int8WeightOnlyLinear`, which for decode-sized inputs runs a kernel
  that reads one byte per weight, so decode is faster as well as smaller: our compiled
  VNNI/AVX-512/AVX2 kernel (:mod:`fastvlm.native`, full-precision activations) where it builds, else ATen's
  ``_weight_int8pack_mm``, which is vectorised for bf16 activations only, so the layer's
  input rows are rounded to bf16 for it (in an fp32 model too; the output returns in the
  model's dtype). Prefill-sized inputs (more than :data:`fastvlm.linears.PACKED_KERNEL_MAX_ROWS`
  rows on our kernel, :data:`fastvlm.linears.KERNEL_MAX_ROWS` on ATen's) multiply by the
  dequantised weight instead.
  Elsewhere (CUDA), or with ``kernel="torchao"``, torchao's ``Int8WeightOnlyConfig``: in
  eager mode it converts the int8 weight to the activation dtype at every call, so it saves
  memory but is slower than the floating-point model on CPU (it was written for
  ``torch.compile``, which fuses the conversion).
* ``int8-head``: ``int8`` plus, when ``lm_head`` is tied to the embedding, a separate int8
  copy of the head (the embedding stays as it is for lookups). The head is the largest
  single read of a decode step (151,936 x 896 for 0.5B: 544 MB in fp32 against 1.4 GB for
  all other decoder linears), so this is what takes int8 decode from ~2x to ~3-4x the fp32
  step's bytes; it costs vocab x hidden bytes plus 2 bytes per row of memory (136 MB for
  0.5B, 233 MB for 1.5B). An explicit choice because it adds memory where ``int8`` saves.
* ``int4``: torchao, asymmetric groups of 128 (64 or 32 when a layer's input width needs it).
  On CPU: torchao's ``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``), which packs
  for ATen's tinygemm CPU kernel (``_weight_int4pack_mm_for_cpu``); it runs with fp32, bf16
  and fp16 activations, and is fastest in bf16. On CUDA: ``Int4WeightOnlyConfig`` with the
  ``tile_packed_to_4d`` format (tinygemm's CUDA kernel), which requires bf16. torchao's
  default int4 format (``plain``) needs the ``mslk`` kernels and is not used.

bf16 models need no quantization to read half the bytes, but on CPU ATen's paths for one row
of bf16 are little faster than fp32, or slower, depending on the CPU; every :class:`FastVLM`
routes those rows through our bf16 GEMV kernel, else ``torch.mv`` (:func:`use_gemv_decode`,
see :mod:`fastvlm.linears`).

A quantized model cannot be saved (:meth:`FastVLM.save_pretrained` refuses): the packed
formats are device-specific, and quantizing at load time takes seconds, so checkpoints stay
in floating point and ``quantization=`` is passed when loading.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from fastvlm import native
from fastvlm.errors import ConfigError
from fastvlm.linears import GemvLinear, Int8WeightOnlyLinear

if TYPE_CHECKING:
    from transformers import Qwen2ForCausalLM

    from fastvlm.model import FastVLM

__all__ = [
    "KERNELS",
    "QUANTIZATIONS",
    "decode_read_bytes",
    "decode_step_bytes",
    "decoder_linears",
    "layer_bytes",
    "quantization_kernel",
    "quantize_decoder",
    "tensor_bytes",
    "use_gemv_decode",
    "weight_bytes",
]

QUANTIZATIONS = ("int8", "int8-head", "int4")
# Who runs int8. auto: on CPU our kernel (fastvlm.native) where it builds, else ATen's; torchao elsewhere.
KERNELS = ("auto", "fastvlm", "aten", "torchao")
INT4_GROUP_SIZES = (128, 64, 32)  # the group sizes tinygemm packs, largest (smallest scale overhead) first
INSTALL_HINT = 'torchao is not installed; pip install "fastvlm[export]" (or pip install torchao)'


def check_quantization(name: str | None) -> str | None:
    """``name`` if it is a known method (or None); a ConfigError listing the valid ones otherwise."""
    if name is not None and name not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {name!r}; expected one of {', '.join(QUANTIZATIONS)} (or None)")
    return name


def _head_is_separate(model: FastVLM) -> bool:
    """Whether ``lm_head`` has a matrix of its own (untied, or the int8 copy of a tied one)."""
    lm = model.language_model
    head_weight = getattr(lm.lm_head, "weight", None)  # an Int8WeightOnlyLinear has qweight instead
    return not model.config.text.tie_word_embeddings or head_weight is not lm.model.embed_tokens.weight


def decoder_linears(model: FastVLM) -> dict[str, nn.Module]:
    """The decoder's linear layers that :func:`quantize_decoder` quantizes (or has), by module name.

    Each is an ``nn.Linear`` (possibly holding a torchao tensor) or an
    :class:`~fastvlm.linears.Int8WeightOnlyLinear`; ``lm_head`` is included when it has a
    matrix of its own (untied, or the int8 copy ``"int8-head"`` makes of a tied head).
    """
    lm = model.language_model
    kinds = (nn.Linear, Int8WeightOnlyLinear)
    found: dict[str, nn.Module] = {f"model.{name}": m for name, m in lm.model.named_modules() if isinstance(m, kinds)}
    if _head_is_separate(model):
        found["lm_head"] = lm.lm_head
    return found


def quantize_decoder(model: FastVLM, name: str, *, kernel: str = "auto") -> FastVLM:
    """Quantize the decoder's linear weights in place (``"int8"``, ``"int8-head"`` or ``"int4"``).

    The vision tower, projector and embeddings are untouched (see the module docstring).
    ``kernel`` picks who runs int8: ``"fastvlm"`` (our layer on our compiled kernel,
    :mod:`fastvlm.native`), ``"aten"`` (our layer on ATen's kernel), ``"torchao"``, or
    ``"auto"``: on CPU fastvlm where its kernel builds and aten where not, torchao elsewhere;
    int4 is always torchao's. Sets
    ``model.quantization``; returns ``model``. Refuses a model already quantized, an unknown
    name or kernel, a missing torchao and a device/dtype combination the method cannot run.
    """
    check_quantization(name)
    if kernel not in KERNELS:
        raise ConfigError(f"unknown int8 kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if getattr(model, "quantization", None) is not None:
        raise ConfigError(f"this model is already quantized ({model.quantization}); load it again to change that")
    device, dtype = model.device, model.dtype
    if kernel == "fastvlm" and native.int8_kernel() is None:
        raise ConfigError(
            "the fastvlm int8 kernel is not available here (x86-64 Linux with a C++ compiler and ninja, and "
            f"{native.DISABLE_ENV} not 0); use kernel='aten'"
        )
    own_layers = name != "int4" and (kernel in ("fastvlm", "aten") or (kernel == "auto" and device.type == "cpu"))
    pack = own_layers and (kernel == "fastvlm" or (kernel == "auto" and native.int8_kernel() is not None))
    config = None  # our layers need none; torchao's configs are built (and torchao imported) before any change
    if name == "int4":
        config = _int4_config(device, dtype, decoder_linears(model).values())
    elif not own_layers:
        config = _int8_config()
    lm = model.language_model
    if name == "int8-head" and not _head_is_separate(model):  # a copy of the tied head, quantized below
        head = nn.Linear(lm.lm_head.in_features, lm.lm_head.out_features, bias=False, device="meta")
        head.weight = nn.Parameter(lm.model.embed_tokens.weight.detach().clone(), requires_grad=False)
        lm.lm_head = head
    linears = decoder_linears(model)
    if own_layers:
        with torch.no_grad():
            for module_name, module in linears.items():
                assert isinstance(module, nn.Linear)
                layer = Int8WeightOnlyLinear.from_weight(module.weight, module.bias, pack=pack)
                lm.set_submodule(module_name, layer)
    else:
        _quantize_with_torchao(lm, config, linears)
    model.quantization = name
    return model


def quantization_kernel(model: FastVLM) -> str | None:
    """Who runs the quantized decoder's layers: ``"fastvlm"``, ``"aten"``, ``"torchao"``, or None (not quantized)."""
    if getattr(model, "quantization", None) is None:
        return None
    ours = [m for m in decoder_linears(model).values() if isinstance(m, Int8WeightOnlyLinear)]
    if not ours:
        return "torchao"
    return "fastvlm" if all(m.packed for m in ours) and native.int8_kernel() is not None else "aten"


def _quantize_with_torchao(lm: nn.Module, config: Any, linears: dict[str, nn.Module]) -> None:
    from torchao.quantization import quantize_

    targets = set(map(id, linears.values()))
    logging.getLogger("torchao").setLevel(logging.WARNING)  # it logs each layer it skips at INFO
    with torch.no_grad():
        quantize_(lm, config, filter_fn=lambda m, _fqn: id(m) in targets)
    unquantized = [n for n, m in linears.items() if not is_quantized(cast(torch.Tensor, m.weight))]
    if unquantized:  # torchao skips a layer it cannot quantize silently: make that loud
        raise ConfigError(f"torchao left {len(unquantized)} decoder layers unquantized ({unquantized[0]}, ...)")


def use_gemv_decode(model: FastVLM, enabled: bool = True) -> FastVLM:
    """Route few-row bf16/fp16 inputs of the decoder's linear layers (tied head included) through a GEMV kernel.

    :class:`FastVLM` does this when it builds its decoder, so every model has it; call it again
    after swapping in plain ``nn.Linear`` layers, or with ``enabled=False`` to send every input
    back to ``F.linear`` (the benchmarks compare the two). On CPU our kernel (or ``torch.mv``
    where it is not built) reads a bf16 weight faster than ``F.linear`` (see :mod:`fastvlm.linears`);
    other rows, dtypes and devices are computed as before. The layers keep their parameters
    (same tensors, same state dict; a tied head stays tied). Quantized layers are left alone.
    Returns ``model``.
    """
    lm = model.language_model
    linears = {f"model.{name}": m for name, m in lm.model.named_modules() if isinstance(m, nn.Linear)}
    if isinstance(lm.lm_head, nn.Linear):
        linears["lm_head"] = lm.lm_head
    for name, module in linears.items():
        if type(module) is nn.Linear:
            module = GemvLinear.from_linear(module)
            lm.set_submodule(name, module)
        if isinstance(module, GemvLinear):
            module.use_mv = enabled
    return model


def _int8_config() -> Any:
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return Int8WeightOnlyConfig()


def _int4_config(device: torch.device, dtype: torch.dtype, linears: Any) -> Any:
    widths = {m.in_features for m in linears}
    group_size = next((g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths)), None)
    if group_size is None:
        raise ConfigError(f"int4 needs every decoder layer's input width to be a multiple of 32; got {sorted(widths)}")
    try:
        from torchao.quantization import Int4WeightOnlyConfig
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    if device.type == "cpu":
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        except ImportError:  # torchao before the CPU format moved to the prototype namespace
            return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="opaque")
        return PrototypeInt4WeightOnlyConfig(group_size=group_size)
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ConfigError(
                f"int4 on CUDA runs with bf16 activations only; load with dtype=torch.bfloat16 (--dtype bf16), "
                f"not {dtype}"
            )
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    raise ConfigError(f"int4 has torchao kernels for cpu and cuda only, not {device.type}; use int8 there")


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is one of torchao's quantized tensor subclasses."""
    return type(tensor).__module__.startswith("torchao.")


def _leaves(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s data (its inner tensors for a subclass)."""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        yield tensor
        return
    names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
    for name in names:
        inner = getattr(tensor, name)
        if inner is not None:
            yield from _leaves(inner)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` occupies: packed data plus scales and zero points for a torchao tensor."""
    return sum(t.numel() * t.element_size() for t in _leaves(tensor))


def layer_bytes(module: nn.Module) -> int:
    """Bytes of a linear layer's weight in whatever form it has (int8 data and scales included), bias excluded."""
    if isinstance(module, Int8WeightOnlyLinear):
        return tensor_bytes(module.qweight) + tensor_bytes(module.scales)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return tensor_bytes(weight)


def weight_bytes(model: FastVLM) -> int:
    """Bytes of the weights :func:`quantize_decoder` quantizes (or has), whatever their form."""
    return sum(layer_bytes(m) for m in decoder_linears(model).values())


def decode_step_bytes(model: FastVLM) -> int:
    """Bytes of weights one batch-1 decode step of ``model`` reads (:func:`decode_read_bytes`)."""
    return decode_read_bytes(model.language_model)


def decode_read_bytes(lm: Qwen2ForCausalLM) -> int:
    """Bytes of weights one batch-1 decode step of a Qwen2 causal LM reads, in whatever form they have.

    Every linear (int8 data and scales included), bias and norm, and the head. The embedding
    table is left out (a step looks up one row of it) unless it is also the head, and then it
    counts once. The KV cache is not a weight. Works on a meta-device model, so the figure for
    a config needs no weights (:func:`fastvlm.bench.gpu_common.decode_weight_bytes`).
    """
    embed = lm.model.embed_tokens.weight
    head_is_embed = getattr(lm.lm_head, "weight", None) is embed
    tensors: list[torch.Tensor] = [p for p in lm.parameters() if p is not embed or head_is_embed]  # tied: once
    tensors += [t for m in lm.modules() if isinstance(m, Int8WeightOnlyLinear) for t in (m.qweight, m.scales)]
    return sum(tensor_bytes(t) for t in tensors)
