"""Training settings: the paper's stage presets, overridable from a config file and flags.

The precedence is preset < config file < flags, so ``--stage 2 --lr 1e-4`` is stage 2
with one value changed. Every field below can be set in a JSON or TOML file with the
same name (``lr = 1e-4``) or as a flag (``--lr 1e-4``).

Each setting is described once, as a field of :class:`TrainConfig`: its type is the
annotation, its help text, allowed values and whether it must be given are the field's
metadata (see :func:`setting`). :func:`settings` reads them back as :class:`Setting`
records, from which the command line (:mod:`fastvlm.cli.train`), the config-file checks
and :meth:`TrainConfig.validate` are derived; no other list of names exists.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fastvlm.errors import ConfigError

PARTS = ("tower", "projector", "llm")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "fp32", "bf16")
BATCHNORM_MODES = ("auto", "frozen", "train")
STRATEGIES = ("ddp", "fsdp")
DEFAULT_STAGE = "2"

# The paper's recipe (PAPER.md, "Training recipe"): stage 1 aligns the projector on a frozen
# tower and LLM; stages 1.5, 2 and 3 train the full model. AdamW, cosine with 3% warm-up,
# one epoch everywhere.
STAGES: dict[str, dict[str, Any]] = {
    "1": {"train": ("projector",), "lr": 1e-3, "global_batch_size": 256},
    "1.5": {"train": PARTS, "lr": 2e-5, "global_batch_size": 128},
    "2": {"train": PARTS, "lr": 2e-5, "global_batch_size": 128},
    "3": {"train": PARTS, "lr": 2e-5, "global_batch_size": 128},
}


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A ``--config`` file that does not exist."""


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None, required: bool = False) -> Any:
    """A :class:`TrainConfig` field with its help text, allowed values and whether it must be set."""
    return field(default=default, metadata={"help": help, "choices": choices, "required": required})


@dataclass
class TrainConfig:
    # what to train, on what, and where to write it
    model: str = setting(
        "", "checkpoint folder or hub id to start from (`fastvlm init` makes a random one)", required=True
    )
    data: str = setting("", "LLaVA-format .json or .jsonl file", required=True)
    image_root: str | None = setting(
        None, "folder the records' image paths are relative to (default: the data file's folder)"
    )
    output_dir: str = setting("", "where checkpoints, model/, log.jsonl and tensorboard/ go", required=True)
    stage: str = setting(
        DEFAULT_STAGE,
        "recipe preset: 1 (projector, lr 1e-3, batch 256) or 1.5/2/3 (full model, lr 2e-5, batch 128)",
        choices=tuple(STAGES),
    )
    train: tuple[str, ...] = setting(PARTS, "trainable parts: tower projector llm")
    # optimisation
    lr: float = setting(2e-5, "peak learning rate")
    tower_lr: float | None = setting(None, "peak learning rate of the vision tower (default: --lr)")
    weight_decay: float = setting(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    warmup_ratio: float = setting(0.03, "share of the steps with a linear warm-up")
    min_lr_ratio: float = setting(0.0, "the cosine decays to lr x this")
    epochs: float = setting(1.0, "passes over the data (fractions allowed)")
    max_steps: int | None = setting(None, "optimiser steps (overrides --epochs)")
    global_batch_size: int = setting(128, "samples per optimiser step over all processes")
    micro_batch_size: int = setting(4, "samples per forward pass in each process (accumulation makes up the rest)")
    grad_clip: float | None = setting(1.0, "clip the global gradient norm to this (0: no clipping)")
    max_length: int | None = setting(
        None, "longest token sequence, visual tokens included (default: the model's context)"
    )
    image_size: int | None = setting(
        None, "training resolution (default: the checkpoint's); a multiple of the tower's stride"
    )
    # numerics and memory
    precision: str = setting(
        "auto",
        "fp32, or bf16 autocast over fp32 master weights; auto = bf16 on GPUs that support it",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward (less memory, about 30% more compute)"
    )
    tower_batchnorm: str = setting(
        "auto",
        "frozen: the tower's batch norms use running statistics (a sample's gradient does not depend on its "
        "batch); train: batch statistics (needed from scratch); auto: train for a training-form tower",
        choices=BATCHNORM_MODES,
    )
    # adapters
    lora_rank: int = setting(0, "LoRA adapters of this rank on the LLM (0: off); the LLM base is frozen")
    lora_alpha: int = setting(16, "LoRA alpha (scale alpha/rank)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA path")
    lora_targets: tuple[str, ...] = setting(LORA_TARGETS, "LLM linear layers that get adapters")
    qlora: bool = setting(False, "4-bit NF4 LLM base under the adapters (bitsandbytes, CUDA)")
    # distribution
    strategy: str = setting("ddp", "ddp or fsdp, when several processes run under torchrun", choices=STRATEGIES)
    device: str = setting("auto", "auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu, cuda")
    # bookkeeping
    seed: int = setting(0, "seed of the data order and of initialisation")
    num_workers: int = setting(0, "data-loading processes per training process")
    strict_data: bool = setting(False, "stop at the first unusable record instead of skipping and reporting it")
    save_every: int = setting(0, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = setting(2, "how many step checkpoints to keep")
    log_every: int = setting(1, "steps between log.jsonl lines")
    tensorboard: bool = setting(False, "also write TensorBoard scalars (needs the tensorboard package)")
    progress: bool = setting(True, "show a progress bar")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad setting."""
        for spec in settings():
            value = getattr(self, spec.name)
            if spec.required and not value:
                raise ConfigError(f"'{spec.name}' must be set")
            if spec.name == "stage":
                check_stage(value)
            elif spec.choices is not None and value not in spec.choices:
                raise ConfigError(f"{spec.name} must be {_one_of(spec.choices)}; got {value!r}")
        bad = [p for p in self.train if p not in PARTS]
        if bad or not self.train:
            raise ConfigError(f"'train' must name some of {', '.join(PARTS)}; got {list(self.train)}")
        self._validate_optimisation()
        self._validate_adapters()
        if (
            self.num_workers < 0
            or not 0 <= self.lora_dropout < 1
            or (self.max_length is not None and self.max_length < 2)
        ):
            raise ConfigError("num_workers must be >= 0, lora_dropout in [0, 1) and max_length >= 2")
        if self.save_every < 0 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ConfigError("save_every must be >= 0, keep_checkpoints and log_every >= 1")

    def _validate_optimisation(self) -> None:
        if self.lr <= 0 or (self.tower_lr is not None and self.tower_lr <= 0):
            raise ConfigError("learning rates must be positive")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("batch sizes must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be at least 1")
        if self.epochs <= 0:
            raise ConfigError("epochs must be positive")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0: no clipping); got {self.grad_clip}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1); got {list(self.adam_betas)}")

    def _validate_adapters(self) -> None:
        if self.qlora and self.lora_rank <= 0:
            raise ConfigError("qlora needs LoRA adapters: set lora_rank > 0")
        if self.lora_rank > 0 and "llm" not in self.train:
            raise ConfigError("LoRA adapters train the LLM: add 'llm' to 'train'")
        bad_targets = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if self.lora_rank and bad_targets:
            raise ConfigError(
                f"LoRA targets must be the LLM's linear layers ({', '.join(LORA_TARGETS)}); got {bad_targets}"
            )
        if self.qlora and self.strategy == "fsdp":
            raise ConfigError("QLoRA's 4-bit weights cannot be sharded by FSDP: use --strategy ddp")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ the settings' descriptions


@dataclass(frozen=True)
class Setting:
    """One field of :class:`TrainConfig` as the command line and config files see it."""

    name: str
    help: str
    kind: type  # str, int, float or bool: the type of the value, or of each item of a sequence
    optional: bool  # None is allowed (it means "the default behaviour" described in the help)
    sequence: bool  # a tuple of ``kind`` (a list in config files, several words after a flag)
    choices: tuple[str, ...] | None
    required: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@functools.cache
def settings() -> tuple[Setting, ...]:
    """Every :class:`TrainConfig` field, its type taken from the annotation and the rest from its metadata."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in fields(TrainConfig):
        kind, optional, sequence = _parse_annotation(hints[f.name])
        meta = f.metadata
        out.append(Setting(f.name, meta["help"], kind, optional, sequence, meta["choices"], meta["required"]))
    return tuple(out)


def _parse_annotation(annotation: Any) -> tuple[type, bool, bool]:
    """(item type, None allowed, is a tuple) of ``X``, ``X | None``, ``tuple[X, ...]`` or ``tuple[X, X]``."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, (annotation,) = True, args
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def _one_of(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


def _checked(spec: Setting, value: Any) -> Any:
    """``value`` as the type of ``spec``, or a ConfigError naming both (config files are untyped)."""
    if value is None and spec.optional:
        return None
    if spec.sequence:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"setting {spec.name!r} must be a list, got {value!r}")
        return tuple(value)
    expected = spec.kind
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"setting {spec.name!r} must be {expected.__name__}, got {value!r}")
    return value


# ------------------------------------------------------------------------------ building a config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .json or .toml file, checked against the known field names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileNotFoundError(f"config file not found: {path}")
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
    except ValueError as err:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ConfigError(f"{path}: cannot parse ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a table/object of settings")
    unknown = sorted(set(values) - {spec.name for spec in settings()})
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


def make_config(*, stage: str | None = None, file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Preset of ``stage`` (from the file or argument), then the file's values, then ``overrides``.

    ``None`` overrides are ignored, so unset flags keep the preset or file value.
    """
    from_file = read_config_file(file) if file else {}
    stage = str(stage if stage is not None else from_file.get("stage", DEFAULT_STAGE))
    check_stage(stage)
    values = {**STAGES[stage], **from_file, **{k: v for k, v in overrides.items() if v is not None}, "stage": stage}
    specs = {spec.name: spec for spec in settings()}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise TypeError(f"make_config() got unknown setting(s) {', '.join(unknown)}")
    config = TrainConfig(**{name: _checked(specs[name], value) for name, value in values.items()})
    config.validate()
    return config
