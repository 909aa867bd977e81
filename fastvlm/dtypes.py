"""The dtype names the command line and the server accept, and the torch dtypes they mean.

``auto`` (``predict``, ``chat`` and ``serve --dtype auto``) is not a dtype: it asks ``from_pretrained`` to
choose each stage's precision by measurement (:mod:`fastvlm.precision`).
"""

from __future__ import annotations

import torch

from fastvlm.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"


def dtype_from_name(name: str) -> torch.dtype:
    """``"fp32"`` -> ``torch.float32`` etc.; a ConfigError naming the choices otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def load_dtype_from_name(name: str) -> torch.dtype | str:
    """What ``from_pretrained(dtype=...)`` takes for ``name``: a torch dtype, or ``"auto"`` itself."""
    return AUTO if name == AUTO else dtype_from_name(name)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"fp32"`` etc. (the inverse of :func:`dtype_from_name`)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"dtype {dtype} has no name here; expected one of {', '.join(map(str, DTYPES.values()))}")
