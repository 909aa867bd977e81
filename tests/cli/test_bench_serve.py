"""``fastvlm bench-serve``: bad flags are one-line errors before any server starts; a short run writes its files."""

from __future__ import annotations

import json

import pytest

from fastvlm.cli import main
from tests.conftest import fixture_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "http://example.com:8000"], "only servers on this machine"),
        (["--url", "http://127.0.0.1:9", "--clients", "0"], "each 1 or more"),
        (["--url", "http://127.0.0.1:9", "--clients", "1,4", "--requests-per-client", "1,2,3"], "one per level"),
        (["--url", "http://127.0.0.1:9", "--clients", "1,x"], "whole numbers"),
        (["--url", "http://127.0.0.1:9", "--max-tokens", "0"], "must be positive"),
        (["--url", "http://127.0.0.1:9", "--shared-image-fraction", "1.5"], "between 0 and 1"),
        (["--url", "http://127.0.0.1:9", "--serve-arg=--max-batch-size=4"], "not to --url"),
        (["--url", "http://127.0.0.1:9", "--engine", "vllm"], "not to --url"),
        (["--model", "m", "--vllm-arg=--enforce-eager"], "add --engine vllm"),
    ],
)
def test_bad_flags_are_one_line_errors(args, message, capsys):
    assert main(["bench-serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastvlm bench-serve: error: ") and message in err


def test_a_short_run_writes_the_load_and_soak_reports(tmp_path, capsys):
    out = tmp_path / "serve"
    args = ["bench-serve", "--model", str(fixture_path("apple_fastvlm_tiny")), "--out", str(out)]
    args += ["--clients", "1,2", "--requests-per-client", "2,1", "--image-size", "64", "--max-tokens", "3"]
    args += ["--soak", "10", "--soak-clients", "2", "--soak-warmup", "2", "--serve-arg=--max-batch-size=2"]
    assert main(args) == 0
    load = json.loads((out / "serve_load.json").read_text())
    soak = json.loads((out / "serve_soak.json").read_text())
    assert [(lv["clients"], lv["ok"]) for lv in load["levels"]] == [(1, 2), (2, 2)]
    assert load["meta"]["serve_args"] == ["--max-batch-size=2"] and "load_average_after" in load["meta"]
    assert soak["soak"]["passed"] and (soak["soak"]["valid"], soak["soak"]["invalid"]) == (8, 2)
    assert (soak["meta"]["soak_warmup"], soak["meta"]["soak_warmup_failed"]) == (2, 0)
    printed = capsys.readouterr().out
    assert "# Serving load test" in printed and "**PASSED**" in printed
    assert (out / "serve_load.md").exists() and (out / "serve_soak.md").exists() and (out / "server.log").exists()
