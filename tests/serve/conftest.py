"""Serving tests: the ``browser`` marker for the page's real-browser lane (``make test-browser``)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "browser: drives the page in headless Chromium (make test-browser; needs `apt-get install chromium`)",
    )
