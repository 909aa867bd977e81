"""FastVLM 0.5B/1.5B/7B (random weights, bf16) on one GPU, against transformers' FastVLM there.

    OUT=results/gpu python benchmarks/gpu_speed.py            # everything; report in $OUT
    python benchmarks/gpu_speed.py --sizes 0.5b --resolutions 1024 --compile-sizes
    python benchmarks/gpu_speed.py --smoke --out /tmp/gpu      # toy sizes on the CPU, seconds

Measures the fused encoder (eager and as a CUDA graph, FLOP rate against a measured
matmul), prefill, TTFT through the generation API, decode tokens/s at batch 1 and 32
against the copy-bandwidth bound, peak memory, and batch-1 decode with a static cache,
eager and through torch.compile (in a child process). Writes gpu_speed.json and
gpu_speed.md to the output folder after every step. Same as ``fastvlm bench-gpu``.
"""

import sys

from fastvlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-gpu", *sys.argv[1:]]))
