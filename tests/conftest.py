"""Shared test helpers: the golden fixtures beside the repository and the tolerance rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(os.environ.get("FASTVLM_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


def fixture_path(*parts: str) -> Path:
    """Path inside ../shared/fixtures; a missing fixture is an error, never a skip."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"golden fixture {path} is missing; the tests need ../shared/fixtures beside the repository "
            "(or FASTVLM_FIXTURES pointing at it)"
        )
    return path


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor) -> None:
    """The fixtures' rule: max |a - b| <= 1e-4 * max(1, max |b|)."""
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    bound = 1e-4 * max(1.0, reference.abs().max().item())
    diff = (actual.float() - reference.float()).abs().max().item()
    assert diff <= bound, f"max abs diff {diff:.3e} exceeds {bound:.3e}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "js: an exported ONNX folder loaded by Transformers.js in Node (make test-js; needs node and npm)",
    )


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
