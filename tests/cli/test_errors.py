"""How the command line reports errors: user errors as one line (exit 2), bugs with their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastvlm.cli import main
from tests.conftest import fixture_path

REPO = Path(__file__).resolve().parents[2]


def _missing_image_args(tmp_path: Path) -> list[str]:
    model = str(fixture_path("apple_fastvlm_tiny"))
    return ["predict", "--model", model, "--image", str(tmp_path / "missing.png"), "--prompt", "hi"]


def _python(code_or_module: list[str]) -> subprocess.CompletedProcess:
    """Run this repository's fastvlm in a fresh interpreter (the tests' copy first on the path)."""
    path = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *code_or_module], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bug", [RuntimeError, ValueError, OSError, KeyError])
def test_a_bug_in_the_library_keeps_its_traceback(bug, tmp_path, monkeypatch):
    def broken(path):
        raise bug("an internal invariant does not hold")

    monkeypatch.setattr("fastvlm.files.read_state_dict", broken)
    with pytest.raises(bug, match="an internal invariant"):
        main(["info", str(tmp_path / "tower.safetensors")])


def test_a_bug_run_as_a_module_prints_a_traceback(tmp_path):
    code = (
        "import runpy, sys\n"
        "import fastvlm.files\n"
        "def broken(path):\n"
        "    raise ValueError('an internal invariant does not hold')\n"
        "fastvlm.files.read_state_dict = broken\n"
        f"sys.argv = ['fastvlm', 'info', {str(tmp_path / 'tower.safetensors')!r}]\n"
        "runpy.run_module('fastvlm.cli', run_name='__main__')\n"
    )
    done = _python(["-c", code])
    assert done.returncode == 1, done.stderr
    assert "Traceback" in done.stderr and "ValueError: an internal invariant does not hold" in done.stderr
    assert "fastvlm info: error:" not in done.stderr


def test_a_missing_image_is_one_line_and_exit_status_2(tmp_path, capsys):
    assert main(_missing_image_args(tmp_path)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fastvlm predict: error: image file not found") and "missing.png" in lines[0]
    assert captured.out == ""


def test_python_m_fastvlm_cli_reports_a_missing_image_in_one_line(tmp_path):
    done = _python(["-m", "fastvlm.cli", *_missing_image_args(tmp_path)])
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("fastvlm predict: error: image file not found")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    assert main(["--debug", *_missing_image_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ImageError" in err
    assert err.splitlines()[-1].startswith("fastvlm predict: error: image file not found")


def test_a_usage_error_is_one_line(capsys):
    assert main(["eval-rescore", "--out", "nowhere", "--tasks", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("fastvlm eval-rescore: error: unknown task(s)")


def test_ctrl_c_exits_with_status_130(monkeypatch, tmp_path):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr("fastvlm.files.read_state_dict", interrupted)
    assert main(["info", str(tmp_path / "tower.safetensors")]) == 130
