"""The vLLM lane (``make test-vllm``): runs in .venv-vllm, never in the main lane.

Every test here is marked ``vllm``; the main lane deselects the folder (Makefile).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integrations.vllm.checkpoints import write_checkpoints


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: runs inside vLLM (make test-vllm, in .venv-vllm)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"apple": folder, "hf": folder}: the test model in both released formats (head width 64)."""
    return write_checkpoints(tmp_path_factory.mktemp("vllm-checkpoints"))
