"""Running the Qwen2 decoder with a KV cache: the prefill, then one-token decode steps.

:func:`prefill` runs prompts through transformers' forward into a ``DynamicCache``;
:class:`DecodeSteps` takes the steps after it, the way ``generate``, the server and the
benchmarks all take them. The rest of this module is the step they take by default.

The KV cache is passed to transformers' decoder under the name its ``forward`` takes:
``cache`` from transformers 5.24 (which deprecates ``past_key_values``, to be removed
in 5.40), ``past_key_values`` before. The name is read from the signature once per
decoder class.

Decode steps over key/value buffers allocated once for the whole answer
-----------------------------------------------------------------------

After the prefill, each decode step feeds one token per sequence through every layer.
transformers' ``Qwen2ForCausalLM.forward`` does that correctly, but around the matmuls of a
one-token step it redoes work that does not change from step to step (the attention mask,
the layer keyword arguments, the attention-function lookup), and ``DynamicCache``
concatenates each layer's keys and values into new tensors, copying the whole cache once per
token (at 2,000 cached tokens, 98 MB per step for FastVLM-0.5B in fp32).

:class:`CachedDecoder` runs the same layers with less around them. It calls the model's own
modules (the norms, the rotary embedding, the q/k/v/o projections, the MLP and the head), so
quantized or otherwise replaced linear layers work unchanged and every number comes from
the same code, and it writes each step's keys and values into one column of
:class:`KVBuffers`, allocated for the prompt plus the longest answer (a step past the end
doubles them, as a list grows). Only the attention block is spelled out here, as
transformers' Qwen2 computes it: rotary embedding on q and k, scaled dot-product attention
over the cached keys (grouped-query heads shared), no dropout, the output projection; the
attention itself is :func:`fastvlm.native.decode_attention` (our kernel where built: 20-25 us
a call at 300 cached positions where ATen's takes 40-60).

What it saves on a 2-core Xeon (torch 2.13, transformers 5.24): a step of a decoder with
FastVLM-0.5B's depth and heads but tiny widths takes 7.3 ms against 10.2 ms through
transformers' forward in fp32, 13-17 against 20-23 ms in bf16 and int8; on the full 0.5B, +5%
tokens/s after a 300-token prompt, +11% in fp32 after 2,000 tokens (transformers' cache copies).

Decoders this module does not cover (sliding-window layers, another architecture) keep
transformers' forward: :func:`unsupported_reason` says why.

Every layer of a step in one call
---------------------------------

Even the lean loop pays Python for each of the ~1,000 small operations of a 0.5B step (norms,
rotary embedding, residual adds, attention), about 10 ms a step on a 2-core Xeon, a third of an
int8 step. :class:`NativeLayers` hands all layers to one compiled op
(``fastvlm_native.decode_layers``, :mod:`fastvlm.native`) that makes the same ATen calls in
the same order, so its logits are bit for bit the loop's. It takes layers whose every part it
knows (transformers' Qwen2 norm, attention and SiLU MLP; ``nn.Linear``, our ``GemvLinear``
and packed ``Int8WeightOnlyLinear``; no hooks); for any other decoder, or where the library
is not built, the Python loop runs: :meth:`NativeLayers.unsupported_reason` says why.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import DynamicCache

from fastvlm import linears, native
from fastvlm.greedy_head import greedy_head_of
from fastvlm.linears import (
    GEMV_DTYPES,
    PACKED_KERNEL_MAX_ROWS,
    GemvLinear,
    Int8WeightOnlyLinear,
)
from fastvlm.native import eager_on_cpu

if TYPE_CHECKING:  # model.py imports this module (through generation); the model types are for annotations only
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    from fastvlm.model import FastVLM, ModelInputs

__all__ = [
    "CachedDecoder",
    "DecodeSteps",
    "KVBuffers",
    "NativeLayers",
    "attention_shape",
    "cache_argument",
    "cache_layers",
    "decoder_step",
    "prefill",
    "unsupported_reason",
]


_CACHE_ARGUMENTS: dict[type[nn.Module], str] = {}  # decoder class -> its cache argument, read once


def cache_argument(decoder: nn.Module) -> str:
    """The name under which ``decoder.forward`` takes the KV cache (``cache`` or ``past_key_values``)."""
    decoder_class = type(decoder)
    if decoder_class not in _CACHE_ARGUMENTS:
        parameters = inspect.signature(decoder_class.forward).parameters  # follows the decorators' __wrapped__
        _CACHE_ARGUMENTS[decoder_class] = "cache" if "cache" in parameters else "past_key_values"
    return _CACHE_ARGUMENTS[decoder_class]


def decoder_step(model: FastVLM, cache: DynamicCache, **inputs: Any) -> torch.Tensor:
    """Run the decoder with the KV cache; the logits of each row's last position [B, V]."""
    lm = model.language_model
    out = lm(**inputs, use_cache=True, **{cache_argument(lm): cache})
    return out.logits[:, -1]


def prefill(model: FastVLM, inputs: ModelInputs) -> tuple[DynamicCache, torch.Tensor]:
    """Run prepared prompts through the decoder: their KV cache and the logits of each row's last position."""
    cache = DynamicCache()
    logits = decoder_step(
        model,
        cache,
        inputs_embeds=inputs.inputs_embeds,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        logits_to_keep=1,
    )
    return cache, logits


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [B, kv_heads, L, head_dim] of every layer of a transformers cache."""
    pairs = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError(f"expected key/value tensors in every cache layer, got a {type(layer).__name__}")
        pairs.append((keys, values))
    return pairs


def unsupported_reason(lm: torch.nn.Module) -> str | None:
    """Why :class:`CachedDecoder` cannot run ``lm`` (None: it can)."""
    from transformers import Qwen2ForCausalLM  # transformers' modeling code loads only once a model runs

    if not isinstance(lm, Qwen2ForCausalLM):
        return f"the decoder is a {type(lm).__name__}, not a Qwen2ForCausalLM"
    config = lm.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(kind != "full_attention" for kind in layer_types):
        return f"the decoder has layers of kinds {sorted(set(layer_types))}; only full attention is covered"
    if layer_types is None and getattr(config, "use_sliding_window", False):
        return "the decoder uses sliding-window attention"
    return None


@dataclass
class KVBuffers:
    """Keys and values of every layer, [B, kv_heads, capacity, head_dim] each, valid up to ``length``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    @classmethod
    def from_cache(cls, cache: DynamicCache, capacity: int) -> KVBuffers:
        """Buffers holding ``cache``'s keys and values, with room for ``capacity`` positions in all."""
        layers = cache_layers(cache)
        if not layers:
            raise ValueError("the cache is empty; prefill the prompt first")
        buffers = cls([keys for keys, _ in layers], [values for _, values in layers], int(layers[0][0].shape[2]))
        buffers.grow(capacity)
        return buffers

    def grow(self, capacity: int) -> None:
        """Reallocate every buffer to ``capacity`` positions, keeping the ``length`` cached."""
        if capacity < self.length:
            raise ValueError(f"a capacity of {capacity} positions cannot hold the {self.length} already cached")
        for tensors in (self.keys, self.values):
            for index, old in enumerate(tensors):
                batch, heads, _, head_dim = old.shape
                tensors[index] = old.new_empty(batch, heads, capacity, head_dim)
                tensors[index][:, :, : self.length] = old[:, :, : self.length]


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head width) of a Qwen2 config (no kv count: one per head, as transformers)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(config.num_key_value_heads or heads)
    return heads, kv_heads, int(getattr(config, "head_dim", None) or config.hidden_size // heads)


class CachedDecoder:
    """One-token steps of a Qwen2 decoder ``lm`` over :class:`KVBuffers` (see the module docstring).

    ``step`` takes what transformers' forward takes for a step (the new tokens, the attention
    mask over every position so far, the new positions) and returns the next-token logits.
    """

    def __init__(
        self, lm: Qwen2ForCausalLM, buffers: KVBuffers, *, native_layers: bool = True, native_attention: bool = True
    ) -> None:
        reason = unsupported_reason(lm)
        if reason is not None:
            raise ValueError(f"CachedDecoder cannot run this decoder: {reason}")
        self.lm, self.buffers = lm, buffers
        self.heads, self.kv_heads, self.head_dim = attention_shape(lm.config)
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        self.rotate = apply_rotary_pos_emb
        # None: the layers run in Python; either way, attention through our kernel where built (False: ATen's)
        self.native = NativeLayers.build(lm, attention_kernel=native_attention) if native_layers else None
        self.native_attention = native_attention

    @classmethod
    def after_prefill(cls, lm: Qwen2ForCausalLM, cache: DynamicCache, capacity: int, **paths: bool) -> CachedDecoder:
        """A decoder continuing from ``cache`` (the prefill's), with room for ``capacity`` positions.

        ``paths``: ``native_layers`` and ``native_attention``, as ``__init__`` takes them."""
        return cls(lm, KVBuffers.from_cache(cache, capacity), **paths)

    def rewind(self, steps: int) -> None:
        """Forget the last ``steps`` positions (their buffer columns are overwritten by the next steps)."""
        if not 0 <= steps <= self.buffers.length:
            raise ValueError(f"cannot rewind {steps} of {self.buffers.length} cached positions")
        self.buffers.length -= steps

    def hidden_step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """The head's input [B, 1, H] (the final norm's output) after ``input_ids`` [B, 1] at ``position_ids`` [B, 1].

        ``attention_mask`` [B, length + 1] marks the cached positions and the new one (0 for
        left padding); None attends to every position.
        """
        buffers = self.buffers
        position = buffers.length
        if input_ids.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per row, got input_ids of shape {tuple(input_ids.shape)}")
        if position >= buffers.capacity:  # a longer answer than allocated for: double, as a list grows
            buffers.grow(max(2 * buffers.capacity, position + 1))
        if attention_mask is not None and attention_mask.shape[1] != position + 1:
            raise ValueError(
                f"the attention mask covers {attention_mask.shape[1]} positions; expected the {position} cached "
                "plus the new one"
            )
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, length + 1]: broadcast over heads
        model = self.lm.model
        hidden = model.embed_tokens(input_ids)  # [B, 1, H]
        cos, sin = model.rotary_emb(hidden, position_ids)
        if self.native is not None and self.native.takes(hidden):
            hidden = self.native(hidden, cos, sin, mask, buffers)
        else:
            for index, layer in enumerate(model.layers):
                hidden = hidden + self._attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, index, mask)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        buffers.length = position + 1
        return model.norm(hidden)

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, V] after feeding ``input_ids`` [B, 1] at ``position_ids`` [B, 1] (see :meth:`hidden_step`)."""
        return self.lm.lm_head(self.hidden_step(input_ids, attention_mask, position_ids))[:, -1]

    def _attention(
        self,
        attention: Qwen2Attention,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        index: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One layer's self-attention for the new position, its key and value written into the buffers."""
        batch = hidden.shape[0]
        query = attention.q_proj(hidden).view(batch, 1, self.heads, self.head_dim).transpose(1, 2)
        key = attention.k_proj(hidden).view(batch, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        value = attention.v_proj(hidden).view(batch, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        query, key = self.rotate(query, key, cos, sin)
        end = self.buffers.length + 1
        keys, values = self.buffers.keys[index], self.buffers.values[index]
        keys[:, :, end - 1 : end] = key
        values[:, :, end - 1 : end] = value
        keys, values = keys[:, :, :end], values[:, :, :end]
        out = native.decode_attention(query, keys, values, mask, attention.scaling, kernel=self.native_attention)
        return attention.o_proj(out.transpose(1, 2).reshape(batch, 1, self.heads * self.head_dim))


LINEAR, MV, INT8, FLOAT16 = 0, 1, 2, 3  # how decode_layers runs a linear layer (the kinds of csrc/decode_layers.cpp)


def _linear_entry(module: Any) -> tuple[int, list[torch.Tensor | None]] | None:
    """(kind, [weight, scales, bias]) for decode_layers, mirroring ``module``'s forward; None if it cannot."""
    if type(module) is Int8WeightOnlyLinear:
        if not module.packed or native.int8_kernel() is None:
            return None
        return INT8, [module.qweight, module.scales.float(), module.bias]  # the forward's scales.float(), once
    if type(module) not in (nn.Linear, GemvLinear) or type(module.weight) not in (torch.Tensor, nn.Parameter):
        return None
    if not (isinstance(module, GemvLinear) and module.use_mv and module.weight.dtype in GEMV_DTYPES):
        return LINEAR, [module.weight, None, module.bias]
    return (FLOAT16 if module.float16_kernel() is not None else MV), [module.weight, None, module.bias]


def _gather(lm: Qwen2ForCausalLM) -> tuple[list[torch.Tensor | None], list[int]] | str:
    """decode_layers' tensors and linear kinds for ``lm``'s layers, or why it cannot run them as they run."""
    if native.decode_layers_kernel() is None:
        return "fastvlm's CPU kernels are not built here (fastvlm.native)"
    if native.global_hooks_registered():
        return "global module hooks are registered"
    layers = cast(nn.ModuleList, lm.model.layers)
    for name, tensor in [*layers.named_parameters(), *layers.named_buffers()]:
        if tensor.device.type != "cpu":  # meta too: an offloaded layer loads its weights in a hook
            return f"layers.{name} is on {tensor.device}, not the CPU"
    tensors: list[torch.Tensor | None] = []
    kinds = []
    for index, layer in enumerate(layers):
        reason = _layer_reason(layer)
        if reason is not None:
            return f"layer {index} {reason}"
        for name, module in _linears(layer):
            entry = _linear_entry(module)
            if entry is None:
                return f"layer {index} has a {type(module).__name__} as {name}, which decode_layers does not run"
            kinds.append(entry[0])
            tensors.extend(entry[1])
        tensors.extend(norm.weight for norm in _norms(layer))
    return tensors, kinds


def _layer_reason(layer: Any) -> str | None:
    """Why decode_layers would not compute ``layer``'s norms, attention and MLP as its modules do (None: it would)."""
    from transformers.activations import SiLUActivation
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    parts = (layer, layer.self_attn, layer.mlp, *_norms(layer))
    expected = (qwen2.Qwen2DecoderLayer, qwen2.Qwen2Attention, qwen2.Qwen2MLP, qwen2.Qwen2RMSNorm, qwen2.Qwen2RMSNorm)
    if any(type(part) is not kind for part, kind in zip(parts, expected, strict=True)):
        return f"is built from {[type(part).__name__ for part in parts]}, not exactly transformers' Qwen2 modules"
    if type(layer.mlp.act_fn) not in (SiLUActivation, nn.SiLU):
        return f"has a {type(layer.mlp.act_fn).__name__} activation, not SiLU"
    for module in layer.modules():
        reason = native.bypassed_forward(module)
        if reason is not None:
            return reason
    return None


class NativeLayers:
    """Every decoder layer of a one-token step through ``fastvlm_native.decode_layers`` (module docstring)."""

    def __init__(self, lm: Qwen2ForCausalLM, kernel: Any, tensors: list[torch.Tensor | None], kinds: list[int]) -> None:
        layers = cast(Any, lm.model.layers)
        self.kernel, self.tensors, self.kinds = kernel, tensors, kinds
        self.eps = [float(norm.variance_epsilon) for layer in layers for norm in _norms(layer)]
        self.heads, self.kv_heads, self.head_dim = attention_shape(lm.config)
        self.scaling = [float(layer.self_attn.scaling) for layer in layers]  # each layer's own, as the loop reads it
        self.max_rows = PACKED_KERNEL_MAX_ROWS if INT8 in kinds else None  # more rows: Int8 layers dequantize
        self.attention_kernel = True  # attention as native.decode_attention(kernel=...) computes it

    @staticmethod
    def unsupported_reason(lm: Qwen2ForCausalLM) -> str | None:
        """Why decode_layers cannot run ``lm``'s layers exactly as the Python loop would (None: it can)."""
        gathered = _gather(lm)
        return gathered if isinstance(gathered, str) else None

    @classmethod
    def build(cls, lm: Qwen2ForCausalLM, *, attention_kernel: bool = True) -> NativeLayers | None:
        """The layers of ``lm`` ready for decode_layers, or None where the Python loop must run them.

        ``attention_kernel``: attention through our kernel (False: ATen's), as :func:`fastvlm.native.decode_attention`.
        """
        gathered = _gather(lm)
        if isinstance(gathered, str):
            return None
        layers = cls(lm, native.decode_layers_kernel(), *gathered)
        layers.attention_kernel = attention_kernel
        return layers

    def takes(self, hidden: torch.Tensor) -> bool:
        """Whether this step can run here: no gradients, not traced, and not more rows than the int8 kernel takes."""
        if torch.is_grad_enabled() or not eager_on_cpu(hidden):
            return False
        return self.max_rows is None or hidden.shape[0] <= self.max_rows

    def __call__(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, buffers: KVBuffers
    ) -> torch.Tensor:
        """``hidden`` [B, 1, H] after every layer; each layer's key and value go into column ``buffers.length``."""
        return self.kernel(
            hidden,
            cos,
            sin,
            mask,
            buffers.keys,
            buffers.values,
            buffers.length,
            self.tensors,
            self.kinds,
            self.eps,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.scaling,
            linears.FLOAT16_KERNEL_MAX_ROWS,  # read now, as GemvLinear.forward reads it
            self.attention_kernel,
        )


def _norms(layer: Any) -> tuple[Any, Any]:
    return layer.input_layernorm, layer.post_attention_layernorm


def _linears(layer: Any) -> list[tuple[str, Any]]:
    """The layer's linear modules in decode_layers' order: q, k, v, o, gate, up, down."""
    attention, mlp = layer.self_attn, layer.mlp
    return [
        ("q_proj", attention.q_proj),
        ("k_proj", attention.k_proj),
        ("v_proj", attention.v_proj),
        ("o_proj", attention.o_proj),
        ("gate_proj", mlp.gate_proj),
        ("up_proj", mlp.up_proj),
        ("down_proj", mlp.down_proj),
    ]


class DecodeSteps:
    """The one-token steps after a prefill, through the path generation takes.

    :class:`CachedDecoder` over preallocated key/value buffers for
    ``capacity`` positions when the model allows it (``model.lean_decode`` and a decoder it
    covers), else transformers' forward growing ``cache``. Call it with the new tokens
    [B, 1], the attention mask over every position so far and the new positions [B, 1];
    it returns the logits [B, V]. The prefill's ``cache`` itself is left as it was only on the
    first path.
    """

    def __init__(self, model: FastVLM, cache: DynamicCache, capacity: int) -> None:
        self.model, self.cache = model, cache
        lm = model.language_model
        lean = model.lean_decode and unsupported_reason(lm) is None
        self.decoder = (
            CachedDecoder.after_prefill(
                lm, cache, capacity, native_layers=model.native_decode, native_attention=model.native_attention
            )
            if lean
            else None
        )

    @classmethod
    def from_layers(cls, model: FastVLM, layers: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> DecodeSteps:
        """Steps continuing from every layer's (keys, values) [B, kv_heads, L, head_dim]."""
        return cls(model, DynamicCache(ddp_cache_data=layers), capacity)

    @property
    def path(self) -> str:
        return "fastvlm" if self.decoder is not None else "transformers"

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cached (keys, values) [B, kv_heads, L, head_dim] (views, not copies)."""
        if self.decoder is None:
            return cache_layers(self.cache)
        buffers = self.decoder.buffers
        end = buffers.length
        return [(k[:, :, :end], v[:, :, :end]) for k, v in zip(buffers.keys, buffers.values, strict=True)]

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.step(input_ids, attention_mask, position_ids)
        return decoder_step(
            self.model, self.cache, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )

    def greedy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The next token of each row [B] at temperature 0: the argmax of the logits :meth:`__call__` returns.

        Through the model's :class:`~fastvlm.greedy_head.GreedyHead` where it has one
        (:func:`~fastvlm.greedy_head.greedy_head_of`), which reads an int8 copy of the head and a few of its rows
        instead of all of it.
        """
        if self.decoder is not None and (head := greedy_head_of(self.model)) is not None:
            return head(self.decoder.hidden_step(input_ids, attention_mask, position_ids)[:, -1])
        return self(input_ids, attention_mask, position_ids).argmax(dim=-1)

    def rewind(self, steps: int) -> None:
        """Forget the last ``steps`` positions (to time the same step again)."""
        if self.decoder is not None:
            self.decoder.rewind(steps)
        else:
            self.cache.crop(-steps)
