"""Decode with a static KV cache, eager or through ``torch.compile``, timed in a process of its own.

:func:`fastvlm.generation.generate_tokens` grows a ``DynamicCache`` and checks for stop
tokens after every step, which suits serving but leaves each step's hundreds of small
kernel launches on the critical path. Whether compiling the step (``reduce-overhead``:
Inductor kernels replayed as CUDA graphs) pays is measured here on the same prompt:

* **eager static**: transformers' ``StaticCache`` (preallocated, written in place) and
  a loop with no host synchronisation between steps, uncompiled;
* **compiled**: the same loop with the one-token step compiled.

Both are greedy from the same prefill, so their tokens can be compared (bf16 kernels
differ in rounding, and random weights give near-flat logits, so a few diverging tokens
are expected; the fraction that agree is reported, not asserted).

Compiling can take minutes and a failure inside Inductor or a CUDA graph can poison the
process's CUDA context, so :func:`run_isolated` runs the measurement in a child process
(``python -m fastvlm.bench.gpu_decode JOB RESULT``) under a wall-clock limit; the parent
gets a result or a one-line reason.

The decoder's keyword for positions changed across transformers 5.x: before the cache
tracked them itself, ``forward`` took ``cache_position``. It is read from the signature.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import StaticCache

from fastvlm.bench.gpu_common import DTYPE_NAMES, NOTE_CHARS, build_fastvlm, prompt_inputs
from fastvlm.decoding import cache_argument
from fastvlm.measure import synchronize

if TYPE_CHECKING:
    from fastvlm.model import FastVLM, ModelInputs

WARMUP_STEPS = 3  # compile, then cudagraph-trees record, then the first replay
KILL_GRACE_S = 5.0  # after SIGTERM, how long a timed-out child gets before SIGKILL


@dataclass
class StaticDecodeResult:
    """One static-cache decode run at batch 1 (``compiled`` says which kind)."""

    compiled: bool
    mode: str | None  # torch.compile mode, None when eager
    tokens_per_s: float
    first_call_s: float  # the first step's wall time: compilation when compiled
    tokens: list[int]  # the greedy tokens of the timed steps


def _takes_cache_position(lm: torch.nn.Module) -> bool:
    return "cache_position" in inspect.signature(type(lm).forward).parameters


def static_decode(
    model: FastVLM, inputs: ModelInputs, *, new_tokens: int, compile_mode: str | None = None
) -> StaticDecodeResult:
    """Prefill ``inputs`` (one row, no padding) into a StaticCache, then time ``new_tokens`` greedy steps.

    The prefill runs eagerly; with ``compile_mode`` the one-token step goes through
    ``torch.compile(mode=compile_mode)``. The first ``WARMUP_STEPS`` steps are not timed.
    """
    if inputs.inputs_embeds.shape[0] != 1:
        raise ValueError("static_decode measures batch 1; got a batch of " + str(inputs.inputs_embeds.shape[0]))
    lm = model.language_model
    length = inputs.inputs_embeds.shape[1]
    cache = StaticCache(config=lm.config, max_cache_len=length + WARMUP_STEPS + new_tokens + 1)
    cache_kw = {cache_argument(lm): cache}
    with_positions = _takes_cache_position(lm)

    def step(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [1, 1] each -> next id [1, 1]
        extra = {"cache_position": positions[0]} if with_positions else {}
        logits = lm(input_ids=ids, position_ids=positions, use_cache=True, **cache_kw, **extra).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    with torch.no_grad():  # as transformers' generate, whose compiled path this mirrors
        extra = {"cache_position": inputs.position_ids[0]} if with_positions else {}
        out = lm(
            inputs_embeds=inputs.inputs_embeds,
            position_ids=inputs.position_ids,
            use_cache=True,
            logits_to_keep=1,
            **cache_kw,
            **extra,
        )
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        positions = inputs.position_ids[:, -1:] + 1  # [1, 1]
        run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            torch.compile(step, mode=compile_mode) if compile_mode else step
        )
        return _timed_steps(run, token, positions, new_tokens, compiled=compile_mode is not None, mode=compile_mode)


def _timed_steps(
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    token: torch.Tensor,
    positions: torch.Tensor,
    new_tokens: int,
    *,
    compiled: bool,
    mode: str | None,
) -> StaticDecodeResult:
    device = token.device

    def one(token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
        return run(token, positions).clone()

    start = time.perf_counter()
    token = one(token, positions)
    synchronize(device)
    first_call_s = time.perf_counter() - start
    positions = positions + 1
    for _ in range(WARMUP_STEPS - 1):
        token = one(token, positions)
        positions = positions + 1
    synchronize(device)
    produced = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = one(token, positions)
        positions = positions + 1
        produced.append(token)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return StaticDecodeResult(
        compiled=compiled,
        mode=mode,
        tokens_per_s=new_tokens / max(elapsed, 1e-9),
        first_call_s=first_call_s,
        tokens=torch.cat(produced).flatten().tolist(),
    )


# ------------------------------------------------------------------------------ in a child process


def compare_static_decodes(job: dict[str, Any], write: Callable[[dict[str, Any]], None]) -> None:
    """Eager static decode, then (with ``job["compile_mode"]``) compiled, on a model built from ``job``.

    ``job`` holds what :func:`fastvlm.bench.gpu_common.build_fastvlm` and the prompt need: size,
    resolution, device, dtype name, text_tokens, new_tokens, compile_mode (None: eager only).
    ``write`` receives the result so far after each part, so a timeout during compilation
    keeps the eager figures; a failed compilation is recorded as ``compile_error``.
    """
    device = torch.device(job["device"])
    model = build_fastvlm(job["size"], job["resolution"], device=device, dtype=DTYPE_NAMES[job["dtype"]])
    inputs = prompt_inputs(model, job["resolution"], text_tokens=job["text_tokens"], batch=1)
    eager = static_decode(model, inputs, new_tokens=job["new_tokens"])
    result: dict[str, Any] = {"job": job, "eager_static": asdict(eager)}
    write(result)
    mode = job.get("compile_mode")
    if not mode:
        return
    try:
        compiled = static_decode(model, inputs, new_tokens=job["new_tokens"], compile_mode=mode)
    except Exception as err:  # Inductor and CUDA graphs fail in many ways; the eager figures stand
        traceback.print_exc()
        result["compile_error"] = f"{type(err).__name__}: {err}"[:NOTE_CHARS]
    else:
        result["compiled"] = asdict(compiled)
        same = sum(a == b for a, b in zip(eager.tokens, compiled.tokens, strict=True))
        result["same_tokens"] = same / len(eager.tokens)
    write(result)


def run_isolated(job: dict[str, Any], *, timeout_s: float, result_path: Path) -> dict[str, Any]:
    """:func:`compare_static_decodes` in a child process: its result, with ``"error"`` when it did not finish.

    The child gets its own process group, so that on timeout it and any compile workers
    it started are ended together (SIGTERM, then SIGKILL after a grace period). What the
    child had written by then (the eager figures) is kept.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [package_root, env.get("PYTHONPATH", "")] if p)
    command = [sys.executable, "-m", "fastvlm.bench.gpu_decode", json.dumps(job), str(result_path)]
    result_path.unlink(missing_ok=True)
    child = subprocess.Popen(command, env=env, start_new_session=True)
    error = None
    try:
        code = child.wait(timeout=timeout_s)
        if code != 0:
            error = f"the child process exited with status {code} (its traceback is in the log)"
    except subprocess.TimeoutExpired:
        _end_group(child)
        error = f"timed out after {timeout_s:.0f} s (compilation included)"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if error:
        result["error"] = error
    return result


def _end_group(child: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str]) -> int:
    """``python -m fastvlm.bench.gpu_decode JOB_JSON RESULT_PATH``: write compare_static_decodes(JOB) there."""
    job, result_path = json.loads(argv[0]), Path(argv[1])

    def write(result: dict[str, Any]) -> None:
        partial = result_path.with_suffix(".partial")
        partial.write_text(json.dumps(result) + "\n")
        partial.replace(result_path)  # the parent never reads half a file

    compare_static_decodes(job, write)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
