"""Benchmark evaluation: the paper's tasks, read from local copies of their public releases
and scored exactly as the official scripts score them.

``fastvlm eval --model M --task textvqa --data DIR`` or :func:`evaluate`.
"""

from fastvlm.eval.runner import evaluate, read_predictions, rescore
from fastvlm.eval.tasks import TASKS, get_task

__all__ = ["TASKS", "evaluate", "get_task", "read_predictions", "rescore"]
