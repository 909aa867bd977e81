"""Per-skill held-out exact match of every checkpoint of a from-scratch run: curves over training.

    python examples/skill_curves.py RUN [--test FILE] [--calibration-images N]

RUN is the output of ``examples/train_from_scratch.sh`` run with checkpoints kept (add
``--save-every 178 --keep-checkpoints 20`` to its stage-2 command: one per epoch). Each
``RUN/stage2/checkpoint-*`` and ``RUN/stage2/model`` is scored on ``RUN/data/test.jsonl`` (or
``--test``) twice: as saved, and after re-estimating the tower's batch-norm statistics on N
training images. A tower trained from scratch normalises with batch statistics while it
trains; the running averages saved with a mid-run checkpoint trail weights that still move
fast, and scored as saved such a checkpoint can look broken (24% where its re-estimated
statistics give 97%). At the end of a run the learning rate has decayed and both agree.
Prints one line per checkpoint and writes ``RUN/skill_curves.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from fastvlm.model import FastVLM
from fastvlm.train.synth import exact_match


def reestimate_batchnorm(model: FastVLM, images: list[Path], batch_size: int = 32) -> None:
    """Replace the tower's running statistics by their average over ``images`` (in place)."""
    norms = [m for m in model.vision_tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
        norm.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = [model.image_processor(Image.open(path)) for path in images[start : start + batch_size]]
            model.vision_tower(torch.stack(batch))
    for norm in norms:
        norm.eval()


def skill_scores(model: FastVLM, test: Path) -> dict[str, float]:
    result = exact_match(model, test, progress=False)
    return {"all": result["accuracy"], **result["by_kind"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--test", type=Path, help="held-out file (default: RUN/data/test.jsonl)")
    parser.add_argument("--calibration-images", type=int, default=1024)
    args = parser.parse_args()
    data = args.run / "data"
    test = args.test or data / "test.jsonl"
    with (data / "train.jsonl").open() as f:
        records = [json.loads(line) for line in itertools.islice(f, args.calibration_images)]
    images = [data / record["image"] for record in records]
    curves = {}
    for checkpoint in [*sorted(args.run.glob("stage2/checkpoint-*")), args.run / "stage2" / "model"]:
        if not checkpoint.is_dir():
            continue
        model = FastVLM.from_pretrained(checkpoint, fuse=False)
        saved = skill_scores(model, test)
        reestimate_batchnorm(model, images)
        curves[checkpoint.name] = {"as saved": saved, "batch norm re-estimated": skill_scores(model, test)}
        shown = {k: {s: round(v, 3) for s, v in scores.items()} for k, scores in curves[checkpoint.name].items()}
        print(checkpoint.name, shown, flush=True)
    (args.run / "skill_curves.json").write_text(json.dumps(curves, indent=1))


if __name__ == "__main__":
    main()
