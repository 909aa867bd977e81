"""From a LLaVA-format file to padded training batches, in an order that can be resumed.

The file is read once to check every record and remember where the good ones are (byte
offsets for .jsonl, so a file of millions of records costs 8 bytes per record in memory);
records are re-read, tokenised and their images decoded only when a batch needs them.

The order of samples is a function of (seed, epoch, step) alone: global batch ``s`` is
slice ``s`` of a seeded permutation, each process takes a contiguous share of it and cuts
that into micro-batches. Resuming at step ``k`` therefore needs nothing but ``k``, and any
split of the same global batch over processes and accumulation steps sees the same samples.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fastvlm.errors import ConfigError
from fastvlm.processing import IGNORE_INDEX, ImageError, ImageProcessor
from fastvlm.train.data import ReadReport, Record, RecordError, iter_records, parse_record, tokenize_record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# (byte offsets or list positions, line numbers, text-only records, skipped records) of a data file
_Scan = tuple[np.ndarray, np.ndarray, int, list[str]]


class RecordIndex:
    """Random access to the good records of a data file; ``report`` lists the skipped ones.

    For .jsonl only two integers per record are kept (byte offset and line number). Under
    torchrun, pass ``share`` (a function broadcasting rank 0's object) so that one process
    reads and checks the file and every process gets the same index.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        image_root: str | Path | None = None,
        strict: bool = False,
        progress: bool = False,
        share: Callable[[Any], Any] | None = None,
        is_main: bool = True,
    ) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self._records: list[Record] | None = None
        scan: _Scan | Exception | None = None
        if self.path.suffix != ".jsonl" or share is None or is_main:
            try:
                scan = self._scan(strict, progress)
            except (RecordError, OSError) as err:
                if share is None or self.path.suffix != ".jsonl":
                    raise
                scan = err  # the other processes are waiting for the scan: they raise it too
        if self.path.suffix == ".jsonl" and share is not None:
            scan = share(scan)  # rank 0's scan, so every process has the same records
        if isinstance(scan, Exception):
            raise scan
        assert scan is not None  # rank 0 scanned, and every process got its result
        self.offsets, self.lines, self.num_text_only, skipped = scan
        self.report = ReadReport(read=len(self.offsets), skipped=skipped)

    def _scan(self, strict: bool, progress: bool) -> _Scan:
        from tqdm.auto import tqdm

        report = ReadReport()
        offsets: list[int] = []
        lines: list[int] = []
        text_only = 0
        records: list[Record] | None = [] if self.path.suffix != ".jsonl" else None
        found = iter_records(self.path, image_root=self.image_root, strict=strict, report=report, with_offsets=True)
        for offset, record in tqdm(found, desc="checking data", unit=" records", disable=not progress):
            offsets.append(offset)
            lines.append(int(record.where.rsplit(":", 1)[1]) if records is None else offset)
            text_only += record.image is None
            if records is not None:
                records.append(record)
        self._records = records
        return np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int64), text_only, report.skipped

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Record:
        if self._records is not None:
            return self._records[i]
        with self.path.open("rb") as f:
            f.seek(int(self.offsets[i]))
            raw = json.loads(f.readline().decode("utf-8"))
        where = f"{self.path.name}:{int(self.lines[i])}"
        return parse_record(raw, image_root=self.image_root, where=where, check_image=False)


class SupervisedDataset(Dataset):
    """Item ``i``: token ids with one image marker, labels and the image's pixels.

    A record that fails here (too long, unreadable image) comes back as ``{"error": ...}``
    so the batch goes on without it and the run reports it, instead of dying hours in.
    """

    def __init__(
        self,
        records: RecordIndex,
        tokenizer: PreTrainedTokenizerBase,
        processor: ImageProcessor,
        *,
        num_image_tokens: int,
        max_length: int,
    ) -> None:
        self.records, self.tokenizer, self.processor = records, tokenizer, processor
        self.num_image_tokens, self.max_length = num_image_tokens, max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        try:
            example = tokenize_record(
                self.tokenizer, record, num_image_tokens=self.num_image_tokens, max_length=self.max_length
            )
            pixels = self.processor(example.image) if example.image is not None else None
        except (RecordError, ImageError, OSError) as err:
            message = str(err) if isinstance(err, RecordError) else f"{record.where} (id {record.id}): {err}"
            return {"index": i, "error": message}
        return {
            "index": i,
            "input_ids": torch.tensor(example.input_ids, dtype=torch.long),
            "labels": torch.tensor(example.labels, dtype=torch.long),
            "pixel_values": pixels,
        }


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] right-padded, one IMAGE_TOKEN_INDEX per image
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None  # [N images, 3, S, S] in placeholder order
    errors: list[str]

    @property
    def num_label_tokens(self) -> int:
        """Tokens the loss is taken over (labels shift by one: the first position is never a target)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(items: list[dict], pad_token_id: int) -> Batch:
    good = [it for it in items if "error" not in it]
    errors = [it["error"] for it in items if "error" in it]
    length = max((len(it["input_ids"]) for it in good), default=0)
    ids = torch.full((len(good), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(good), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(good), length), dtype=torch.long)
    for row, it in enumerate(good):
        n = len(it["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = it["input_ids"], it["labels"], 1
    pixels = [it["pixel_values"] for it in good if it["pixel_values"] is not None]
    return Batch(ids, mask, labels, torch.stack(pixels) if pixels else None, errors)


@dataclass(frozen=True)
class BatchPlan:
    """How global batches are cut into per-process micro-batches; see the module docstring."""

    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global batch size {self.global_batch_size} is not a multiple of micro batch size "
                f"{self.micro_batch_size} x {self.world_size} process(es)"
            )
        if self.num_samples < self.global_batch_size:
            raise ConfigError(
                f"the data has {self.num_samples} usable records, fewer than one global batch "
                f"({self.global_batch_size}); lower global_batch_size"
            )

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size  # the last partial global batch is dropped

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, round(self.epochs * self.steps_per_epoch))

    def global_batch(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = _epoch_order(self.num_samples, self.seed, epoch)
        start = within * self.global_batch_size
        return order[start : start + self.global_batch_size].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches of ``step``."""
        share = self.global_batch_size // self.world_size
        mine = self.global_batch(step)[self.rank * share : (self.rank + 1) * share]
        return [mine[i : i + self.micro_batch_size] for i in range(0, share, self.micro_batch_size)]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class PlanSampler(Sampler[list[int]]):
    """The micro-batches of steps ``start_step`` … ``total_steps - 1``, for a DataLoader's ``batch_sampler``."""

    def __init__(self, plan: BatchPlan, start_step: int = 0) -> None:
        self.plan, self.start_step = plan, start_step

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.plan.total_steps):
            yield from self.plan.micro_batches(step)

    def __len__(self) -> int:
        return (self.plan.total_steps - self.start_step) * self.plan.accumulation
