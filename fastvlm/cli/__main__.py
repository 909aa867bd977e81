"""``python -m fastvlm.cli ...`` (what ``torchrun -m fastvlm.cli train ...`` runs)."""

import sys

from fastvlm.cli import main

sys.exit(main())
