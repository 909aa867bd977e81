"""Time to first token of FastVLM-0.5B (random weights) at 256/512/768/1024 px.

    python benchmarks/ttft.py                         # CPU (+ GPU when present), table
    python benchmarks/ttft.py --json results/ttft.json
    python benchmarks/ttft.py --llm 1.5b --resolutions 512 1024

Prints vision ms, prefill ms, TTFT, decode tokens/s and peak memory per resolution.
Same as ``fastvlm bench-ttft``.
"""

import sys

from fastvlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-ttft", *sys.argv[1:]]))
