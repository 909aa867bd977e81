"""Training throughput (samples/s) of FastVLM-0.5B (random weights), stage 1 at 1024 px by default.

    python benchmarks/train_throughput.py                           # CPU (+ GPU when present)
    python benchmarks/train_throughput.py --stages 1 2 --resolutions 512 1024 --micro-batch 4
    python benchmarks/train_throughput.py --json results/train_throughput.json

Times the real trainer step (forward, backward, clipping, AdamW) on batches from the real
data path, and a baseline row with the usual full-vocabulary loss. Same as
``fastvlm bench-train``.
"""

import sys

from fastvlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-train", *sys.argv[1:]]))
