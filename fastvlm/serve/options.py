"""Everything a server is started with, in one frozen dataclass (the CLI's flags map onto it).

Defaults are the safe ones: bind to loopback only, accept images only as ``data:`` URLs,
one image per prompt, bounded queue, batch, active tokens, body size and request time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath

from fastvlm.errors import ConfigError
from fastvlm.serve.feature_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES
from fastvlm.serve.media import MediaPolicy

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 32 * 2**20  # a 20 MiB image is ~27 MiB of base64
DEFAULT_REQUEST_TIMEOUT_S = 600.0
# Prompt tokens (visual included) admitted between two decode steps: the running sequences
# wait while new ones prefill, so a burst of arrivals is admitted in slices of about this
# size (one request always fits, however long).
DEFAULT_MAX_PREFILL_TOKENS = 2048


@dataclass(frozen=True)
class ServeOptions:
    """A server's settings; ``model`` is a checkpoint folder or hub id."""

    model: str
    served_model_name: str | None = None  # default: the checkpoint folder's name
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    device: str = "cpu"
    dtype: str = "fp32"
    image_mode: str | None = None
    api_key: str | None = None  # None: /v1/* is open (fine on loopback; set one before binding elsewhere)
    max_batch_size: int = 16
    max_queue: int = 64
    max_active_tokens: int | None = None  # None: max_batch_size x the model's context
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS  # prompt tokens admitted between two decode steps
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    feature_cache_entries: int = DEFAULT_MAX_ENTRIES
    feature_cache_bytes: int = DEFAULT_MAX_BYTES
    media: MediaPolicy = field(default_factory=MediaPolicy)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self.port}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"the request timeout must be positive, got {self.request_timeout_s}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"the body size limit must be at least 1 KiB, got {self.max_body_bytes} bytes")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key must not be empty")

    @property
    def model_name(self) -> str:
        """The id clients send as ``model`` and ``/v1/models`` lists."""
        return self.served_model_name or PurePath(self.model.rstrip("/")).name or self.model
