"""The parser: every command registered once by its group, shared flag sets with one definition."""

from __future__ import annotations

import argparse

from fastvlm.cli import build_parser
from fastvlm.cli.common import CHECKPOINT_FORMATS, LLM_SIZES

COMMANDS = {
    *["predict", "chat", "convert", "info", "convert-tower", "init"],  # cli/model.py
    *["data", "train", "eval", "eval-rescore"],  # cli/data.py, cli/train.py, cli/eval.py
    "serve",  # cli/serve.py
    *["bench", "bench-ttft", "bench-train", "bench-eval", "bench-encoder", "bench-gpu", "bench-limits"],  # cli/bench.py
    "bench-serve",  # cli/bench_serve.py
    "bench-vs-transformers",  # cli/bench_compare.py
    "export",  # cli/export.py (onnx), cli/export_coreml.py (coreml)
    "tune-precision",  # cli/precision.py
}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_command_is_registered():
    commands = _subcommands(build_parser())
    assert set(commands) == COMMANDS
    assert set(_subcommands(commands["data"])) == {"synth", "check", "score"}
    assert set(_subcommands(commands["export"])) == {"onnx", "coreml"}


def test_llm_size_choices_are_the_released_presets():
    from fastvlm.presets import QWEN2_PRESETS

    assert list(LLM_SIZES) == sorted(QWEN2_PRESETS)
    commands = _subcommands(build_parser())
    for name in ("init", "bench-ttft", "bench-train", "bench-eval"):
        llm = _option(commands[name], "--llm")
        assert list(llm.choices) == list(LLM_SIZES) and llm.default == "0.5b", name


def test_format_choices_are_the_checkpoint_formats():
    from fastvlm.formats import CheckpointFormat

    assert set(CHECKPOINT_FORMATS) == {f.value for f in CheckpointFormat}
    assert list(_option(_subcommands(build_parser())["convert"], "--format").choices) == list(CHECKPOINT_FORMATS)


def test_debug_is_a_global_flag():
    args = build_parser().parse_args(["--debug", "info", "x.safetensors"])
    assert args.debug and args.command == "info"
    assert not build_parser().parse_args(["info", "x.safetensors"]).debug
