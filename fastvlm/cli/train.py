"""``fastvlm train``: one flag per training setting, derived from :class:`TrainConfig`'s fields.

Flags, their types, ``nargs`` and choices all come from :func:`fastvlm.train.config.settings`,
so a new setting needs only a new field. Every flag defaults to ``None`` ("not given"):
unset flags keep the stage preset's or the config file's value.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fastvlm.train.config import Setting, settings

HELP = "train or fine-tune (stage presets 1/1.5/2/3; run under torchrun for DDP/FSDP)"
DESCRIPTION = (
    "Train a FastVLM. Values come from the --stage preset, then --config, then flags. "
    "The same command runs under `torchrun --nproc-per-node N fastvlm train ...`."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command to a ``fastvlm`` parser's subcommands."""
    p = subparsers.add_parser("train", help=HELP, description=DESCRIPTION)
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """--config, --resume, --overwrite, then one flag per :class:`TrainConfig` field."""
    p.add_argument("--config", help="a .json or .toml file of settings (flags override it)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=False,
        help="continue from the latest checkpoint in --output-dir, or from the given checkpoint folder",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    for spec in settings():
        p.add_argument(spec.flag, default=None, help=spec.help.replace("%", "%%"), **_flag_options(spec))


def _flag_options(spec: Setting) -> dict[str, Any]:
    """How argparse reads one setting: a choice, an on/off switch, several words, or one typed value."""
    if spec.choices is not None:
        return {"choices": list(spec.choices)}
    if spec.kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    options: dict[str, Any] = {"nargs": "+"} if spec.sequence else {}
    if spec.kind is not str:
        options["type"] = spec.kind
    return options


def cmd_train(args: argparse.Namespace) -> None:
    from fastvlm.train.config import make_config
    from fastvlm.train.trainer import train

    overrides = {spec.name: getattr(args, spec.name) for spec in settings() if spec.name != "stage"}
    config = make_config(stage=args.stage, file=args.config, **overrides)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if result.final_model is not None and int(os.environ.get("RANK", "0")) == 0:
        last = result.losses.get(result.steps)
        loss = f", final loss {last:.4f}" if last is not None else ""
        print(f"trained {result.steps} steps{loss}; model written to {result.final_model}")
        if result.skipped:
            print(f"{len(result.skipped)} record(s) were skipped; see {Path(config.output_dir) / 'log.jsonl'}")
