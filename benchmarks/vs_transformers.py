"""Ours against transformers' FastVlmForConditionalGeneration: same weights, one process, interleaved.

    bash benchmarks/transformers_env.sh                        # once: .venv-hf (torch, timm, transformers)
    .venv-hf/bin/python benchmarks/vs_transformers.py          # fp32 and bf16 at 1024 px, 5 rounds
    .venv-hf/bin/python benchmarks/vs_transformers.py --repeats 3 --resolutions 512
    .venv-hf/bin/python benchmarks/vs_transformers.py --model CKPT   # a checkpoint in the fast_vlm format

Prints TTFT, decode tokens/s, their ratios and the greedy-token agreement per dtype, and
writes results/vs_transformers/vs_transformers.{md,json}. Same as
``fastvlm bench-vs-transformers``; in the main .venv (no timm) it says how to build .venv-hf.
"""

import sys

from fastvlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-vs-transformers", *sys.argv[1:]]))
