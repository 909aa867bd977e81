"""Projected image features, kept by the hash of the image's bytes (LRU, bounded twice).

FastVLM's time to first token is vision encoding plus prefill; on a CPU the encoder is
most of it at high resolution. The second turn of a conversation resends the same image,
and several clients often send the same one, so the server keys the encoder's output by
the SHA-256 of the image bytes and skips the encoder on a hit. The cache is bounded both
by entries and by bytes of tensor memory, evicting the least recently used first, so a
stream of distinct images cannot grow the server's memory.

The key includes anything besides the bytes that changes the features (the model's input
resolution and image mode), so one cache never serves features of another preprocessing.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from fastvlm.errors import ConfigError

DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 256 * 2**20  # a 0.5B model's 256 x 896 fp32 features are 0.9 MiB each


def image_key(image_bytes: bytes, *, variant: str = "") -> str:
    """The cache key of an image: SHA-256 of its bytes, plus what else changes its features."""
    digest = hashlib.sha256(image_bytes).hexdigest()
    return f"{variant}:{digest}" if variant else digest


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class FeatureCache:
    """A thread-safe LRU map from image keys to feature tensors ``[T, hidden]``.

    Tensors are stored detached; a tensor larger than ``max_bytes`` on its own is not
    stored at all (it would evict everything and then itself).
    """

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 0 or max_bytes < 0:
            bounds = f"{max_entries} entries, {max_bytes} bytes"
            raise ConfigError(f"the feature cache bounds must not be negative, got {bounds}")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory held now."""
        return self._bytes

    def get(self, key: str) -> torch.Tensor | None:
        """The features stored under ``key`` (marking them recently used), or None."""
        with self._lock:
            features = self._items.get(key)
            if features is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store ``features`` under ``key``, evicting the least recently used beyond the bounds."""
        size = features.numel() * features.element_size()
        if size > self.max_bytes or self.max_entries == 0:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._items[key] = features.detach()
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
                self.stats.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
