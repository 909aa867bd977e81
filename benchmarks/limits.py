"""Encoder, prefill and decode of FastVLM-0.5B (random weights) against this machine's limits.

    python benchmarks/limits.py                                # fp32 + bf16, 256/512/1024 px, 3 rounds
    python benchmarks/limits.py --resolutions 256 512 --rounds 2 --out results/limits
    python benchmarks/limits.py --smoke --out /tmp/limits      # toy sizes, seconds

Measures, in one run, the fp32 and bf16 matmul rate (4096² GEMM) and the memory read
bandwidth (a sum over 1 GiB), then each stage as a fraction of its limit: encoder and
prefill FLOP/s against the matmul rate of their dtype, decode bytes read per second
(weights + KV cache) against the bandwidth. Writes limits.md and limits.json.
Same as ``fastvlm bench-limits``.
"""

import sys

from fastvlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-limits", *sys.argv[1:]]))
