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

Checkpoints are folders ``checkpoint-NNNNNNN/`` built under a hidden name and renamed into
place when complete; each is a FastVLM checkpoint (``FastVLM.from_pretrained`` loads it,
``fastvlm convert`` converts it) plus ``trainer_state.pt`` and per-process ``rng-R.pt``.
The end of the run writes the final model to ``model/``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastvlm.model import FastVLM
from fastvlm.processing import ImageProcessor
from fastvlm.train import distributed as D
from fastvlm.train.adapters import adapter_state, add_lora, merge_lora
from fastvlm.train.config import TrainConfig
from fastvlm.train.dataset import Batch, BatchPlan, PlanSampler, RecordIndex, SupervisedDataset, collate

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainResult:
    output_dir: Path
    final_model: Path | None
    steps: int  # steps done in total (including those before a resume)
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, for the steps run by this call
    skipped: list[str] = field(default_factory=list)  # records skipped when reading the data file


class LossModule(nn.Module):
    """What DDP and FSDP wrap: a forward that returns (summed token loss, target count).

    With ``use_every_module`` (FSDP, whose shard units all-gather their weights when they
    run) every process must run every unit in every micro-batch, or the others wait
    forever: a micro-batch without images also runs the tower on a blank image (in eval
    mode, so no batch-norm statistics change; its output is multiplied by zero), and one
    whose records all failed runs a one-token row with nothing to learn.
    """

    def __init__(self, model: FastVLM, *, pad_token_id: int = 0, use_every_module: bool = False) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id
        self.use_every_module = use_every_module

    def forward(self, input_ids, attention_mask, labels, pixel_values):
        if input_ids.shape[0] == 0:  # every record of this micro-batch failed: a row with no targets
            input_ids = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=input_ids.device)
            attention_mask, labels = torch.ones_like(input_ids), torch.full_like(input_ids, -100)
        blank = None
        if self.use_every_module and pixel_values is None:  # before the LLM: the same order as with images
            blank = self._blank_image_features().sum() * 0
        loss, count = self.model.training_loss(input_ids, labels, attention_mask, pixel_values)
        return (loss if blank is None else loss + blank), count

    def _blank_image_features(self) -> torch.Tensor:
        tower, size = self.model.vision_tower, self.model.config.image_size
        modes = {m: m.training for m in tower.modules()}
        tower.eval()
        try:
            return self.model.encode_images(torch.zeros(1, 3, size, size, device=self.model.device))
        finally:
            for module, training in modes.items():
                module.training = training


# ------------------------------------------------------------------------------ model set-up


def load_model(config: TrainConfig, runtime: D.Runtime, model: FastVLM | None = None) -> FastVLM:
    """The checkpoint (or ``model``) in fp32, the master weights, with adapters and trainable parts chosen."""
    torch.manual_seed(config.seed)  # identical adapter initialisation on every process
    if model is None:
        model = FastVLM.from_pretrained(config.model, device="cpu", dtype=torch.float32, fuse=False)
    if model.tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer; training needs one")
    if config.image_size is not None:
        stride = model.config.vision.stride
        if config.image_size % stride:
            raise ValueError(f"image_size must be a multiple of the tower's stride {stride}; got {config.image_size}")
        model.config.image_size = config.image_size
        model.image_processor = ImageProcessor(config.image_size, model.config.image_mode)
    for param in model.parameters():
        param.requires_grad = False
    if config.lora_rank:
        add_lora(
            model.language_model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
            targets=config.lora_targets, qlora=config.qlora,
        )  # fmt: skip
    parts = {"tower": model.vision_tower, "projector": model.projector, "llm": model.language_model}
    for name in config.train:
        if name == "llm" and config.lora_rank:
            continue  # add_lora made exactly the adapters trainable
        for param in parts[name].parameters():
            param.requires_grad = True
    if model.vision_tower.head is not None:  # the CLIP head is not on the VLM's path: it would get no gradient
        model.vision_tower.head.requires_grad_(False)
    if config.gradient_checkpointing:
        model.vision_tower.set_gradient_checkpointing(True)
        lm, kwargs = model.language_model, {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.to(runtime.device)


def set_train_mode(model: FastVLM, config: TrainConfig) -> None:
    """Train mode for what trains; the tower's batch norms as ``config.tower_batchnorm`` says.

    ``frozen`` keeps running statistics, so a sample's output does not depend on the rest
    of its batch: any batch split then gives the same result, and a pretrained tower is
    not disturbed by small per-device batches. ``train`` uses batch statistics, which a
    tower trained from scratch (``fastvlm init`` writes its training form) needs. ``auto``
    picks ``train`` exactly for a trainable training-form tower. A frozen tower runs in
    eval mode.
    """
    model.train()
    tower = model.vision_tower
    if "tower" not in config.train:
        tower.eval()
        return
    mode = config.tower_batchnorm
    if mode == "auto":
        mode = "frozen" if tower.config.inference_mode else "train"
    if mode == "frozen":
        for module in tower.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def build_optimizer(model: FastVLM, config: TrainConfig, named_params) -> torch.optim.AdamW:
    """AdamW; the tower may have its own learning rate; no weight decay on biases and norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        is_tower = ".vision_tower." in f".{name}"
        decay = param.ndim >= 2
        groups.setdefault((is_tower, decay), []).append(param)
    if not groups:
        raise ValueError("nothing to train: the selected parts have no trainable parameters")
    param_groups = [
        {
            "params": params,
            "lr": config.tower_lr if is_tower and config.tower_lr is not None else config.lr,
            "weight_decay": config.weight_decay if decay else 0.0,
            "name": ("tower" if is_tower else "rest") + ("" if decay else "_no_decay"),
        }
        for (is_tower, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, betas=config.adam_betas, eps=config.adam_eps)


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float):
    """Learning-rate factor of a step: linear warm-up over ceil(ratio * steps), then cosine decay."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# ------------------------------------------------------------------------------ checkpoints


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder appears only when its last file is written)."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _rng_state() -> dict:
    """Every generator a step may draw from, as plain types and tensors (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state_dicts(wrapped: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """Unsharded model (and optimiser) state on the CPU, keyed by the model's own parameter names."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(wrapped, options=options)
    optim_state = get_optimizer_state_dict(wrapped, optimizer, options=options) if optimizer is not None else None
    strip = len("model.")  # LossModule's attribute
    return {k[strip:]: v for k, v in model_state.items()}, optim_state


class Trainer:
    """Set-up in ``__init__`` (model, data, wrapping, optimiser, resume), then ``run()``.

    ``model`` replaces loading ``config.model`` (benchmarks build random models in memory).
    """

    def __init__(self, config: TrainConfig, model: FastVLM | None = None) -> None:
        config.validate()
        self.config = config
        self.out = Path(config.output_dir)
        self.runtime = D.start(config.device)
        rt = self.runtime
        self.model = load_model(config, rt, model)
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError(
                    "tensorboard logging needs the tensorboard package: pip install tensorboard"
                ) from None
        # data
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
        self.dataset = SupervisedDataset(
            self.records, self.model.tokenizer, self.model.image_processor,
            num_image_tokens=text.num_image_tokens(), max_length=max_length,
        )  # fmt: skip
        self.plan = BatchPlan(
            len(self.records), config.global_batch_size, config.micro_batch_size, rt.world_size, rt.rank,
            config.seed, config.epochs, config.max_steps,
        )  # fmt: skip
        pad = self.model.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0
        # resume: weights go into the plain model, before it is wrapped
        self.start_step = 0
        self.resume_from = self._find_resume()
        if rt.is_main:
            self._prepare_output_dir()
        if self.resume_from is not None:
            self._load_weights(self.resume_from)
        set_train_mode(self.model, config)
        fsdp = rt.distributed and config.strategy == "fsdp"
        if rt.distributed and rt.is_main and _uses_batch_statistics(self.model):
            self._warn(
                "the tower's batch norms use batch statistics (--tower-batchnorm train/auto on a training-form tower): "
                "each process normalises over its own micro-batch, so results depend on the process count"
            )
        self.wrapped = D.wrap(
            LossModule(self.model, pad_token_id=self.pad_token_id, use_every_module=fsdp),
            rt,
            config.strategy,
            shard_units=[*self.model.language_model.model.layers, *self.model.vision_tower.stages],
            find_unused=self.records.num_text_only > 0,
        )  # fmt: skip
        self.optimizer = build_optimizer(self.model, config, self.wrapped.named_parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.plan.total_steps, config.warmup_ratio, config.min_lr_ratio)
        )
        if self.resume_from is not None:
            self._load_training_state(self.resume_from)
        else:
            torch.manual_seed(config.seed + rt.rank)
            random.seed(config.seed + rt.rank)
            np.random.seed((config.seed + rt.rank) % 2**32)
        self.autocast_bf16 = config.precision == "bf16" or (
            config.precision == "auto" and rt.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.tensorboard = SummaryWriter(str(self.out / "tensorboard")) if config.tensorboard and rt.is_main else None

    # ---------------------------------------------------------------- resume
    def _prepare_output_dir(self) -> None:
        """Clear what a killed save left; refuse to mix a new run into an old one's folder."""
        for leftover in _hidden_leftovers(self.out):
            shutil.rmtree(leftover, ignore_errors=True)
        ours = [*list_checkpoints(self.out), self.out / "model", self.out / "log.jsonl", self.out / "tensorboard"]
        existing = [p for p in ours if p.exists()]
        if not existing or self.resume_from is not None:
            return
        if not self.config.extra.get("overwrite"):
            raise FileExistsError(
                f"{self.out} already holds a run ({', '.join(p.name for p in existing[:3])}); "
                "pass --resume to continue it or --overwrite to start over"
            )
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _find_resume(self) -> Path | None:
        resume = self.config.extra.get("resume")
        if not resume:
            return None
        if resume is True or resume == "latest":
            found = list_checkpoints(self.out)
            if not found:
                raise FileNotFoundError(f"--resume: no complete checkpoint in {self.out}")
            return found[-1]
        path = Path(resume)
        if not (path / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"--resume: {path} is not a complete training checkpoint (no trainer_state.pt)")
        return path

    def _load_weights(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(checkpoint / "model.safetensors"))
        if self.config.lora_rank:  # the LLM's saved weights are merged; its base stays as loaded, adapters come back
            state = {k: v for k, v in state.items() if not k.startswith("language_model.")}
            state.update(load_file(str(checkpoint / "adapter.safetensors")))
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(state))
        if missing:
            raise ValueError(f"{checkpoint} lacks trainable tensors: {', '.join(missing[:5])}")
        self.model.load_state_dict(state, strict=False)

    def _load_training_state(self, checkpoint: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
        saved, now = state["plan"], self._plan_signature()
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if changed:
            details = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"cannot resume from {checkpoint}: the run's data order would change ({details})")
        set_optimizer_state_dict(
            self.wrapped, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_step = state["step"]
        rng_file = checkpoint / f"rng-{self.runtime.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            self._warn(f"{checkpoint} has no random state for process {self.runtime.rank} (was the process count "
                       f"{state['world_size']}?): dropout masks will differ from an uninterrupted run")  # fmt: skip

    def _plan_signature(self) -> dict:
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
        from fastvlm.checkpoints import model_keys_to_ours, read_checkpoint_tensors, read_config

        folder = self.model.source_path
        tensors = read_checkpoint_tensors(folder)
        names = model_keys_to_ours(tensors, read_config(folder)[1])
        return {names[k]: v for k, v in tensors.items()}

    def _export_state(self, model_state: dict) -> tuple[dict, dict]:
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
        from safetensors.torch import save_file

        rt = self.runtime
        name = f"{CHECKPOINT_PREFIX}{step:07d}"
        final, staging = self.out / name, self.out / f".{name}.partial"
        model_state, optim_state = _full_state_dicts(self.wrapped, self.optimizer)
        if rt.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        D.barrier(rt)
        torch.save(_rng_state(), staging / f"rng-{rt.rank}.pt")
        D.barrier(rt)
        if rt.is_main:
            weights, adapters = self._export_state(model_state)
            self.model.save_pretrained(staging, overwrite=True, state_dict=weights)
            if adapters:
                save_file(adapters, str(staging / "adapter.safetensors"))
            torch.save(
                {
                    "step": step,
                    "optimizer": optim_state,
                    "scheduler": self.scheduler.state_dict(),
                    "plan": self._plan_signature(),
                    "config": self.config.to_dict(),
                    "world_size": rt.world_size,
                },
                staging / "trainer_state.pt",
            )
            _fsync_folder(staging)
            if final.exists():  # re-saving a step (a finished run resumed): move the old one aside first
                _delete_atomically(final)
            os.rename(staging, final)
            _fsync_folder(self.out)
            for old in list_checkpoints(self.out)[: -self.config.keep_checkpoints]:
                _delete_atomically(old)
            if final_model:
                self.model.save_pretrained(self.out / "model", overwrite=True, state_dict=weights)
        D.barrier(rt)
        return final

    # ---------------------------------------------------------------- the loop
    def _loader(self):
        from torch.utils.data import DataLoader

        return DataLoader(
            self.dataset,
            batch_sampler=PlanSampler(self.plan, self.start_step),
            collate_fn=partial(collate, pad_token_id=self.pad_token_id),
            num_workers=self.config.num_workers,
            persistent_workers=False,
            # its own generator: creating the iterator must not draw from the global RNG (dropout, resume)
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def _step(self, micro_batches: list[Batch]) -> dict:
        """One optimiser step over this process's micro-batches; the figures returned are over all processes."""
        rt, cfg = self.runtime, self.config
        image_tokens = self.model.config.num_image_tokens()
        local_targets = sum(b.num_label_tokens for b in micro_batches)
        local_errors = [e for b in micro_batches for e in b.errors]
        local_seen = sum(
            int(b.attention_mask.sum()) + (0 if b.pixel_values is None else len(b.pixel_values) * (image_tokens - 1))
            for b in micro_batches
        )
        global_targets, n_errors = D.all_reduce_sum([local_targets, len(local_errors)], rt)
        errors = D.gather_objects(local_errors, rt) if n_errors else []
        if errors and cfg.strict_data:
            raise ValueError(f"unusable record (--strict-data): {errors[0]}")
        scale = rt.world_size / max(global_targets, 1.0)  # DDP/FSDP average gradients over processes
        loss_sum = torch.zeros((), device=rt.device)
        for i, batch in enumerate(micro_batches):
            with D.gradient_sync(self.wrapped, enabled=i == len(micro_batches) - 1):
                with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
                    loss, _ = self.wrapped(
                        batch.input_ids.to(rt.device), batch.attention_mask.to(rt.device),
                        batch.labels.to(rt.device),
                        None if batch.pixel_values is None else batch.pixel_values.to(rt.device),
                    )  # fmt: skip
                (loss * scale).backward()
            loss_sum += loss.detach().float()
        grad_norm = None
        if cfg.grad_clip:
            params = [p for p in self.wrapped.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if global_targets > 0:  # a step whose records all failed must not move the weights (decay, momentum)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, seen = D.all_reduce_sum([float(loss_sum), float(local_seen)], rt)
        return {
            "loss": total_loss / max(global_targets, 1.0), "target_tokens": int(global_targets), "tokens": seen,
            "samples": cfg.global_batch_size - int(n_errors), "grad_norm": grad_norm, "errors": errors,
        }  # fmt: skip

    def run(self, *, stop_after: int | None = None) -> TrainResult:
        """Train to the end (or, for tests of resuming, return right after step ``stop_after``)."""
        from tqdm.auto import tqdm

        rt, cfg, plan = self.runtime, self.config, self.plan
        result = TrainResult(self.out, None, self.start_step, skipped=list(self.records.report.skipped))
        log = self._open_log()
        bar = tqdm(
            total=plan.total_steps, initial=self.start_step, desc=f"stage {cfg.stage}", unit="step",
            disable=not (cfg.progress and rt.is_main), dynamic_ncols=True,
        )  # fmt: skip
        loader = iter(self._loader())
        started = time.perf_counter()
        for step in range(self.start_step, plan.total_steps):
            t0 = time.perf_counter()
            micro_batches = [next(loader) for _ in range(plan.accumulation)]
            lrs = {
                g["name"].removesuffix("_no_decay"): lr
                for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True)
            }  # this step's rates; fmt: skip
            stats = self._step(micro_batches)
            done = step + 1
            for error in stats["errors"]:
                result.skipped.append(error)
                if rt.is_main:
                    self._warn(f"step {done}: skipped a record: {error}")
                    log.write(json.dumps({"event": "skipped_record", "step": done, "reason": error}) + "\n")
            loss = stats["loss"]
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {done}: the loss is {loss}; lower the learning rate or check the data")
            dt = time.perf_counter() - t0
            result.losses[done], result.steps = loss, done
            entry = {
                "step": done, "loss": loss, "lr": lrs.get("rest", next(iter(lrs.values()))),
                **({"tower_lr": lrs["tower"]} if "tower" in lrs else {}), "grad_norm": stats["grad_norm"],
                "target_tokens": stats["target_tokens"], "tokens_per_s": stats["tokens"] / dt,
                "samples_per_s": stats["samples"] / dt, "elapsed_s": time.perf_counter() - started,
            }  # fmt: skip
            if rt.is_main and (done % cfg.log_every == 0 or done == plan.total_steps):
                log.write(json.dumps(entry) + "\n")
                log.flush()
                if self.tensorboard is not None:
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        if entry[key] is not None:
                            self.tensorboard.add_scalar(f"train/{key}", entry[key], done)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{entry['lr']:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}",
                            refresh=False)  # fmt: skip
            bar.update(1)
            if cfg.save_every and done % cfg.save_every == 0 and done != plan.total_steps:
                self.save_checkpoint(done)
            if stop_after is not None and done >= stop_after:
                bar.close()
                log.close()
                return result
        bar.close()
        log.close()
        self.save_checkpoint(plan.total_steps, final_model=True)
        result.final_model = self.out / "model"
        return result

    def _open_log(self):
        if not self.runtime.is_main:
            return open(os.devnull, "w")  # noqa: SIM115 - closed by run()
        self.out.mkdir(parents=True, exist_ok=True)
        log = (self.out / "log.jsonl").open("a")
        log.write(json.dumps({
            "event": "start", "step": self.start_step, "total_steps": self.plan.total_steps,
            "world_size": self.runtime.world_size, "accumulation": self.plan.accumulation,
            "records": len(self.records), "skipped_records": len(self.records.report.skipped),
            "resumed_from": str(self.resume_from) if self.resume_from else None, "config": self.config.to_dict(),
        }) + "\n")  # fmt: skip
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


def _delete_atomically(folder: Path) -> None:
    """Rename out of the checkpoint namespace first, so a kill mid-delete never leaves a 'complete' husk."""
    aside = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(folder, aside)
    shutil.rmtree(aside)


def _hidden_leftovers(out: Path) -> list[Path]:
    """Staging and half-deleted folders of checkpoint saves (ours and save_pretrained's)."""
    patterns = (f".{CHECKPOINT_PREFIX}*", f"..{CHECKPOINT_PREFIX}*", ".model.staging.*")
    return [p for pattern in patterns for p in out.glob(pattern) if p.is_dir()]


def _uses_batch_statistics(model: FastVLM) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.vision_tower.modules())


def _fsync_folder(folder: Path) -> None:
    for item in folder.iterdir():
        if item.is_file():
            with item.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def train(
    config: TrainConfig, *, resume: bool | str = False, overwrite: bool = False, stop_after: int | None = None
) -> TrainResult:
    """Run a training job described by ``config``; see the module docstring.

    ``resume`` continues the latest (``True``) or a named checkpoint; ``overwrite`` lets a
    new run replace an old one in the same output folder.
    """
    config.extra.update(resume=resume, overwrite=overwrite)
    trainer = Trainer(config)
    try:
        return trainer.run(stop_after=stop_after)
    finally:
        trainer.close()
