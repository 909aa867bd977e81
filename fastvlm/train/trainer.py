"""The training loop: one file, read top to bottom.

``train(config)`` loads a FastVLM checkpoint, selects what to train (and adds LoRA
adapters if asked), wraps the model for DDP or FSDP when run under torchrun, and runs
AdamW with a warm-up + cosine schedule over the batches of :mod:`fastvlm.train.dataset`.

Two properties are designed in and tested:

* the loss of a global batch is the sum of its token losses divided by the number of
  target tokens in the whole global batch, so one process with batch B and two processes
  with B/2 each (or any accumulation split) compute the same gradients;
* a checkpoint holds everything the run depends on (weights, optimiser, scheduler, RNG,
  step; the data order is a function of the step), so a resumed run repeats the losses an
  uninterrupted one would have produced.

The files of a run (checkpoint folders written atomically, RNG state, pruning, the final
``model/``) are :mod:`fastvlm.train.checkpointing`'s business; this module decides what
goes into them and when. ``Trainer.loader()`` and ``Trainer.step()`` are the public pieces
of the loop, which the training benchmark times.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastvlm.errors import CheckpointError, ConfigError, DataError
from fastvlm.model import FastVLM
from fastvlm.train import checkpointing as C
from fastvlm.train import distributed as D
from fastvlm.train.adapters import adapter_state, merge_lora
from fastvlm.train.config import TrainConfig
from fastvlm.train.dataset import Batch, BatchPlan, PlanSampler, RecordIndex, SupervisedDataset, collate
from fastvlm.train.setup import (
    LossModule,
    build_optimizer,
    load_model,
    set_train_mode,
    uses_batch_statistics,
    warmup_cosine,
)


@dataclass
class TrainResult:
    output_dir: Path
    final_model: Path | None
    steps: int  # steps done in total (including those before a resume)
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, for the steps run by this call
    skipped: list[str] = field(default_factory=list)  # records skipped when reading the data file


@dataclass
class StepStats:
    """One optimiser step, summed over all processes."""

    loss: float  # mean token loss of the global batch
    target_tokens: int  # tokens the loss was taken over
    tokens: float  # tokens the model saw, visual tokens included
    samples: int  # records that made it into the step
    grad_norm: float | None  # before clipping; None without clipping
    errors: list[str]  # records that failed while loading (skipped)


class Trainer:
    """Set-up in ``__init__`` (model, data, wrapping, optimiser, resume), then ``run()``.

    ``model`` replaces loading ``config.model`` (benchmarks build random models in memory).
    ``resume`` continues the latest (``True`` or ``"latest"``) or a named checkpoint;
    ``overwrite`` lets a new run replace an old one in the same output folder.
    ``loader()`` and ``step()`` are the loop's pieces for callers that drive it themselves.
    """

    def __init__(
        self, config: TrainConfig, model: FastVLM | None = None, *, resume: bool | str = False, overwrite: bool = False
    ) -> None:
        config.validate()
        self.config = config
        self.out = Path(config.output_dir)
        self.runtime = rt = D.start(config.device)
        self.model = load_model(config, rt, model)
        writer = _summary_writer() if config.tensorboard else None
        self._build_data()
        # resume: weights go into the plain model, before it is wrapped
        self.start_step = 0
        self.resume_from = C.find_resume(self.out, resume)
        if rt.is_main:
            C.prepare_output_dir(self.out, resuming=self.resume_from is not None, overwrite=overwrite)
        if self.resume_from is not None:
            self._load_weights(self.resume_from)
        set_train_mode(self.model, config)
        self.wrapped = self._wrap()
        self.optimizer = build_optimizer(self.model, config, self.wrapped.named_parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.plan.total_steps, config.warmup_ratio, config.min_lr_ratio)
        )
        if self.resume_from is not None:
            self._load_training_state(self.resume_from)
        else:
            C.seed_everything(config.seed + rt.rank)
        self.autocast_bf16 = config.precision == "bf16" or (
            config.precision == "auto" and rt.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.tensorboard = writer(str(self.out / C.TENSORBOARD_DIR)) if writer is not None and rt.is_main else None

    def _build_data(self) -> None:
        config, rt = self.config, self.runtime
        self.records = RecordIndex(
            config.data,
            image_root=config.image_root,
            strict=config.strict_data,
            progress=config.progress and rt.is_main,
            share=(lambda obj: D.broadcast_object(obj, rt)) if rt.distributed else None,
            is_main=rt.is_main,
        )
        text = self.model.config
        max_length = min(config.max_length or text.context_length, text.context_length)
        assert self.model.tokenizer is not None  # load_model refuses a checkpoint without one
        self.dataset = SupervisedDataset(
            self.records,
            self.model.tokenizer,
            self.model.image_processor,
            num_image_tokens=text.num_image_tokens(),
            max_length=max_length,
        )
        self.plan = BatchPlan(
            num_samples=len(self.records),
            global_batch_size=config.global_batch_size,
            micro_batch_size=config.micro_batch_size,
            world_size=rt.world_size,
            rank=rt.rank,
            seed=config.seed,
            epochs=config.epochs,
            max_steps=config.max_steps,
        )
        assert self.model.tokenizer is not None  # load_model checked
        pad = self.model.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else 0

    def _wrap(self) -> nn.Module:
        rt = self.runtime
        fsdp = rt.distributed and self.config.strategy == "fsdp"
        if rt.distributed and rt.is_main and uses_batch_statistics(self.model):
            self._warn(
                "the tower's batch norms use batch statistics (--tower-batchnorm train/auto on a training-form tower): "
                "each process normalises over its own micro-batch, so results depend on the process count"
            )
        return D.wrap(
            LossModule(self.model, pad_token_id=self.pad_token_id, use_every_module=fsdp),
            rt,
            self.config.strategy,
            shard_units=[*self.model.language_model.model.layers, *self.model.vision_tower.stages],
            find_unused=self.records.num_text_only > 0,
        )

    # ---------------------------------------------------------------- resume
    def _load_weights(self, checkpoint: Path) -> None:
        state = C.read_model_weights(checkpoint, adapters=bool(self.config.lora_rank))
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(state))
        if missing:
            raise CheckpointError(f"{checkpoint} lacks trainable tensors: {', '.join(missing[:5])}")
        self.model.load_state_dict(state, strict=False)

    def _load_training_state(self, checkpoint: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = C.read_trainer_state(checkpoint)
        saved, now = state["plan"], self._plan_signature()
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if changed:
            details = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(f"cannot resume from {checkpoint}: the run's data order would change ({details})")
        set_optimizer_state_dict(
            self.wrapped, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_step = state["step"]
        rng = C.read_rng_state(checkpoint, self.runtime.rank)
        if rng is not None:
            C.set_rng_state(rng)
        else:
            self._warn(
                f"{checkpoint} has no random state for process {self.runtime.rank} (was the process count "
                f"{state['world_size']}?): dropout masks will differ from an uninterrupted run"
            )

    def _plan_signature(self) -> dict[str, int]:
        p = self.plan
        return {
            "num_samples": p.num_samples,
            "global_batch_size": p.global_batch_size,
            "seed": p.seed,
            "total_steps": p.total_steps,
            "data_bytes": Path(self.config.data).stat().st_size,
        }

    # ---------------------------------------------------------------- saving
    @functools.cached_property
    def _qlora_base(self) -> dict[str, torch.Tensor]:
        """The source checkpoint's full-precision tensors (our names), read once: QLoRA's base is 4-bit."""
        from fastvlm.files import read_checkpoint_tensors
        from fastvlm.formats import read_checkpoint_config

        folder = self.model.source_path
        if folder is None:
            raise ConfigError("QLoRA exports merge into the source checkpoint's weights: load the model from a folder")
        tensors = read_checkpoint_tensors(folder)
        _, checkpoint_format = read_checkpoint_config(folder)
        names = checkpoint_format.keys_to_ours(list(tensors))
        return {names[k]: v for k, v in tensors.items()}

    def _export_state(self, model_state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """(weights for the FastVLM checkpoint, LoRA adapter tensors)."""
        if not self.config.lora_rank:
            return model_state, {}
        base = self._qlora_base if self.config.qlora else {}
        merged = merge_lora(model_state, base, rank=self.config.lora_rank, alpha=self.config.lora_alpha)
        return merged, adapter_state(model_state)

    def save_checkpoint(self, step: int, *, final_model: bool = False) -> Path:
        """Write ``checkpoint-{step}`` atomically; every process must call this.

        With ``final_model`` the same gathered weights also go to ``model/`` (weights only,
        LoRA merged), the trained model that outlives checkpoint pruning.
        """
        model_state, optim_state = C.full_state_dicts(self.wrapped, self.optimizer)
        weights, adapters = self._export_state(model_state) if self.runtime.is_main else ({}, {})

        def write(folder: Path) -> None:  # on rank 0
            self.model.save_pretrained(folder, overwrite=True, state_dict=weights)
            if adapters:
                C.save_adapters(folder, adapters)
            state = {
                "step": step,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "plan": self._plan_signature(),
                "config": self.config.to_dict(),
                "world_size": self.runtime.world_size,
            }
            C.save_trainer_state(folder, state)

        saved = C.write_checkpoint(self.out, step, self.runtime, write=write, keep=self.config.keep_checkpoints)
        if final_model and self.runtime.is_main:
            self.model.save_pretrained(self.out / C.FINAL_MODEL, overwrite=True, state_dict=weights)
        D.barrier(self.runtime)
        return saved

    # ---------------------------------------------------------------- the loop
    def loader(self) -> DataLoader:
        """This process's micro-batches from ``start_step`` to the end, ``plan.accumulation`` per step."""
        return DataLoader(
            self.dataset,
            batch_sampler=PlanSampler(self.plan, self.start_step),
            collate_fn=partial(collate, pad_token_id=self.pad_token_id),
            num_workers=self.config.num_workers,
            persistent_workers=False,
            # its own generator: creating the iterator must not draw from the global RNG (dropout, resume)
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def step(self, micro_batches: list[Batch]) -> StepStats:
        """One optimiser step over this process's micro-batches; every process must call it."""
        rt, cfg = self.runtime, self.config
        image_tokens = self.model.config.num_image_tokens()
        local_targets = sum(b.num_label_tokens for b in micro_batches)
        local_errors = [e for b in micro_batches for e in b.errors]
        # each image's one placeholder token stands for image_tokens visual tokens
        local_seen = sum(
            int(b.attention_mask.sum()) + (0 if b.pixel_values is None else len(b.pixel_values) * (image_tokens - 1))
            for b in micro_batches
        )
        global_targets, n_errors = D.all_reduce_sum([local_targets, len(local_errors)], rt)
        errors = D.gather_objects(local_errors, rt) if n_errors else []
        if errors and cfg.strict_data:
            raise DataError(f"unusable record (--strict-data): {errors[0]}")
        scale = rt.world_size / max(global_targets, 1.0)  # DDP/FSDP average gradients over processes
        loss_sum = torch.zeros((), device=rt.device)
        for i, batch in enumerate(micro_batches):
            with D.gradient_sync(self.wrapped, enabled=i == len(micro_batches) - 1):
                loss = self._forward(batch)
                (loss * scale).backward()
            loss_sum += loss.detach().float()
        grad_norm = self._clip_gradients()
        if global_targets > 0:  # a step whose records all failed must not move the weights (decay, momentum)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, seen = D.all_reduce_sum([float(loss_sum), float(local_seen)], rt)
        return StepStats(
            loss=total_loss / max(global_targets, 1.0),
            target_tokens=int(global_targets),
            tokens=seen,
            samples=cfg.global_batch_size - int(n_errors),
            grad_norm=grad_norm,
            errors=errors,
        )

    def _forward(self, batch: Batch) -> torch.Tensor:
        """The summed token loss of one micro-batch."""
        device = self.runtime.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            loss, _ = self.wrapped(
                batch.input_ids.to(device),
                batch.attention_mask.to(device),
                batch.labels.to(device),
                None if batch.pixel_values is None else batch.pixel_values.to(device),
            )
        return loss

    def _clip_gradients(self) -> float | None:
        if not self.config.grad_clip:
            return None
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def run(self, *, stop_after: int | None = None) -> TrainResult:
        """Train to the end (or, for tests of resuming, return right after step ``stop_after``)."""
        from tqdm.auto import tqdm

        rt, cfg, plan = self.runtime, self.config, self.plan
        result = TrainResult(self.out, None, self.start_step, skipped=list(self.records.report.skipped))
        log = self._open_log()
        bar = tqdm(
            total=plan.total_steps,
            initial=self.start_step,
            desc=f"stage {cfg.stage}",
            unit="step",
            disable=not (cfg.progress and rt.is_main),
            dynamic_ncols=True,
        )
        batches = iter(self.loader())
        started = time.perf_counter()
        try:
            for step in range(self.start_step, plan.total_steps):
                t0 = time.perf_counter()
                micro_batches = [next(batches) for _ in range(plan.accumulation)]
                lrs = self._learning_rates()  # this step's rates, before the scheduler moves on
                stats = self.step(micro_batches)
                done = step + 1
                entry = self._record_step(done, stats, lrs, time.perf_counter() - t0, started, result, log)
                bar.set_postfix(
                    loss=f"{stats.loss:.4f}",
                    lr=f"{entry['lr']:.2e}",
                    tok_s=f"{entry['tokens_per_s']:.0f}",
                    refresh=False,
                )
                bar.update(1)
                if cfg.save_every and done % cfg.save_every == 0 and done != plan.total_steps:
                    self.save_checkpoint(done)
                if stop_after is not None and done >= stop_after:
                    return result
        finally:
            bar.close()
            log.close()
        self.save_checkpoint(plan.total_steps, final_model=True)
        result.final_model = self.out / C.FINAL_MODEL
        return result

    def _learning_rates(self) -> dict[str, float]:
        """{"rest": lr, "tower": lr (when the tower has its own)} of the coming step."""
        return {
            g["name"].removesuffix("_no_decay"): float(lr)
            for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True)
        }

    def _record_step(
        self,
        done: int,
        stats: StepStats,
        lrs: dict[str, float],
        seconds: float,
        started: float,
        result: TrainResult,
        log: IO[str],
    ) -> dict[str, Any]:
        """Note step ``done`` in ``result``, the log and TensorBoard; stop on a non-finite loss."""
        rt = self.runtime
        for error in stats.errors:
            result.skipped.append(error)
            if rt.is_main:
                self._warn(f"step {done}: skipped a record: {error}")
                log.write(json.dumps({"event": "skipped_record", "step": done, "reason": error}) + "\n")
        if not math.isfinite(stats.loss):
            raise FloatingPointError(
                f"step {done}: the loss is {stats.loss}; lower the learning rate or check the data"
            )
        result.losses[done], result.steps = stats.loss, done
        entry = {
            "step": done,
            "loss": stats.loss,
            "lr": lrs.get("rest", next(iter(lrs.values()))),
            **({"tower_lr": lrs["tower"]} if "tower" in lrs else {}),
            "grad_norm": stats.grad_norm,
            "target_tokens": stats.target_tokens,
            "tokens_per_s": stats.tokens / seconds,
            "samples_per_s": stats.samples / seconds,
            "elapsed_s": time.perf_counter() - started,
        }
        if rt.is_main and (done % self.config.log_every == 0 or done == self.plan.total_steps):
            log.write(json.dumps(entry) + "\n")
            log.flush()
            if self.tensorboard is not None:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    if entry[key] is not None:
                        self.tensorboard.add_scalar(f"train/{key}", entry[key], done)
        return entry

    def _open_log(self) -> IO[str]:
        if not self.runtime.is_main:
            return open(os.devnull, "w")  # noqa: SIM115 - closed by run()
        self.out.mkdir(parents=True, exist_ok=True)
        log = (self.out / C.LOG_FILE).open("a")
        start = {
            "event": "start",
            "step": self.start_step,
            "total_steps": self.plan.total_steps,
            "world_size": self.runtime.world_size,
            "accumulation": self.plan.accumulation,
            "records": len(self.records),
            "skipped_records": len(self.records.report.skipped),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "config": self.config.to_dict(),
        }
        log.write(json.dumps(start) + "\n")
        for reason in self.records.report.skipped:
            log.write(json.dumps({"event": "skipped_record", "reason": reason}) + "\n")
        return log

    def _warn(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"[rank {self.runtime.rank}] {message}", file=sys.stderr)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        D.stop()


def _summary_writer() -> Callable[[str], Any]:
    """TensorBoard's SummaryWriter class, checked before the run starts."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def train(
    config: TrainConfig, *, resume: bool | str = False, overwrite: bool = False, stop_after: int | None = None
) -> TrainResult:
    """Run a training job described by ``config``; see the module docstring.

    ``resume`` continues the latest (``True``) or a named checkpoint; ``overwrite`` lets a
    new run replace an old one in the same output folder.
    """
    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    try:
        return trainer.run(stop_after=stop_after)
    finally:
        trainer.close()
