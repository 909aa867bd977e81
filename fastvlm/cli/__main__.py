"""``python -m fastvlm.cli ...`` (what ``torchrun -m fastvlm.cli train ...`` runs)."""

import sys

from fastvlm.cli import run

if __name__ == "__main__":  # vLLM's engine processes may re-import the main module (spawn)
    sys.exit(run())
