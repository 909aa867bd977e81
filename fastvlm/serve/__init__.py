"""Serving FastVLM behind an OpenAI-compatible HTTP API (``fastvlm serve``).

Layers, top to bottom: :mod:`~fastvlm.serve.app` (FastAPI routes, auth, errors, SSE) ->
:mod:`~fastvlm.serve.completions` and :mod:`~fastvlm.serve.text` (engine events to text
pieces, usage, timings) -> :mod:`~fastvlm.serve.service` (media, feature cache, tokens) ->
:mod:`~fastvlm.serve.engine` and :mod:`~fastvlm.serve.batch` (continuous batching).
:mod:`~fastvlm.serve.protocol` and :mod:`~fastvlm.serve.media` know nothing of HTTP
frameworks, so other engines (the vLLM integration) can reuse them.
"""
