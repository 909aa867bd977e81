"""Evaluation throughput (samples/s) of FastVLM-0.5B (random weights) at 1024 px, batch 1 vs 8.

    python benchmarks/eval_throughput.py                        # CPU (+ GPU when present)
    python benchmarks/eval_throughput.py --batch-sizes 4 16 --samples 64 --max-new-tokens 16

Times whole ``fastvlm eval`` runs (reading a GQA-layout folder of synthetic images,
preprocessing, batched greedy generation, writing and scoring predictions); batch size 1
is the baseline in the same process. Same as ``fastvlm bench-eval``.
"""

import sys

from fastvlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-eval", *sys.argv[1:]]))
