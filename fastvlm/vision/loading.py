"""Strict loading of a vision tower from a state dict in any layout.

The implementation of :meth:`fastvlm.vision.fastvit.FastViT.from_state_dict`. It sits
below the tower class (it takes the class to build as an argument instead of importing
it), so that neither module imports the other at run time. Loading is strict: every
tensor of the model must be in the checkpoint with the right shape and nothing else may
be, and the error names each offender as the checkpoint spells it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from fastvlm.errors import CheckpointError
from fastvlm.files import read_state_dict
from fastvlm.state_dicts import check_state_dict, describe, materialize
from fastvlm.vision.config import FastViTConfig
from fastvlm.vision.layouts import (
    TowerLayout,
    detect_tower_layout,
    extract_tower_state_dict,
    infer_tower_config,
    tower_keys_from_ours,
    tower_keys_to_ours,
)

__all__ = ["infer_tower_config", "load_tower_state_dict"]

Tower = TypeVar("Tower", bound=nn.Module)


def load_tower_state_dict(
    build: Callable[[FastViTConfig], Tower],
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    config: FastViTConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> Tower:
    """A tower made by ``build(config)`` holding ``state_dict``'s tensors, in eval mode.

    See :meth:`fastvlm.vision.fastvit.FastViT.from_state_dict` for what is accepted.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = read_state_dict(state_dict)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"state dict entries that are not tensors: {describe(not_tensors)}")
    tensors, prefix = extract_tower_state_dict(state_dict)
    layout = detect_tower_layout(tensors)
    names = tower_keys_to_ours(tensors, layout)
    original = {ours: prefix + theirs for theirs, ours in names.items()}
    ours = {names[k]: v for k, v in tensors.items()}
    keep_head = config is not None and config.projection_dim is not None
    if not keep_head:
        ours.pop("head.proj", None)
    if config is None:
        try:
            config = infer_tower_config(ours)
        except (IndexError, ZeroDivisionError, TypeError) as err:
            raise CheckpointError(
                f"cannot read the tower's architecture from its tensors (a tensor has an odd shape: {err})"
            ) from None

    with torch.device("meta"):
        model = build(config)
    tower_config = config

    def theirs(key: str) -> str:
        if key in original:
            return original[key]
        if layout is TowerLayout.OURS:
            return prefix + key
        return prefix + tower_keys_from_ours([key], layout, tower_config)[key]

    expected = model.state_dict()
    check_state_dict(expected, ours, theirs, what=f"vision tower checkpoint ({layout} layout) does not fit {config}")
    model.load_state_dict(materialize(expected, ours, device=device, dtype=dtype), strict=True, assign=True)
    return model.eval()
