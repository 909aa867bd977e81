"""From a validated chat request to an engine request, and back to features worth keeping.

This is the part of serving that is neither HTTP nor batching: fetching and decoding the
request's images under the media policy, looking their features up in the feature cache
(a hit skips the encoder: the second turn about the same picture, or the same picture
from another client), tokenising the conversation, and submitting to the
:class:`~fastvlm.serve.engine.Engine`. After the engine has encoded a request's images,
:meth:`ChatService.remember` stores their features for next time.

Everything here blocks (image decoding, tokenising); the HTTP layer calls
:meth:`ChatService.prepare` from a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fastvlm.errors import CheckpointError
from fastvlm.processing import DEFAULT_IMAGE_TOKEN, Conversation, tokenize_prompt
from fastvlm.serve.engine import Engine, EventSink, GenerationRequest, RequestHandle
from fastvlm.serve.feature_cache import FeatureCache, image_key
from fastvlm.serve.media import MediaPolicy, Resolver, check_image_count, load_media

if TYPE_CHECKING:
    from fastvlm.model import FastVLM
    from fastvlm.serve.protocol import ChatRequest


@dataclass
class PreparedChat:
    """An engine request, the feature-cache keys of its images, and how many prompt tokens were cached."""

    request: GenerationRequest
    cache_keys: list[str] = field(default_factory=list)
    cached_tokens: int = 0


class ChatService:
    """Prepares chat requests for one model's engine and keeps image features between requests."""

    def __init__(
        self,
        model: FastVLM,
        engine: Engine,
        *,
        media: MediaPolicy,
        feature_cache: FeatureCache | None = None,
        request_timeout_s: float | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        if model.tokenizer is None:
            raise CheckpointError("serving needs a tokenizer, and this checkpoint folder has none")
        self.model, self.engine, self.media = model, engine, media
        self.feature_cache, self.request_timeout_s, self.resolve = feature_cache, request_timeout_s, resolve
        processor = model.image_processor
        # Features depend on the bytes and on how they are preprocessed and encoded.
        self.cache_variant = f"{processor.size}:{processor.mode}:{model.dtype}"

    def prepare(self, chat: ChatRequest) -> PreparedChat:
        """Fetch and decode the images, look up their features, tokenise; MediaError/PromptError on bad input."""
        check_image_count(len(chat.image_urls), self.media)
        loaded = [load_media(url, self.media, resolve=self.resolve) for url in chat.image_urls]
        keys = [image_key(raw, variant=self.cache_variant) for _, raw in loaded]
        cached = [self.feature_cache.get(key) for key in keys] if self.feature_cache is not None else []
        sampling = chat.sampling
        request = GenerationRequest(
            input_ids=tokenize_prompt(self.model.tokenizer, chat.prompt),  # type: ignore[arg-type]
            max_new_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
            timeout_s=self.request_timeout_s,
        )
        prepared = PreparedChat(request=request, cache_keys=keys if self.feature_cache is not None else [])
        if loaded and cached and all(c is not None for c in cached):
            request.image_features = torch.stack([c for c in cached if c is not None])
            prepared.cached_tokens = len(cached) * self.engine.tokens_per_image
        elif loaded:
            processor = self.model.image_processor
            request.pixel_values = torch.stack([processor.preprocess(image) for image, _ in loaded])
        return prepared

    def warm_up(self) -> None:
        """Run one short image request through encoder, prefill and decode, and forget it.

        The first request of a process pays one-time costs (kernel and algorithm choices,
        allocator growth, lazy initialisation); a server does this before it reports healthy,
        so that no client's first answer pays them.
        """
        processor = self.model.image_processor
        ids = tokenize_prompt(self.model.tokenizer, Conversation().add("user", f"{DEFAULT_IMAGE_TOKEN}\nHi").prompt())  # type: ignore[arg-type]
        pixels = torch.zeros(1, 3, processor.size, processor.size, dtype=torch.float32)
        request = GenerationRequest(input_ids=ids, pixel_values=pixels, max_new_tokens=2, ignore_eos=True)
        self.engine.submit(request).tokens()

    def submit(self, prepared: PreparedChat, events: EventSink | None = None) -> RequestHandle:
        """Queue the request (PromptError: it cannot fit; QueueFullError: the queue is full)."""
        return self.engine.submit(prepared.request, events)

    def remember(self, prepared: PreparedChat, handle: RequestHandle) -> None:
        """Keep the features the engine computed for this request's images (no-op on a cache hit)."""
        features = handle.image_features
        if self.feature_cache is None or features is None or len(features) != len(prepared.cache_keys):
            return
        for key, image_features in zip(prepared.cache_keys, features, strict=True):
            self.feature_cache.put(key, image_features)
