"""``fastvlm tune-precision`` and ``--dtype auto``: the cached choice, its table, and a model that uses it.

The cache is filled first by :func:`tune_precision` with a timer that reports every candidate
as fast as fp32 (so fp32 is kept everywhere, whatever this machine's real speeds), and the
commands must then read that entry instead of measuring.
"""

from __future__ import annotations

import json

import pytest

from fastvlm.cli import main
from fastvlm.model import FastVLM
from fastvlm.precision import tune_precision
from fastvlm.precision.cache import CACHE_DIR_ENV, CACHE_FILE
from tests.conftest import fixture_path

TINY = "apple_fastvlm_tiny"


@pytest.fixture
def cached(monkeypatch, tmp_path):
    """A cache in ``tmp_path`` (also the default one, through the environment) with the fixture's entry."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))

    def as_fast_as_fp32(fns, device):
        return {name: 10.0 for name in fns}

    return tune_precision(FastVLM.from_pretrained(fixture_path(TINY)), timer=as_fast_as_fp32)


def test_tune_precision_prints_the_cached_table_and_json(cached, capsys):
    assert main(["tune-precision", str(fixture_path(TINY))]) == 0
    out = capsys.readouterr().out
    assert "encoder fp32, decoder fp32 (cached in" in out
    assert "| stage | candidate |" in out and "| top-1 agreement | max logit diff |" in out
    assert out.count("\n| decoder |") == len([r for r in cached.rows if r.stage == "decoder"])
    assert main(["tune-precision", str(fixture_path(TINY)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["key"] == cached.key and report["cache"].endswith(CACHE_FILE)
    assert (report["encoder"], report["decoder"]) == ("fp32", "fp32")
    assert report["rows"] == json.loads(json.dumps(cached.to_json()))["rows"]


def test_predict_with_dtype_auto_uses_the_cached_choice(cached, capsys):
    golden = json.loads(fixture_path(TINY, "golden.json").read_text())
    args = ["predict", "--model", str(fixture_path(TINY)), "--image", str(fixture_path(TINY, "image.png"))]
    args += ["--prompt", golden["question"], "--max-new-tokens", "12", "--json", "--dtype", "auto"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == golden["greedy_token_ids"]


def test_dtype_auto_with_quantization_is_a_usage_error(capsys):
    args = ["predict", "--model", str(fixture_path(TINY)), "--prompt", "hi"]
    args += ["--dtype", "auto", "--quantization", "int8"]
    assert main(args) == 2
    assert "drop quantization" in capsys.readouterr().err
