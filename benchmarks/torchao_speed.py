"""Decode speed and decoder weight bytes of torchao int8/int4 vs fp32 and bf16, in one process.

    python benchmarks/torchao_speed.py                       # FastVLM-0.5B-sized, random weights
    python benchmarks/torchao_speed.py --tokens 16 --threads 2

Each variant is the same random FastVLM-0.5B (``fastvlm_config("0.5b")``, seed 0), built
afresh and passed through :func:`fastvlm.quantization.quantize_decoder`: fp32, bf16,
int8 (fp32 activations), int4 (fp32 activations) and int4 (bf16 activations). Decode is
timed on the decoder alone with a KV cache, greedy, after a prompt of ``--prompt-tokens``.
Quality is against fp32 on fp32's own greedy tokens (teacher-forced): the relative error
of the first step's logits and the share of steps whose top-1 agrees. Random weights say
little about a trained model's quality; the table's real-checkpoint rows are the quality
benchmark's. Ratios are to fp32 and bf16 of the same run.

One run (2 shared cores under load ~5 from other jobs, torch 2.13 CPU, torchao 0.18, 24 steps):
decoder MB fp32 1976 / bf16 988 / int8 904 / int4 746 (fp32 act.) / int4 463 (bf16 act.),
the embedding staying in the model's dtype; decode tok/s vs fp32 0.94 (bf16), 0.70 (int8:
eager mode converts the weight on each call), 0.69 (int4, fp32 act.), 1.93 (int4, bf16 act.).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from fastvlm.model import FastVLM
from fastvlm.presets import fastvlm_config
from fastvlm.quantization import quantize_decoder, tensor_bytes, weight_bytes

VARIANTS = {  # name: (dtype, quantization)
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8": (torch.float32, "int8"),
    "int4 (fp32 act.)": (torch.float32, "int4"),
    "int4 (bf16 act.)": (torch.bfloat16, "int4"),
}


@dataclass
class Row:
    name: str
    linear_bytes: int
    decoder_bytes: int
    tokens_per_s: float
    logits: torch.Tensor  # [steps, vocab], float32
    tokens: list[int]


def decoder_bytes(model: FastVLM) -> int:
    """All of the decoder's tensors (embedding included once, even when tied)."""
    unique = {id(p): p for p in model.language_model.parameters()}
    return sum(tensor_bytes(p) for p in unique.values())


@torch.no_grad()
def decode(model: FastVLM, prompt: torch.Tensor, steps: int, forced: list[int] | None) -> Row:
    """Greedy decode (or teacher-forced on ``forced``); tokens/s of the steps after the prompt."""
    lm = model.language_model
    cache = DynamicCache()
    out = lm(prompt, past_key_values=cache, use_cache=True)
    logits, tokens = [out.logits[0, -1].float()], []
    start = time.perf_counter()
    for i in range(steps):
        token = forced[i] if forced is not None else int(logits[-1].argmax())
        tokens.append(token)
        out = lm(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1].float())
    return Row("", 0, 0, steps / (time.perf_counter() - start), torch.stack(logits), tokens)


def measure(name: str, args: argparse.Namespace, forced: list[int] | None) -> Row:
    dtype, quantization = VARIANTS[name]
    model = FastVLM.from_config(fastvlm_config("0.5b"), dtype=dtype, seed=0)
    if quantization is not None:
        quantize_decoder(model, quantization, kernel="torchao")  # this script measures torchao itself
    prompt = torch.randint(0, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    decode(model, prompt, 2, forced)  # warm-up
    row = decode(model, prompt, args.tokens, forced)
    row.name, row.linear_bytes, row.decoder_bytes = name, weight_bytes(model), decoder_bytes(model)
    del model
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reference = measure("fp32", args, None)
    rows = [reference] + [measure(name, args, reference.tokens) for name in list(VARIANTS)[1:]]
    bf16 = rows[1]
    print(f"random FastVLM-0.5B decoder, CPU, {torch.get_num_threads()} threads, {args.tokens} decode steps")
    print(
        f"{'variant':18} {'linear MB':>9} {'decoder MB':>10} {'x fp32':>6} {'tok/s':>6} {'x fp32':>6} {'x bf16':>6}"
        f" {'logit err':>9} {'top-1':>6}"
    )
    for r in rows:
        want, got = reference.logits, r.logits
        error = float((got[0] - want[0]).norm() / want[0].norm())
        agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        print(
            f"{r.name:18} {r.linear_bytes / 1e6:9.1f} {r.decoder_bytes / 1e6:10.1f}"
            f" {r.decoder_bytes / reference.decoder_bytes:6.2f} {r.tokens_per_s:6.2f}"
            f" {r.tokens_per_s / reference.tokens_per_s:6.2f} {r.tokens_per_s / bf16.tokens_per_s:6.2f}"
            f" {error:9.4f} {agree:6.2f}"
        )


if __name__ == "__main__":
    main()
