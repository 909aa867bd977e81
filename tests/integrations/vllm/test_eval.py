"""``fastvlm eval --engine vllm`` writes the default engine's predictions files byte for byte (greedy, fp32).

Two small tasks in LLaVA's folder layout (the builders of tests/eval/layouts.py), with images
of different content and size so that every sample gets its own answer, run through the
command line: the default engine in this process, vLLM in a fresh one (as a user runs it;
vLLM starts its engine processes from there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fastvlm.cli import main
from fastvlm.integrations.vllm.engine import DEFAULT_BATCH_SIZE
from tests.eval.layouts import gqa, pope_llava

REPO = Path(__file__).resolve().parents[3]
TASKS = {"gqa": gqa, "pope": pope_llava}
LIMITS = ["--max-new-tokens", "24"]


def write_tasks(root: Path) -> Path:
    """gqa/ and pope/ under ``root``, each image replaced by noise of its own size."""
    for name, build in TASKS.items():
        build(root / name)
    rng = np.random.RandomState(0)
    for i, path in enumerate(sorted(root.rglob("*.jpg"))):
        pixels = (rng.rand(40 + 24 * i, 90 - 8 * i, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(path, format="JPEG")
    return root


def eval_args(model: Path, data: Path, out: Path) -> list[str]:
    tasks = ",".join(TASKS)
    return ["eval", "--model", str(model), "--tasks", tasks, "--data", str(data), "--out", str(out), *LIMITS]


def run_vllm_eval(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    command = [sys.executable, "-m", "fastvlm.cli", *args, "--engine", "vllm"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_vllm_engine_writes_the_default_engines_predictions(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    # One format: each vLLM start costs ~30 s here; test_generate compares the engines on both.
    model = checkpoints["apple"]
    data = write_tasks(tmp_path / "data")
    assert main(eval_args(model, data, tmp_path / "fastvlm")) == 0
    done = run_vllm_eval(eval_args(model, data, tmp_path / "vllm"))
    assert done.returncode == 0, done.stderr[-3000:]
    for task in TASKS:
        ours, theirs = tmp_path / "fastvlm" / task, tmp_path / "vllm" / task
        predictions = (ours / "predictions.jsonl").read_bytes()
        assert (theirs / "predictions.jsonl").read_bytes() == predictions, task
        rows = [json.loads(line) for line in predictions.splitlines()]
        # the files mean something only if every sample got its own answer, and none failed
        assert len({r["prediction"] for r in rows}) == len(rows) and not any("error" in r for r in rows)
        a, b = (json.loads((d / "results.json").read_text()) for d in (ours, theirs))
        assert (a["score"], a["metrics"], a["n"]) == (b["score"], b["metrics"], b["n"])
        assert json.loads((theirs / "run.json").read_text())["engine"] == "vllm"
        assert (a["batch_size"], b["batch_size"]) == (1, DEFAULT_BATCH_SIZE)  # vLLM: each small task in one call
