"""A real server for tests: uvicorn on a free 127.0.0.1 port, in a background thread.

The application is the one ``fastvlm serve`` runs (:func:`fastvlm.serve.app.create_app`);
only the process differs, so a test can hand it an already loaded model and stop it
cleanly. :func:`live_server` waits until ``/health`` answers 200.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

from fastvlm.bench.serve_process import free_port
from fastvlm.serve.app import create_app
from fastvlm.serve.options import ServeOptions

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

START_TIMEOUT_S = 60.0


@contextmanager
def live_server(
    model_dir: str, *, model: FastVLM | None = None, resolve: Any = None, wait_ready: bool = True, **options: Any
) -> Iterator[str]:
    """Serve ``model_dir`` (or the loaded ``model``) on 127.0.0.1; yields the base URL."""
    settings = ServeOptions(model=str(model_dir), host="127.0.0.1", port=free_port(), **options)
    app = create_app(settings, model=model, resolve=resolve)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{settings.port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the test server did not start on {base_url}")
            time.sleep(0.02)
        while wait_ready and httpx.get(f"{base_url}/health", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {base_url} did not become healthy")
            time.sleep(0.05)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
