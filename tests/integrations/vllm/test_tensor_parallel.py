"""Tensor parallelism on vLLM's CPU backend: size 2 gives the tokens of size 1.

Each rank holds the whole vision tower and half of every decoder layer; the image
features are computed on every rank and the decoder's partial sums are reduced across
them. vLLM's CPU backend binds each worker's threads to cores and, on a machine with
one NUMA node, needs the binding spelled out: one core per rank here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from vllm import LLM, SamplingParams

from fastvlm.processing import build_prompt

QUESTIONS = ["Describe the image.", "What colour is it?", "Is there text?"]


def generate(folder: Path, tensor_parallel_size: int) -> list[list[int]]:
    llm = LLM(
        model=str(folder),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        tensor_parallel_size=tensor_parallel_size,
    )
    try:
        requests = [
            {"prompt": build_prompt(q), "multi_modal_data": {"image": Image.new("RGB", (200, 100 + 50 * i), color)}}
            for i, (q, color) in enumerate(zip(QUESTIONS, [(255, 0, 0), (0, 128, 0), (20, 20, 200)], strict=True))
        ]
        outs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_tensor_parallel_2_matches_1(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert (os.cpu_count() or 1) >= 2, "tensor parallelism on CPU needs a core per rank"
    single = generate(checkpoints["hf"], 1)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert generate(checkpoints["hf"], 2) == single
    assert len({tuple(t) for t in single}) == len(single)  # the answers differ: the comparison is not vacuous
