"""Training throughput of a FastVLM-sized model (random weights), through the real trainer step.

Each row times ``Trainer.step`` (forward, backward, clipping, AdamW) on batches that the
real data path produced (``Trainer.loader``: synthetic images at the target resolution,
tokenised prompts), so what is measured is what ``fastvlm train`` does per step. The
baseline row is the same step with the loss computed the usual way, logits over the whole
vocabulary at every position; the ratio shows what computing logits only at target tokens
buys.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from fastvlm.bench.tokenizer import byte_tokenizer
from fastvlm.measure import markdown_table, mib, peak_memory_mb
from fastvlm.model import FastVLM
from fastvlm.presets import fastvlm_config
from fastvlm.processing import IGNORE_INDEX
from fastvlm.train.config import make_config
from fastvlm.train.synth import write_synthetic_dataset
from fastvlm.train.trainer import LossModule, Trainer

TARGETS_ONLY = "targets only"  # our loss: logits only where there is a target token
FULL_LOGITS = "full logits"  # the baseline


@dataclass
class TrainThroughputRow:
    device: str
    llm: str
    resolution: int
    stage: str
    loss: str  # TARGETS_ONLY (ours) or FULL_LOGITS (baseline)
    micro_batch: int
    samples_per_s: float
    tokens_per_s: float
    step_s: float
    peak_mb: float | None


class FullLogitsLoss(LossModule):
    """The usual loss: logits at every position over the whole vocabulary (the baseline)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, pixel_values, attention_mask, labels=labels)
        count = (labels[:, 1:] != IGNORE_INDEX).sum()
        return out.loss * count, count


def measure_training_step(
    llm: str = "0.5b",
    resolution: int = 1024,
    *,
    stage: str = "1",
    micro_batch: int = 1,
    steps: int = 2,
    device: str = "cpu",
    baseline: bool = True,
    progress: bool = False,
) -> list[TrainThroughputRow]:
    """Rows for our loss (and the full-logits baseline), each the median of ``steps`` timed steps after one warm-up."""
    config = fastvlm_config(llm, image_size=resolution)
    model = FastVLM.from_config(config, device="cpu", seed=0)
    model.tokenizer = byte_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastvlm-bench-train-") as tmp:
        data = write_synthetic_dataset(
            tmp, micro_batch * (steps + 1), size=resolution, test_fraction=0, progress=progress
        )
        train_config = make_config(
            stage=stage,
            model="(in memory)",
            data=str(data["train"]),
            output_dir=str(Path(tmp) / "out"),
            global_batch_size=micro_batch,
            micro_batch_size=micro_batch,
            max_steps=steps + 1,
            device=device,
            progress=False,
            grad_clip=1.0,
        )
        trainer = Trainer(train_config, model=model)
        batches = list(trainer.loader())
        variants: dict[str, nn.Module] = {TARGETS_ONLY: trainer.wrapped}
        if baseline:
            variants[FULL_LOGITS] = FullLogitsLoss(trainer.model)
        try:
            for name, module in variants.items():
                trainer.wrapped = module
                step_s, tokens = _median_step(trainer, batches)
                device_used = trainer.runtime.device
                peak = peak_memory_mb(partial(trainer.step, [batches[-1]]), device_used)
                rows.append(
                    TrainThroughputRow(
                        device=str(device_used),
                        llm=llm,
                        resolution=resolution,
                        stage=stage,
                        loss=name,
                        micro_batch=micro_batch,
                        samples_per_s=micro_batch / step_s,
                        tokens_per_s=tokens / step_s,
                        step_s=step_s,
                        peak_mb=peak,
                    )
                )
        finally:
            trainer.close()
    return rows


def _median_step(trainer: Trainer, batches: list) -> tuple[float, float]:
    """(median seconds per step, tokens of the last step) over ``batches[1:]``, after a warm-up on ``batches[0]``."""
    trainer.step([batches[0]])  # warm-up (also allocates the optimiser state)
    times, seen = [], 0.0
    for batch in batches[1:]:
        start = time.perf_counter()
        seen = trainer.step([batch]).tokens
        if trainer.runtime.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], seen


def format_train_table(rows: list[TrainThroughputRow]) -> str:
    columns = [
        "device",
        "LLM",
        ">px",
        "stage",
        "loss",
        ">micro-batch",
        ">samples/s",
        ">tokens/s",
        ">s/step",
        ">peak MiB",
    ]
    table = markdown_table(
        columns,
        [
            [
                r.device,
                r.llm,
                str(r.resolution),
                r.stage,
                r.loss,
                str(r.micro_batch),
                f"{r.samples_per_s:.3f}",
                f"{r.tokens_per_s:,.0f}",
                f"{r.step_s:.2f}",
                mib(r.peak_mb),
            ]
            for r in rows
        ],
    )
    ours = {(r.device, r.resolution, r.stage): r for r in rows if r.loss == TARGETS_ONLY}
    for r in rows:
        if r.loss == FULL_LOGITS and (key := (r.device, r.resolution, r.stage)) in ours:
            ratio = ours[key].samples_per_s / r.samples_per_s
            table += f"\n\n{key[0]} {key[1]} px stage {key[2]}: targets-only loss = {ratio:.2f}x full-logits samples/s"
    return table
