"""The image-feature cache: keyed by the image bytes, least recently used out first, bounded twice."""

from __future__ import annotations

import threading

import pytest
import torch

from fastvlm.serve.feature_cache import FeatureCache, image_key


def _features(rows: int = 4, value: float = 0.0) -> torch.Tensor:
    return torch.full((rows, 8), value)  # 4 x 8 fp32 = 128 bytes


def test_the_key_is_the_bytes_hash_and_the_preprocessing():
    assert image_key(b"abc") == image_key(b"abc") != image_key(b"abd")
    assert image_key(b"abc", variant="1024/pad") != image_key(b"abc", variant="512/pad")


def test_a_hit_returns_the_stored_features_and_counts():
    cache = FeatureCache(max_entries=4, max_bytes=10_000)
    assert cache.get("a") is None
    cache.put("a", _features(value=1.0))
    hit = cache.get("a")
    assert hit is not None and torch.equal(hit, _features(value=1.0))
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_the_least_recently_used_entry_leaves_first_when_entries_run_out():
    cache = FeatureCache(max_entries=2, max_bytes=10_000)
    cache.put("a", _features())
    cache.put("b", _features())
    cache.get("a")  # now b is the least recently used
    cache.put("c", _features())
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.stats.evictions == 1


def test_the_memory_bound_evicts_and_an_oversized_tensor_is_not_stored():
    cache = FeatureCache(max_entries=100, max_bytes=300)  # room for two 128-byte tensors
    for key in "abc":
        cache.put(key, _features())
    assert len(cache) == 2 and cache.nbytes == 256 and cache.get("a") is None
    cache.put("huge", _features(rows=100))
    assert cache.get("huge") is None and cache.nbytes == 256


def test_replacing_a_key_keeps_the_byte_count_right():
    cache = FeatureCache(max_entries=4, max_bytes=10_000)
    cache.put("a", _features(rows=4))
    cache.put("a", _features(rows=2))
    assert len(cache) == 1 and cache.nbytes == 64


def test_negative_bounds_are_refused():
    with pytest.raises(ValueError):
        FeatureCache(max_entries=-1)


def test_concurrent_use_keeps_the_bounds():
    cache = FeatureCache(max_entries=8, max_bytes=8 * 128)

    def worker(offset: int) -> None:
        for i in range(200):
            cache.put(f"{offset}-{i % 20}", _features())
            cache.get(f"{offset}-{(i + 3) % 20}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) <= 8 and cache.nbytes == 128 * len(cache)
