"""Batch-1 decode tokens/s of fp32, bf16, int8 (ours and torchao's) and int4, in one process.

    python benchmarks/decode_precision.py                   # FastVLM-0.5B-sized random model
    python benchmarks/decode_precision.py --steps 16 --rounds 2 --threads 2

Prompt: 256 visual tokens + 44 text tokens. Prints a markdown table (weights read per step,
decode tokens/s, ratios to fp32, agreement with fp32's greedy tokens) and writes it as JSON
under results/decode_precision/. See :mod:`fastvlm.bench.decode_precision`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastvlm.bench.decode_precision import VARIANTS, format_decode_table, run_decode_precision
from fastvlm.measure import machine_description, machine_line, write_rows_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default="0.5b", help="decoder size preset (fastvlm.presets)")
    parser.add_argument("--steps", type=int, default=32, help="greedy decode steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per variant (median reported)")
    parser.add_argument("--visual-tokens", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=44)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="+", help=f"subset, fp32 first (default: {[v.name for v in VARIANTS]})")
    parser.add_argument("--json", type=Path, help="output file (default: results/decode_precision/<time>.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    by_name = {v.name: v for v in VARIANTS}
    variants = tuple(by_name[name] for name in args.variants) if args.variants else VARIANTS
    rows = run_decode_precision(
        llm=args.llm,
        variants=variants,
        visual_tokens=args.visual_tokens,
        text_tokens=args.text_tokens,
        steps=args.steps,
        rounds=args.rounds,
    )
    meta = machine_description() | {
        "llm": args.llm,
        "steps": args.steps,
        "rounds": args.rounds,
        "prompt": f"{args.visual_tokens} visual + {args.text_tokens} text tokens",
    }
    print(f"decode at batch 1, random FastVLM-{args.llm}, {meta['prompt']}; {machine_line(meta)}")
    print(format_decode_table(rows))
    path = args.json or Path("results/decode_precision") / time.strftime("%Y%m%d-%H%M%S.json")
    write_rows_json(rows, path, meta)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
