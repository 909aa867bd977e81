"""Serving FastVLM behind an OpenAI-compatible HTTP API (issue 12, in progress).

The request/response layer is kept free of HTTP framework types so that other engines
(the vLLM integration) can reuse it: :mod:`fastvlm.serve.media` turns image references
from requests into decoded images under explicit safety limits.
"""
