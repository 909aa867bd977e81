"""``fastvlm data``: write a synthetic training set, check a data file, score a model on one.

The three commands share the LLaVA data format of :mod:`fastvlm.train.data`; they are
sub-commands of one ``data`` command because they act on data, not on a model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastvlm.cli.common import Subparsers, add_model_arguments, load_model
from fastvlm.errors import UsageError


def register(subparsers: Subparsers) -> None:
    data = subparsers.add_parser("data", help="training data: synthetic sets, checks").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("synth", help="write a synthetic image-question-answer set in LLaVA's format")
    p.add_argument("--out", required=True, help="folder for images/, train.jsonl and test.jsonl")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--size", type=int, default=512, help="canvas side in px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.1, help="share held out in test.jsonl")
    p.add_argument(
        "--binding",
        action="store_true",
        help="ask about one shape among several (harder: needs a larger model or a longer run)",
    )
    p.add_argument(
        "--kind-weights",
        nargs="+",
        metavar="KIND=W",
        help="share of each question kind, e.g. color=1 shape=2 count=1 word=1 (default: equal; kinds left out get 0)",
    )
    p.add_argument(
        "--all-questions",
        action="store_true",
        help="ask each training image every question its scene answers (one shape: its colour and its kind), "
        "as turns of one conversation; held-out images keep one question",
    )
    p.set_defaults(func=cmd_data_synth)

    p = data.add_parser("check", help="read a LLaVA-format .json/.jsonl file and report records that cannot be used")
    p.add_argument("path")
    p.add_argument("--image-root", help="folder the records' image paths are relative to (default: the file's)")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) at the first unusable record")
    p.add_argument("--show", type=int, default=20, help="how many skipped records to list")
    p.set_defaults(func=cmd_data_check)

    p = data.add_parser("score", help="exact-match accuracy of a model's greedy answers on a LLaVA-format file")
    add_model_arguments(p)
    p.add_argument("path", help=".json/.jsonl whose first human turn is the question and first gpt turn the answer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--show", type=int, default=10, help="how many wrong answers to list")
    p.add_argument("--json", help="also write the scores (and every wrong answer) to this file")
    p.set_defaults(func=cmd_data_score)


def cmd_data_synth(args: argparse.Namespace) -> None:
    from fastvlm.train.synth import write_synthetic_dataset

    files = write_synthetic_dataset(
        args.out,
        args.num,
        size=args.size,
        seed=args.seed,
        test_fraction=args.test_fraction,
        binding=args.binding,
        kind_weights=_kind_weights(args.kind_weights) if args.kind_weights else None,
        all_questions=args.all_questions,
    )
    print(f"wrote {args.num} examples: {files['train']}, {files['test']} and {Path(args.out) / 'images'}")


def _kind_weights(items: list[str]) -> dict[str, float]:
    """``["shape=2", "color=1"]`` -> ``{"shape": 2.0, "color": 1.0}``; a UsageError for anything else."""
    weights = {}
    for item in items:
        kind, sep, value = item.partition("=")
        try:
            weights[kind] = float(value)
        except ValueError:
            sep = ""
        if not sep or not kind:
            raise UsageError(f"--kind-weights takes KIND=WEIGHT pairs such as shape=2; got {item!r}")
    return weights


def cmd_data_check(args: argparse.Namespace) -> None:
    from fastvlm.train.data import ReadReport, iter_records

    report = ReadReport()
    for _ in iter_records(args.path, image_root=args.image_root, report=report, strict=args.strict):
        pass
    print(f"{report.read} usable records, {len(report.skipped)} skipped")
    for line in report.skipped[: args.show]:
        print(f"  skipped {line}")
    if len(report.skipped) > args.show:
        print(f"  … and {len(report.skipped) - args.show} more")


def cmd_data_score(args: argparse.Namespace) -> None:
    from fastvlm.train.synth import exact_match

    model = load_model(args)
    result = exact_match(model, args.path, batch_size=args.batch_size)
    kinds = ", ".join(f"{k} {v:.1%}" for k, v in result["by_kind"].items())
    print(f"exact match {result['accuracy']:.1%} on {result['n']} records ({kinds})")
    for rid, expected, got in result["errors"][: args.show]:
        print(f"  {rid}: expected {expected!r}, got {got!r}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
