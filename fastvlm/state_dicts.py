"""Strict state-dict loading with errors a person can act on.

``torch``'s own strict loading reports our module names; a user holds a file that spells
them another way (the authors' or timm's layout, a checkpoint prefix). These helpers
compare what a model expects with what a checkpoint provides and name every missing,
unexpected or mis-shaped tensor as the checkpoint spells it, then produce the tensors to
assign into a model built on the ``meta`` device (no second copy of the weights).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fastvlm.errors import CheckpointError

# How many names an error message lists before it says how many more there are.
NAMES_SHOWN = 12


def is_batch_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``: a training counter that checkpoints may omit."""
    return key.endswith("num_batches_tracked")


def describe(names: list[str], limit: int = NAMES_SHOWN) -> str:
    """``names`` joined by commas, the first ``limit`` of them and a count of the rest."""
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    provided: Mapping[str, torch.Tensor],
    name_of: Callable[[str], str],
    *,
    what: str,
    optional: Callable[[str], bool] = is_batch_counter,
) -> None:
    """Raise a :class:`CheckpointError` listing missing, unexpected and mis-shaped tensors.

    Keys are ours; ``name_of`` spells them as the checkpoint does, so that the message
    names tensors the user can find in their file. ``optional`` keys may be missing.
    """
    missing = [k for k in expected if k not in provided and not optional(k)]
    unexpected = [k for k in provided if k not in expected]
    mismatched = [
        f"{name_of(k)}: checkpoint {list(provided[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in provided and provided[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {describe([name_of(k) for k in missing])}")
    if unexpected:
        problems.append(f"unexpected tensors: {describe([name_of(k) for k in unexpected])}")
    if mismatched:
        problems.append(f"tensors with the wrong shape: {describe(mismatched)}")
    if problems:
        details = "\n  ".join(problems)
        raise CheckpointError(f"{what}:\n  {details}")


def materialize(
    expected: Mapping[str, torch.Tensor],
    provided: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """The tensors to assign into a meta-built model: cast, moved, with absent counters as zeros."""
    out = {}
    for key in expected:
        value = provided.get(key)
        if value is None:  # num_batches_tracked: a training counter, irrelevant to the output
            value = torch.zeros((), dtype=torch.long)
        if value.is_floating_point() and dtype is not None:
            value = value.to(dtype)
        out[key] = value.to(device) if device is not None else value
    return out
