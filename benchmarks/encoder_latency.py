"""FastViTHD encoder latency: the released inference form vs our fused form, same process.

    python benchmarks/encoder_latency.py                     # 256/512/1024 px on CPU (+ GPU when present)
    python benchmarks/encoder_latency.py --quick             # 256/512 px, 3 repeats
    python benchmarks/encoder_latency.py --json out.json     # also write the rows as JSON

Prints per device and resolution: visual tokens, GFLOPs, median latency of each form,
their ratio, peak memory of one call and the largest relative output difference.
Same as ``fastvlm bench-encoder``.
"""

import sys

from fastvlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-encoder", *sys.argv[1:]]))
