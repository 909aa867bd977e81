"""Quantized ONNX variants (and PyTorch int8/int4 through fastvlm.quantization): size, CPU latency, quality vs fp32.

    python benchmarks/export_quality.py --make-model results/export_quality/model_0.5b_512   # the issue's run
    python benchmarks/export_quality.py --model DIR [--onnx EXPORTED] [--samples 8 --steps 16]

Exports ``--model`` to ONNX (fp32, with :func:`fastvlm.export.onnx.export_onnx`) unless
``--onnx`` already holds an export, writes every variant with
:func:`fastvlm.export.quantize.write_variants`, then measures all of them in this one process
(:mod:`fastvlm.bench.export_quality`): total size of the three graphs, median latency of the
vision encoder (one image) and of one cached decode step, and top-1 agreement / mean KL of the
next-token distributions against fp32, teacher-forced on fp32's greedy answers to a seeded set
of prompts and random images. The PyTorch rows (`--torchao`, named for the first version, which
ran torchao for both) load the PyTorch model with
``FastVLM.from_pretrained(..., quantization=...)`` and are scored against the same fp32 ONNX
distributions. Writes ``table.md`` and ``results.json`` in ``--out``.

``--make-model DIR`` first writes a FastVLM-0.5B-sized model with random weights (512 px,
inference-form tower) there, as benchmarks/serve_load.py does, but its padded byte tokenizer
keeps its last id for ``<image>``: the exported graphs take images as an in-vocabulary id.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

from serve_load import make_model  # the random 0.5B of the serving benchmarks (this folder)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="PyTorch checkpoint folder")
    parser.add_argument("--make-model", type=Path, help="write a random FastVLM-0.5B at 512 px here first")
    parser.add_argument("--onnx", type=Path, help="exported folder (default: <out>/onnx_export, exported if missing)")
    parser.add_argument("--image-size", type=int, help="export at this size (default: the model's)")
    parser.add_argument("--variants", default="fp16,int8,uint8,q4,q4f16")
    parser.add_argument("--torchao", default="int8,int4", help="torchao rows ('' for none)")
    parser.add_argument("--samples", type=int, default=8, help="prompts (each with a random image)")
    parser.add_argument("--steps", type=int, default=16, help="fp32 greedy tokens per prompt")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per latency median")
    parser.add_argument("--data", type=Path, help="held-out JSONL (examples/): adds exact match of greedy answers")
    parser.add_argument("--out", type=Path, default=Path("results/export_quality"))
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from transformers import AutoTokenizer

    from fastvlm.bench.export_quality import make_samples, markdown_table, measure, measure_torch
    from fastvlm.export.onnx import export_onnx
    from fastvlm.export.quantize import check_variants, write_variants
    from fastvlm.files import read_json

    if args.make_model:
        make_model(args.make_model, image_token=True)
        args.model = args.make_model
    if args.model is None:
        sys.exit("--model or --make-model is required")
    variants = check_variants([v for v in args.variants.split(",") if v])
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_dir = args.onnx or args.out / "onnx_export"
    started = time.perf_counter()
    if not (onnx_dir / "onnx" / "decoder_model_merged.onnx").exists():
        export_onnx(args.model, onnx_dir, image_size=args.image_size)
    missing = [v for v in variants if not (onnx_dir / "onnx" / f"decoder_model_merged_{v}.onnx").exists()]
    write_variants(onnx_dir, missing)
    print(f"export + variants: {time.perf_counter() - started:.0f} s", flush=True)

    image_size = read_json(onnx_dir / "preprocessor_config.json")["crop_size"]["height"]
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    samples = make_samples(tokenizer, image_size, args.samples)
    stop = read_json(onnx_dir / "generation_config.json").get("eos_token_id", [])
    stop = [stop] if isinstance(stop, int) else stop
    data = (args.data, tokenizer) if args.data else None
    rows, ref_logits = measure(
        onnx_dir, variants, samples, steps=args.steps, repeats=args.repeats, stop=stop, data=data
    )
    reference = [s.continuation for s in samples]
    quantizations = [q for q in args.torchao.split(",") if q]
    if quantizations:
        torch_rows = [None, *quantizations]
        rows += measure_torch(args.model, torch_rows, samples, ref_logits, repeats=args.repeats, data=args.data)

    settings = {
        "model": str(args.model),
        "image_size": image_size,
        "samples": args.samples,
        "steps": args.steps,
        "repeats": args.repeats,
        "data": str(args.data) if args.data else None,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "continuations": reference,
    }
    (args.out / "results.json").write_text(
        json.dumps({"settings": settings, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n"
    )
    (args.out / "table.md").write_text(markdown_table(rows) + "\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
