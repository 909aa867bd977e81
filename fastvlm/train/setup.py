"""Setting a model up for training: what trains, how, and what DDP/FSDP wrap.

``load_model`` turns a checkpoint into fp32 master weights with the trainable parts (and
LoRA adapters) chosen; ``set_train_mode`` decides how the tower's batch norms behave;
``build_optimizer`` and ``warmup_cosine`` are the paper's AdamW with warm-up and cosine
decay; :class:`LossModule` is the forward that the distributed wrappers see. The loop
that uses them is :mod:`fastvlm.train.trainer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fastvlm.errors import CheckpointError, ConfigError
from fastvlm.model import FastVLM
from fastvlm.processing import IGNORE_INDEX, ImageProcessor
from fastvlm.train import distributed as D
from fastvlm.train.adapters import add_lora
from fastvlm.train.config import TrainConfig


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

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor,  # (B, L)
        labels: torch.Tensor,  # (B, L), IGNORE_INDEX where there is nothing to learn
        pixel_values: torch.Tensor | None,  # (N images, 3, S, S)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.shape[0] == 0:  # every record of this micro-batch failed: a row with no targets
            input_ids = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=input_ids.device)
            attention_mask, labels = torch.ones_like(input_ids), torch.full_like(input_ids, IGNORE_INDEX)
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
        raise CheckpointError(f"{config.model} has no tokenizer; training needs one")
    if config.image_size is not None:
        stride = model.config.vision.stride
        if config.image_size % stride:
            raise ConfigError(f"image_size must be a multiple of the tower's stride {stride}; got {config.image_size}")
        model.config.image_size = config.image_size
        model.image_processor = ImageProcessor(config.image_size, model.config.image_mode)
    for param in model.parameters():
        param.requires_grad = False
    if config.lora_rank:
        add_lora(
            model.language_model,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            targets=config.lora_targets,
            qlora=config.qlora,
        )
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


def build_optimizer(
    model: FastVLM, config: TrainConfig, named_params: Iterable[tuple[str, nn.Parameter]]
) -> torch.optim.AdamW:
    """AdamW; the tower may have its own learning rate; no weight decay on biases and norms."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        is_tower = ".vision_tower." in f".{name}"
        decay = param.ndim >= 2
        groups.setdefault((is_tower, decay), []).append(param)
    if not groups:
        raise ConfigError("nothing to train: the selected parts have no trainable parameters")
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


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate factor of a step: linear warm-up over ceil(ratio * steps), then cosine decay."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def uses_batch_statistics(model: FastVLM) -> bool:
    """Whether the tower's batch norms normalise over the batch (train mode) rather than running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.vision_tower.modules())
