"""Running a task: batched greedy answers appended to a predictions file, then scoring.

Output of ``evaluate(model, "textvqa", DATA, OUT)``::

    OUT/textvqa/run.json            what produced the predictions (model, layout, decoding)
    OUT/textvqa/predictions.jsonl   one line per sample: id, prediction, reference
    OUT/textvqa/results.json        metrics, sample count, throughput
    OUT/results.md                  one table row per task found under OUT

Every finished batch is appended and flushed, so an interrupted run loses at most one
batch: the next run with the same settings reads the file, drops a torn last line, and
continues with the samples that have no prediction yet (or whose image failed). A run
with other settings (another model, dtype, layout or decoding length) is refused unless
``overwrite`` is set: mixing predictions of two models gives a score that belongs to neither.

The answers come from a generation backend (:class:`AnsweringModel`): our own model, or vLLM
(``fastvlm eval --engine vllm``); only the answering differs, so the files are the same.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fastvlm.errors import ConfigError, DataError
from fastvlm.eval.layouts import Layout, Sample
from fastvlm.eval.tasks import TASKS, Task, get_task
from fastvlm.files import write_text_atomic
from fastvlm.measure import markdown_table
from fastvlm.processing import DEFAULT_MAX_PIXELS, ImageError, PromptError

if TYPE_CHECKING:
    import torch

# The settings a predictions file depends on: a run with other values must not append to it.
RUN_KEYS = ("task", "layout", "model", "dtype", "max_new_tokens", "image_mode")
GPU_BATCH_SIZE = 8  # the default batch on an accelerator; on a CPU it is 1


class AnsweringModel(Protocol):
    """The generation backend :func:`evaluate` answers with: our FastVLM (the default engine),
    vLLM (:class:`fastvlm.integrations.vllm.engine.VLLMEngine`), or a stand-in answering from a table.

    ``generate(images, prompts, max_new_tokens=)`` answers a batch greedily: one result with a
    ``.text`` per prompt, each prompt as the sample gives it (a bare question is put in the chat
    template by :func:`fastvlm.generation.prepare_prompt`) with its PIL image or None. Used when
    present: ``parameters()`` (dtype and device), ``dtype``, ``default_batch_size``,
    ``image_processor.max_pixels``, ``source_path`` and ``engine`` (its name, for ``run.json``).
    Everything else (prompts, images, predictions file, resuming, scoring) is the runner's, so
    two backends that decode the same tokens write the same predictions file.
    """

    config: Any

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...


def read_predictions(path: Path) -> dict[str, dict]:
    """Predictions already in ``path`` by id; a torn last line (a killed run) is cut off the file."""
    if not path.exists():
        return {}
    done: dict[str, dict] = {}
    good_bytes = 0
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")
            except ValueError:
                if f.read(1):  # not the last line: the file was damaged some other way
                    raise DataError(
                        f"{path}:{n} is not a valid prediction line; remove the file to start over"
                    ) from None
                break
            if not isinstance(row, dict) or "id" not in row or "prediction" not in row:
                raise DataError(f"{path}:{n} is not a prediction line (no id / prediction); remove it to start over")
            done[row["id"]] = row
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return done


def _check_run(out: Path, settings: dict, overwrite: bool) -> None:
    run_file = out / "run.json"
    if overwrite:
        for name in ("predictions.jsonl", "results.json"):
            (out / name).unlink(missing_ok=True)
    elif run_file.exists():
        before = json.loads(run_file.read_text())
        changed = [k for k in RUN_KEYS if before.get(k) != settings.get(k)]
        if changed:
            diffs = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise DataError(
                f"{out} holds predictions made with other settings ({diffs}); pass --overwrite to start over "
                "or choose another --out"
            )
    write_text_atomic(run_file, json.dumps(settings, indent=2) + "\n")


def _answer(model: AnsweringModel, batch: list[Sample], max_new_tokens: int, max_pixels: int | None) -> list[dict]:
    """Greedy answers for a batch; a sample that fails (bad image, over-long prompt) gets an
    empty prediction and its error, and the rest of the batch still runs."""
    rows: list[dict] = [{"id": s.id, "prediction": "", "reference": s.reference} for s in batch]
    images: list = []
    ready: list[int] = []
    for i, sample in enumerate(batch):
        try:
            images.append(sample.image(max_pixels=max_pixels) if sample.image is not None else None)
            ready.append(i)
        except (ImageError, DataError) as err:
            rows[i]["error"] = f"image: {err}"
    if not ready:
        return rows
    prompts = [batch[i].prompt for i in ready]
    try:
        results = model.generate(images, prompts, max_new_tokens=max_new_tokens)
        texts = [r.text for r in results]
    except PromptError as err:
        if len(ready) == 1:
            rows[ready[0]]["error"] = f"generation: {err}"
            return rows
        texts = []  # find the culprit: answer one by one
        for i, image, prompt in zip(ready, images, prompts, strict=True):
            try:
                texts.append(model.generate([image], [prompt], max_new_tokens=max_new_tokens)[0].text)
            except PromptError as one_err:
                rows[i]["error"] = f"generation: {one_err}"
                texts.append("")
    for i, text in zip(ready, texts, strict=True):
        rows[i]["prediction"] = text  # as decoded; each protocol's own answer extraction runs when scoring
    return rows


def evaluate(
    model: AnsweringModel,
    task: str | Task,
    data: str | Path,
    out: str | Path,
    *,
    limit: int | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    overwrite: bool = False,
    model_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Answer and score one task; returns the results dict also written to ``results.json``."""
    task = get_task(task) if isinstance(task, str) else task
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    weight = next(model.parameters()) if hasattr(model, "parameters") else None
    dtype = weight.dtype if weight is not None else getattr(model, "dtype", None)
    batch_size = _batch_size(batch_size, model, weight)
    data = Path(data)
    layout: Layout = task.layout_for(data)
    samples = layout.read(data)
    tokens = max_new_tokens or layout.max_new_tokens
    out_dir = Path(out) / task.name
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "task": task.name,
        "layout": layout.name,
        "model": model_name or str(getattr(model, "source_path", None) or "model"),
        "dtype": str(dtype) if dtype is not None else None,
        "max_new_tokens": tokens,
        "image_mode": getattr(model.config, "image_mode", None),
        "data": str(data),
        "protocol": layout.protocol,
        "engine": getattr(model, "engine", "fastvlm"),  # not a RUN_KEY: engines that agree may share a file
    }
    _check_run(out_dir, settings, overwrite)
    processor = getattr(model, "image_processor", None)
    batches = _BatchRun(
        model=model,
        pred_file=out_dir / "predictions.jsonl",
        max_new_tokens=tokens,
        max_pixels=getattr(processor, "max_pixels", DEFAULT_MAX_PIXELS),
    )
    total = min(samples.total, limit) if limit is not None else samples.total
    order = batches.run(
        islice(samples.items, limit), task=task.name, data=data, total=total, batch_size=batch_size, progress=progress
    )
    extra = {"limit": limit, "batch_size": batch_size, "throughput": batches.throughput()}
    return _score_and_write(task, layout, [batches.done[i] for i in order], settings, extra, Path(out))


def _batch_size(batch_size: int | None, model: AnsweringModel, weight: torch.Tensor | None) -> int:
    """The batch size asked for, else the backend's own default, else the default for the model's device."""
    if batch_size is None:
        batch_size = getattr(model, "default_batch_size", None)
    if batch_size is None:  # batches pay off on a GPU; on a CPU one at a time was as fast (see bench-eval)
        batch_size = GPU_BATCH_SIZE if weight is not None and weight.device.type != "cpu" else 1
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size


class _BatchRun:
    """Answers the samples without a good prediction yet, a batch at a time, appending each
    finished batch to the predictions file (flushed to disk) and timing only the answering."""

    def __init__(self, *, model: AnsweringModel, pred_file: Path, max_new_tokens: int, max_pixels: int | None) -> None:
        self.model, self.pred_file = model, pred_file
        self.max_new_tokens, self.max_pixels = max_new_tokens, max_pixels
        self.done = read_predictions(pred_file)
        self.new = 0
        self.seconds = 0.0

    def run(
        self, items: Iterable[Sample], *, task: str, data: Path, total: int, batch_size: int, progress: bool
    ) -> list[str]:
        """The ids of ``items`` in order, after answering those not done (failed samples are tried again)."""
        from tqdm.auto import tqdm

        order: list[str] = []
        seen: set[str] = set()
        batch: list[Sample] = []
        with tqdm(total=total, desc=task, unit="sample", disable=not progress) as bar:
            for sample in items:
                if sample.id in seen:
                    raise DataError(f"{task}: sample id {sample.id!r} occurs twice in {data}")
                seen.add(sample.id)
                order.append(sample.id)
                if sample.id in self.done and "error" not in self.done[sample.id]:
                    bar.update(1)
                    continue
                batch.append(sample)
                if len(batch) == batch_size:
                    bar.update(self._answer_and_append(batch))
                    batch = []
            if batch:
                bar.update(self._answer_and_append(batch))
        return order

    def _answer_and_append(self, batch: list[Sample]) -> int:
        start = time.perf_counter()
        rows = _answer(self.model, batch, self.max_new_tokens, self.max_pixels)
        self.seconds += time.perf_counter() - start
        with self.pred_file.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                self.done[row["id"]] = row
            f.flush()
            os.fsync(f.fileno())
        self.new += len(rows)
        return len(rows)

    def throughput(self) -> dict:
        return {
            "new_samples": self.new,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.new / self.seconds, 4) if self.seconds > 0 else None,
        }


def _score_and_write(
    task: Task, layout: Layout, predictions: list[dict], settings: dict, extra: dict, out: Path
) -> dict:
    rows = [{**r, "answer": layout.answer(r["prediction"], r["reference"])} for r in predictions]
    metrics = layout.score(rows)
    results = {
        "task": task.name,
        "title": task.title,
        "metric": layout.headline,
        "score": metrics[layout.headline],
        "metrics": metrics,
        "n": len(rows),
        "errors": sum("error" in r for r in rows),
        **{k: settings.get(k) for k in ("layout", "protocol", "model", "data", "max_new_tokens")},
        **extra,
    }
    write_text_atomic(out / task.name / "results.json", json.dumps(results, indent=2) + "\n")
    write_summary(out)
    return results


def rescore(out: str | Path, task: str | Task) -> dict:
    """Score ``out/<task>/predictions.jsonl`` again, without the model or the data.

    Predictions carry their references, so this needs only the files a run wrote; use it
    after a change to a scoring rule, or to score predictions gathered on other machines.
    """
    task = get_task(task) if isinstance(task, str) else task
    out = Path(out)
    run_file, pred_file = out / task.name / "run.json", out / task.name / "predictions.jsonl"
    if not run_file.exists() or not pred_file.exists():
        raise DataError(f"{out / task.name} has no run.json and predictions.jsonl to rescore")
    settings = json.loads(run_file.read_text())
    layouts = {lay.name: lay for lay in task.layouts}
    if settings.get("layout") not in layouts:
        raise DataError(f"{run_file}: layout {settings.get('layout')!r} is not one of {task.name}'s {list(layouts)}")
    predictions = list(read_predictions(pred_file).values())  # dataset order; a retried sample keeps its place
    if not predictions:
        raise DataError(f"{pred_file} holds no predictions")
    previous = out / task.name / "results.json"
    before = json.loads(previous.read_text()) if previous.exists() else {}
    extra = {
        "limit": None,
        "batch_size": before.get("batch_size"),
        "throughput": before.get("throughput"),
        "rescored": True,
    }
    return _score_and_write(task, layouts[settings["layout"]], predictions, settings, extra, out)


def write_summary(out: Path) -> Path:
    """``out/results.md``: one row per task with a results.json under ``out``."""
    rows = []
    for name in TASKS:
        file = out / name / "results.json"
        if file.exists():
            r = json.loads(file.read_text())
            limited = f" (limit {r['limit']})" if r.get("limit") else ""
            score = f"{100 * r['score']:.2f}"
            rows.append([r["title"], r["metric"], score, f"{r['n']}{limited}", str(r["errors"]), r["protocol"]])
    table = markdown_table(["task", "metric", ">score", ">samples", ">errors", "protocol"], rows)
    path = out / "results.md"
    write_text_atomic(path, table + "\n")
    return path
