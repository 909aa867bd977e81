"""A training run's folder on disk: checkpoints written whole, found again, read back.

The output folder of a run holds ``checkpoint-NNNNNNN/`` folders, the final ``model/``,
``log.jsonl`` and ``tensorboard/``. A checkpoint is a FastVLM checkpoint
(``FastVLM.from_pretrained`` loads it, ``fastvlm convert`` converts it) plus
``trainer_state.pt`` (step, optimiser, scheduler, the data plan's signature), one
``rng-R.pt`` per process and, for LoRA runs, ``adapter.safetensors``.

Atomicity is :mod:`fastvlm.files`'s: a checkpoint is assembled in
``files.staging_dir(final)`` (rank 0 creates it, every process adds its RNG file, rank 0
adds the rest and publishes it), so a folder named ``checkpoint-*`` with a
``trainer_state.pt`` is always complete; deleting goes through a hidden name too. What a
killed save leaves behind is found with ``files.leftover_dirs`` and cleared at the next
start. Nothing here knows about the training loop: the trainer passes in what to save.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from fastvlm.errors import CheckpointNotFoundError, OutputExistsError
from fastvlm.files import (
    leftover_dirs,
    new_staging_dir,
    publish_dir,
    read_state_dict,
    remove_dir_atomically,
    save_safetensors_atomic,
    staging_dir,
)
from fastvlm.train import distributed as D

CHECKPOINT_PREFIX = "checkpoint-"
STEP_DIGITS = 7  # checkpoint-0000042: names sort in step order
TRAINER_STATE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
FINAL_MODEL = "model"
LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
LLM_PREFIX = "language_model."  # our names of the LLM's tensors
WRAPPER_PREFIX = "model."  # what LossModule (the module DDP/FSDP wrap) puts before the model's names
NUMPY_SEED_RANGE = 2**32  # np.random.seed takes a 32-bit seed


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"{CHECKPOINT_PREFIX}{step:0{STEP_DIGITS}d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder appears only when its last file is written)."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


# ------------------------------------------------------------------------------ random state


def seed_everything(seed: int) -> None:
    """Seed every generator a step may draw from (torch, Python, NumPy)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % NUMPY_SEED_RANGE)


def rng_state() -> dict[str, Any]:
    """Every generator a step may draw from, as plain types and tensors (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state(legacy=True))
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng-{rank}.pt"


# ------------------------------------------------------------------------------ writing


def full_state_dicts(
    wrapped: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Unsharded model (and optimiser) state on the CPU, keyed by the model's own parameter names.

    Every process must call this: under FSDP it gathers the shards.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(wrapped, options=options)
    optim_state = get_optimizer_state_dict(wrapped, optimizer, options=options) if optimizer is not None else None
    strip = len(WRAPPER_PREFIX)
    return {k[strip:]: v for k, v in model_state.items()}, optim_state


def write_checkpoint(
    output_dir: Path, step: int, runtime: D.Runtime, *, write: Callable[[Path], None], keep: int
) -> Path:
    """Write ``checkpoint-{step}`` atomically and prune all but the ``keep`` newest; every process calls this.

    ``write(folder)`` runs on rank 0 only and adds the model files and trainer state to the
    staging folder; each process adds its own RNG state.
    """
    final = checkpoint_path(output_dir, step)
    staging = staging_dir(final)
    if runtime.is_main:
        new_staging_dir(final)
    D.barrier(runtime)
    torch.save(rng_state(), _rng_file(staging, runtime.rank))
    D.barrier(runtime)
    if runtime.is_main:
        write(staging)
        publish_dir(staging, final)  # re-saving a step (a finished run resumed) replaces the old folder whole
        for old in list_checkpoints(output_dir)[:-keep]:
            remove_dir_atomically(old)
    return final


def save_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / TRAINER_STATE)


def save_adapters(folder: Path, adapters: dict[str, torch.Tensor]) -> None:
    save_safetensors_atomic(adapters, folder / ADAPTER_FILE)


def prepare_output_dir(output_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """Clear what a killed save left; refuse to mix a new run into an old one's folder (rank 0 only)."""
    if output_dir.is_dir():
        for leftover in leftover_dirs(output_dir):
            shutil.rmtree(leftover, ignore_errors=True)
    ours = [
        *list_checkpoints(output_dir),
        output_dir / FINAL_MODEL,
        output_dir / LOG_FILE,
        output_dir / TENSORBOARD_DIR,
    ]
    existing = [p for p in ours if p.exists()]
    if not existing or resuming:
        return
    if not overwrite:
        raise OutputExistsError(
            f"{output_dir} already holds a run ({', '.join(p.name for p in existing[:3])}); "
            "pass --resume to continue it or --overwrite to start over"
        )
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ------------------------------------------------------------------------------ reading


def find_resume(output_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from: none, the latest (``True`` or ``"latest"``), or a named folder."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointNotFoundError(f"--resume: no complete checkpoint in {output_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointNotFoundError(f"--resume: {path} is not a complete training checkpoint (no {TRAINER_STATE})")
    return path


def read_model_weights(checkpoint: Path, *, adapters: bool) -> dict[str, torch.Tensor]:
    """The weights to restore from ``checkpoint``, by our names.

    With ``adapters`` (LoRA runs) the LLM's saved weights are merged ones: they are left out,
    the LLM base stays as loaded and the adapters come back from their own file.
    """
    state = read_state_dict(checkpoint / WEIGHTS_FILE)
    if adapters:
        state = {k: v for k, v in state.items() if not k.startswith(LLM_PREFIX)}
        state.update(read_state_dict(checkpoint / ADAPTER_FILE))
    return state


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)


def read_rng_state(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    """The RNG state process ``rank`` saved, or None when it saved none (a different process count)."""
    path = _rng_file(checkpoint, rank)
    return torch.load(path, weights_only=True) if path.is_file() else None
