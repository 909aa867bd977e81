"""Training settings: the paper's stage presets, overridable from a config file and flags.

The precedence is preset < config file < flags, so ``--stage 2 --lr 1e-4`` is stage 2
with one value changed. Every field below can be set in a JSON or TOML file with the
same name (``lr = 1e-4``) or as a flag (``--lr 1e-4``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PARTS = ("tower", "projector", "llm")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The paper's recipe (PAPER.md, "Training recipe"): stage 1 aligns the projector on a frozen
# tower and LLM; stages 1.5, 2 and 3 train the full model. AdamW, cosine with 3% warm-up,
# one epoch everywhere.
STAGES: dict[str, dict] = {
    "1": {"train": ("projector",), "lr": 1e-3, "global_batch_size": 256},
    "1.5": {"train": PARTS, "lr": 2e-5, "global_batch_size": 128},
    "2": {"train": PARTS, "lr": 2e-5, "global_batch_size": 128},
    "3": {"train": PARTS, "lr": 2e-5, "global_batch_size": 128},
}


@dataclass
class TrainConfig:
    # what to train, on what, and where to write it
    model: str = ""  # checkpoint folder or hub id (see `fastvlm init` for a from-scratch start)
    data: str = ""  # LLaVA-format .json / .jsonl
    image_root: str | None = None  # image paths are relative to this (default: the data file's folder)
    output_dir: str = ""
    stage: str = "2"
    train: tuple[str, ...] = PARTS  # trainable parts
    # optimisation
    lr: float = 2e-5
    tower_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    global_batch_size: int = 128  # samples per optimiser step, over all processes
    micro_batch_size: int = 4  # samples per forward pass in each process
    grad_clip: float | None = 1.0  # None or 0: no clipping
    max_length: int | None = None  # None: the model's context length
    image_size: int | None = None  # None: the checkpoint's resolution
    # numerics and memory
    precision: str = "auto"  # fp32 | bf16 (autocast) | auto (bf16 on GPUs that support it)
    gradient_checkpointing: bool = False
    tower_batchnorm: str = "auto"  # frozen: running statistics; train: batch statistics; auto: see set_train_mode
    # adapters
    lora_rank: int = 0  # > 0: LoRA adapters on the LLM's linear layers (through peft); the LLM base is frozen
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    qlora: bool = False  # 4-bit NF4 LLM base under the LoRA adapters (bitsandbytes)
    # distribution
    strategy: str = "ddp"  # ddp | fsdp, when run under torchrun with several processes
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    # bookkeeping
    seed: int = 0
    num_workers: int = 0  # data-loading processes per training process
    strict_data: bool = False  # reject the run on the first bad record instead of skipping it
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # older step checkpoints are deleted (the final model is always kept)
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = True
    # set by the code, not the user
    extra: dict = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad setting."""
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"'{name}' must be set")
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {', '.join(STAGES)}")
        bad = [p for p in self.train if p not in PARTS]
        if bad or not self.train:
            raise ValueError(f"'train' must name some of {', '.join(PARTS)}; got {list(self.train)}")
        if self.lr <= 0 or (self.tower_lr is not None and self.tower_lr <= 0):
            raise ValueError("learning rates must be positive")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("batch sizes must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.epochs <= 0:
            raise ValueError("epochs must be positive")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16; got {self.precision!r}")
        if self.tower_batchnorm not in ("auto", "frozen", "train"):
            raise ValueError(f"tower_batchnorm must be auto, frozen or train; got {self.tower_batchnorm!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be ddp or fsdp; got {self.strategy!r}")
        if self.qlora and self.lora_rank <= 0:
            raise ValueError("qlora needs LoRA adapters: set lora_rank > 0")
        if self.lora_rank > 0 and "llm" not in self.train:
            raise ValueError("LoRA adapters train the LLM: add 'llm' to 'train'")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping); got {self.grad_clip}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1); got {list(self.adam_betas)}")
        if (
            self.num_workers < 0
            or not 0 <= self.lora_dropout < 1
            or (self.max_length is not None and self.max_length < 2)
        ):
            raise ValueError("num_workers must be >= 0, lora_dropout in [0, 1) and max_length >= 2")
        bad_targets = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if self.lora_rank and bad_targets:
            raise ValueError(
                f"LoRA targets must be the LLM's linear layers ({', '.join(LORA_TARGETS)}); got {bad_targets}"
            )
        if self.qlora and self.strategy == "fsdp":
            raise ValueError("QLoRA's 4-bit weights cannot be sharded by FSDP: use --strategy ddp")
        if self.save_every < 0 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("save_every must be >= 0, keep_checkpoints and log_every >= 1")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("extra")
        return out


HELP = {
    "model": "checkpoint folder or hub id to start from (`fastvlm init` makes a random one)",
    "data": "LLaVA-format .json or .jsonl file",
    "image_root": "folder the records' image paths are relative to (default: the data file's folder)",
    "output_dir": "where checkpoints, model/, log.jsonl and tensorboard/ go",
    "stage": "recipe preset: 1 (projector, lr 1e-3, batch 256) or 1.5/2/3 (full model, lr 2e-5, batch 128)",
    "train": "trainable parts: tower projector llm",
    "lr": "peak learning rate",
    "tower_lr": "peak learning rate of the vision tower (default: --lr)",
    "weight_decay": "AdamW weight decay (not applied to biases and norms)",
    "adam_betas": "AdamW betas",
    "adam_eps": "AdamW epsilon",
    "warmup_ratio": "share of the steps with a linear warm-up",
    "min_lr_ratio": "the cosine decays to lr x this",
    "epochs": "passes over the data (fractions allowed)",
    "max_steps": "optimiser steps (overrides --epochs)",
    "global_batch_size": "samples per optimiser step over all processes",
    "micro_batch_size": "samples per forward pass in each process (accumulation makes up the rest)",
    "grad_clip": "clip the global gradient norm to this (0: no clipping)",
    "max_length": "longest token sequence, visual tokens included (default: the model's context)",
    "image_size": "training resolution (default: the checkpoint's); a multiple of the tower's stride",
    "precision": "fp32, or bf16 autocast over fp32 master weights; auto = bf16 on GPUs that support it",
    "gradient_checkpointing": "recompute activations in backward (less memory, about 30%% more compute)",
    "tower_batchnorm": "frozen: the tower's batch norms use running statistics (a sample's gradient does not "
    "depend on its batch); train: batch statistics (needed from scratch); auto: train for a training-form tower",
    "lora_rank": "LoRA adapters of this rank on the LLM (0: off); the LLM base is frozen",
    "lora_alpha": "LoRA alpha (scale alpha/rank)",
    "lora_dropout": "dropout on the LoRA path",
    "lora_targets": "LLM linear layers that get adapters",
    "qlora": "4-bit NF4 LLM base under the adapters (bitsandbytes, CUDA)",
    "strategy": "ddp or fsdp, when several processes run under torchrun",
    "device": "auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu, cuda",
    "seed": "seed of the data order and of initialisation",
    "num_workers": "data-loading processes per training process",
    "strict_data": "stop at the first unusable record instead of skipping and reporting it",
    "save_every": "steps between checkpoints (0: only at the end)",
    "keep_checkpoints": "how many step checkpoints to keep",
    "log_every": "steps between log.jsonl lines",
    "tensorboard": "also write TensorBoard scalars (needs the tensorboard package)",
    "progress": "show a progress bar",
}


def read_config_file(path: str | Path) -> dict:
    """Settings from a .json or .toml file, checked against the known field names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except (ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot parse ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a table/object of settings")
    known = {f.name for f in fields(TrainConfig)} - {"extra"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


_OPTIONAL_FLOATS = {"tower_lr", "grad_clip"}
_OPTIONAL_INTS = {"max_steps", "max_length", "image_size"}


def _checked(name: str, value):
    """``value`` as the type of field ``name``, or a ValueError naming both (config files are untyped)."""
    default = TrainConfig.__dataclass_fields__[name].default
    if value is None and default is None:
        return None
    if isinstance(default, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"setting {name!r} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        expected = bool
    elif isinstance(default, float) or name in _OPTIONAL_FLOATS:
        expected = float
    elif isinstance(default, int) or name in _OPTIONAL_INTS:
        expected = int
    else:
        expected = str
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"setting {name!r} must be {expected.__name__}, got {value!r}")
    return value


def make_config(*, stage: str | None = None, file: str | Path | None = None, **overrides) -> TrainConfig:
    """Preset of ``stage`` (from the file or argument), then the file's values, then ``overrides``.

    ``None`` overrides are ignored, so unset flags keep the preset or file value.
    """
    from_file = read_config_file(file) if file else {}
    stage = str(stage if stage is not None else from_file.get("stage", "2"))
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    values = {**STAGES[stage], **from_file, **{k: v for k, v in overrides.items() if v is not None}, "stage": stage}
    config = TrainConfig(**{name: _checked(name, value) for name, value in values.items()})
    config.validate()
    return config
