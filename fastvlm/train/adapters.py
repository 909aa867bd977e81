"""LoRA and QLoRA adapters on the LLM, through peft, and merging them back for export.

Adapters are injected in place (``peft.inject_adapter_in_model``), so the model keeps its
module tree and its forward; only the targeted linear layers gain ``base_layer`` /
``lora_A`` / ``lora_B`` children. Exported checkpoints hold merged weights
(W + B·A·alpha/r), so they load anywhere a FastVLM checkpoint loads.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTER = "default"
NF4 = "nf4"  # QLoRA's 4-bit NormalFloat (Dettmers et al. 2023)
_A, _B, _BASE = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight", ".base_layer."


def add_lora(
    language_model: nn.Module, *, rank: int, alpha: int, dropout: float, targets: tuple[str, ...], qlora: bool = False
) -> None:
    """Freeze the LLM and give its ``targets`` linear layers trainable LoRA adapters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install peft") from None
    if qlora:
        quantize_linear_4bit(language_model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    inject_adapter_in_model(config, language_model, adapter_name=ADAPTER)
    for name, param in language_model.named_parameters():
        param.requires_grad = ".lora_" in name


def quantize_linear_4bit(module: nn.Module, targets: tuple[str, ...]) -> None:
    """Replace the ``targets`` linear layers by bitsandbytes NF4 layers (QLoRA's frozen base)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("QLoRA needs bitsandbytes: pip install bitsandbytes (CUDA GPUs)") from None
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    quant_type=NF4,
                )
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type=NF4)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a state dict."""
    return {k: v for k, v in state.items() if ".lora_" in k}


def merge_lora(
    state: dict[str, torch.Tensor], base: dict[str, torch.Tensor], *, rank: int, alpha: int
) -> dict[str, torch.Tensor]:
    """A plain state dict: adapters folded into their layers' weights, peft's names undone.

    ``base`` gives the full-precision frozen weights by plain name (``...q_proj.weight``);
    it is where a QLoRA run's weights come from, since its own are 4-bit.
    """
    scale = alpha / rank
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if _BASE not in key:
            out[key] = value
            continue
        if not key.endswith((".weight", ".bias")):  # bitsandbytes' quantisation state
            continue
        plain = key.replace(_BASE, ".")
        layer = key.split(_BASE)[0]
        if key.endswith(".weight"):
            w = base.get(plain, value)
            delta = state[layer + _B].float() @ state[layer + _A].float() * scale
            out[plain] = w.float() + delta.to(w.device)  # fp32, like the trained weights
        else:
            out[plain] = base.get(plain, value).float()
    return out
