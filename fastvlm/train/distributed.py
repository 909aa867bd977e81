"""The few distributed pieces the trainer needs, all from PyTorch itself.

Under ``torchrun`` (``WORLD_SIZE`` > 1) a process group is started (NCCL on GPUs, gloo
on CPUs) and the model is wrapped in DDP or FSDP2 (``fully_shard``). Without torchrun
everything here degrades to the one-process case, so the same training code runs on a
laptop CPU and on an 8-GPU node.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from fastvlm.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start(device: str = "auto") -> Runtime:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but this torch build sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(rank, world, local_rank, dev)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Element-wise sums over processes (float64, so token counts stay exact)."""
    if not runtime.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device if runtime.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(items: list, runtime: Runtime) -> list:
    """The concatenation of every process's ``items`` (in rank order), on every process."""
    if not runtime.distributed:
        return list(items)
    boxes: list = [None] * runtime.world_size
    dist.all_gather_object(boxes, items)
    return [item for box in boxes for item in box]


def broadcast_object(obj: Any, runtime: Runtime) -> Any:
    if not runtime.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(
    module: nn.Module, runtime: Runtime, strategy: str, *, shard_units: list[nn.Module], find_unused: bool
) -> nn.Module:
    """DDP or FSDP2 around ``module`` when there are several processes; the module itself otherwise.

    FSDP2 shards every module of ``shard_units`` (decoder layers, tower stages) on its own
    and the rest at the root, so only one unit's full weights exist at a time.
    """
    if not runtime.distributed:
        return module
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise ImportError(
                f"--strategy fsdp needs torch >= 2.6 (FSDP2); this is torch {torch.__version__}"
            ) from None

        for unit in shard_units:
            fully_shard(unit)
        return cast(nn.Module, fully_shard(module))  # the module itself, now sharded
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """A context in which gradients are (or, between accumulation steps, are not) synchronised."""
    if enabled:
        return contextlib.nullcontext()
    no_sync = getattr(model, "no_sync", None)  # DDP
    if no_sync is not None:
        return no_sync()
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP2
    if set_sync is not None:

        @contextlib.contextmanager
        def fsdp_no_sync() -> Iterator[None]:
            set_sync(False)
            try:
                yield
            finally:
                set_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()
