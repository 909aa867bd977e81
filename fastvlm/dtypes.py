"""The dtype names the command line and the server accept, and the torch dtypes they mean."""

from __future__ import annotations

import torch

from fastvlm.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    """``"fp32"`` -> ``torch.float32`` etc.; a ConfigError naming the choices otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None
