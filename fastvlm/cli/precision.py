"""``fastvlm tune-precision MODEL``: measure (or show the cached) precision per stage for a checkpoint.

What ``--dtype auto`` (and ``from_pretrained(dtype="auto")``) would use on this machine, with
the table behind it: each candidate's time, speed-up, agreement with fp32 and max logit
difference, whether it is admissible and which one is chosen. See :mod:`fastvlm.precision`.
"""

from __future__ import annotations

import argparse
import json

from fastvlm.cli.common import Subparsers, add_threads, check_device, set_threads


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("tune-precision", help="choose each stage's precision by measurement (cached)")
    p.add_argument("model", help="checkpoint folder (authors', transformers' or ours) or hub id")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--retune", action="store_true", help="measure again even if the cache has an entry")
    p.add_argument("--cache", help="cache file (default: $FASTVLM_CACHE_DIR/precision.json or ~/.cache/fastvlm/)")
    p.add_argument("--json", action="store_true", help="print the cache entry as JSON instead of the table")
    add_threads(p)
    p.set_defaults(func=cmd_tune_precision)


def cmd_tune_precision(args: argparse.Namespace) -> None:
    from fastvlm.measure import machine_description, machine_line
    from fastvlm.model import FastVLM
    from fastvlm.precision import tune_precision

    check_device(args.device)
    set_threads(args.threads)
    model = FastVLM.from_pretrained(args.model, device=args.device)
    choice = tune_precision(model, cache_path=args.cache, force=args.retune)
    if args.json:
        print(json.dumps({"key": choice.key, "cache": choice.cache_path, **choice.to_json()}, indent=2))
        return
    print(f"{args.model}: {choice.describe()}; {machine_line(machine_description())}")
    print(choice.table())
