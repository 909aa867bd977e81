"""Weight-only int8/int4 quantization of the decoder through torchao, for our own runtime.

``FastVLM.from_pretrained(path, quantization="int8" | "int4")`` (and ``--quantization`` on
``fastvlm predict``/``chat``) call :func:`quantize_decoder` once the weights are loaded.

What is quantized: every ``nn.Linear`` of the Qwen2 decoder (attention and MLP projections),
the part that holds nearly all of the weights and is read once per generated token. Left in
floating point:

* the vision tower: small (~125M parameters for FastViTHD), conv-heavy (torchao's weight-only
  configs target linear layers) and run once per image, not once per token;
* the projector: two small linear layers run once per image, whose error would reach every
  visual token;
* the token embedding, and ``lm_head`` when it is tied to it (the released 0.5B and 1.5B
  checkpoints): quantizing a tied head either unties it (a second copy of the largest matrix,
  so memory grows) or makes every embedding lookup dequantize the whole table. An untied
  ``lm_head`` (7B) is an ordinary linear layer and is quantized.

The methods (torchao 0.18, weight-only, activations stay in the model's dtype):

* ``int8``: :class:`torchao.quantization.Int8WeightOnlyConfig`, symmetric per output row.
  Runs on any device and dtype. In eager mode torchao converts the int8 weight to the
  activation dtype at each call, so it saves memory but is not faster than the floating-point
  model on CPU (it was written for ``torch.compile``, which fuses the conversion).
* ``int4``: asymmetric groups of 128 (64 or 32 when a layer's input width needs it).
  On CPU: torchao's ``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``), which packs
  for ATen's tinygemm CPU kernel (``_weight_int4pack_mm_for_cpu``); it runs with fp32, bf16
  and fp16 activations, and is fastest in bf16. On CUDA: ``Int4WeightOnlyConfig`` with the
  ``tile_packed_to_4d`` format (tinygemm's CUDA kernel), which requires bf16. torchao's
  default int4 format (``plain``) needs the ``mslk`` kernels and is not used.

A quantized model cannot be saved (:meth:`FastVLM.save_pretrained` refuses): the packed
formats are torchao's and device-specific, and quantizing at load time takes seconds, so
checkpoints stay in floating point and ``quantization=`` is passed when loading.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastvlm.errors import ConfigError

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

__all__ = ["QUANTIZATIONS", "decoder_linears", "quantize_decoder", "tensor_bytes", "weight_bytes"]

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)  # the group sizes tinygemm packs, largest (smallest scale overhead) first
INSTALL_HINT = 'torchao is not installed; pip install "fastvlm[export]" (or pip install torchao)'


def check_quantization(name: str | None) -> str | None:
    """``name`` if it is a known method (or None); a ConfigError listing the valid ones otherwise."""
    if name is not None and name not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {name!r}; expected one of {', '.join(QUANTIZATIONS)} (or None)")
    return name


def decoder_linears(model: FastVLM) -> dict[str, nn.Linear]:
    """The decoder's linear layers that :func:`quantize_decoder` quantizes, by module name."""
    lm = model.language_model
    found = {f"model.{name}": m for name, m in lm.model.named_modules() if isinstance(m, nn.Linear)}
    if not model.config.text.tie_word_embeddings:
        found["lm_head"] = lm.lm_head
    return found


def quantize_decoder(model: FastVLM, name: str) -> FastVLM:
    """Quantize the decoder's linear weights in place with torchao (``"int8"`` or ``"int4"``).

    The vision tower, projector and embeddings are untouched (see the module docstring).
    Sets ``model.quantization``; returns ``model``. Refuses a model already quantized, an
    unknown name, a missing torchao and a device/dtype combination the method cannot run.
    """
    check_quantization(name)
    if getattr(model, "quantization", None) is not None:
        raise ConfigError(f"this model is already quantized ({model.quantization}); load it again to change that")
    linears = decoder_linears(model)
    device, dtype = model.device, model.dtype
    config = _int8_config() if name == "int8" else _int4_config(device, dtype, linears.values())
    from torchao.quantization import quantize_

    targets = set(map(id, linears.values()))
    logging.getLogger("torchao").setLevel(logging.WARNING)  # it logs each layer it skips at INFO
    with torch.no_grad():
        quantize_(model.language_model, config, filter_fn=lambda m, _fqn: id(m) in targets)
    unquantized = [n for n, m in linears.items() if not is_quantized(m.weight)]
    if unquantized:  # torchao skips a layer it cannot quantize silently: make that loud
        raise ConfigError(f"torchao left {len(unquantized)} decoder layers unquantized ({unquantized[0]}, ...)")
    model.quantization = name
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


def weight_bytes(model: FastVLM) -> int:
    """Bytes of the weights :func:`quantize_decoder` quantizes (or would), whatever their form."""
    return sum(tensor_bytes(m.weight) for m in decoder_linears(model).values())
