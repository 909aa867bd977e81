"""Text generation with a KV cache and a time-to-first-token breakdown.

TTFT = vision encoding (tower + projector) + LLM prefill (+ picking the first token);
then each decode step feeds one token per sequence through the cache. Batches are
left-padded with explicit position ids, so a batch gives the same tokens as its rows
one by one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache

from fastvlm.processing import (
    DEFAULT_IMAGE_TOKEN,
    Conversation,
    ImageInput,
    PromptError,
    build_prompt,
    pad_sequences,
    tokenize_prompt,
)


@dataclass
class Timings:
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    visual_tokens: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    timings: Timings = field(default_factory=Timings)
    finish_reason: str = "length"  # "stop" (end-of-turn token) or "length"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _select(logits: torch.Tensor, temperature: float, top_p: float | None, generator) -> torch.Tensor:
    """Next token per row: argmax when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stop_token_ids(model) -> set[int]:
    ids = set()
    for eos in (model.config.text.eos_token_id, getattr(model, "generation_eos_token_id", None)):
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    tok = model.tokenizer
    if tok is not None:
        end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end, int) and end != tok.unk_token_id:
            ids.add(end)
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
    return ids


@torch.inference_mode()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    pixel_values: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    stop_ids: set[int] | None = None,
    pad_token_id: int = 0,
    seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, Timings]]:
    """Yield the next token of every row ([B]) and the timings so far, step by step.

    ``input_ids`` use either image-marker convention (see :class:`fastvlm.model.FastVLM`);
    rows may be left-padded (``attention_mask``). Finished rows keep yielding ``pad_token_id``.
    """
    device = model.device
    timings = Timings()
    start = time.perf_counter()
    if image_features is None and pixel_values is not None:
        image_features = model.encode_images(pixel_values)
        _sync(device)
        timings.vision_ms = (time.perf_counter() - start) * 1e3
    n_tokens = image_features.shape[1] if image_features is not None else model.config.num_image_tokens()
    ids, mask, _ = model.expand_image_markers(
        input_ids.to(device),
        None if attention_mask is None else attention_mask.to(device),
        n_tokens,
        pad_token_id=pad_token_id,
        padding_side="left",
    )
    prompt_len = ids.shape[1]
    context = model.config.context_length
    if prompt_len > context:
        raise PromptError(
            f"the prompt is {prompt_len} tokens long ({n_tokens} per image included) but the model's context "
            f"holds {context}; shorten the prompt"
        )
    max_new_tokens = min(max_new_tokens, context - prompt_len)
    timings.visual_tokens = int(model.image_positions(ids).sum())
    timings.prompt_tokens = int(mask.sum(-1).max())
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(stop_ids or []), device=device, dtype=torch.long)

    prefill_start = time.perf_counter()
    embeds = model.embed(ids, image_features)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model.language_model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    token = _select(out.logits[:, -1], temperature, top_p, generator)
    _sync(device)
    now = time.perf_counter()
    timings.prefill_ms = (now - prefill_start) * 1e3
    timings.ttft_ms = (now - start) * 1e3  # from encoded pixels; image decoding/resizing is not included
    finished = torch.zeros_like(token, dtype=torch.bool)
    next_pos = position_ids[:, -1:] + 1
    decoded = 0  # tokens produced by decode steps for rows still generating
    for step in range(max_new_tokens):
        token = token.masked_fill(finished, pad_token_id)
        timings.new_tokens = step + 1
        yield token, timings
        finished |= torch.isin(token, stop)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        step_start = time.perf_counter()  # the caller's time between tokens is not decode time
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model.language_model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        next_pos = next_pos + 1
        token = _select(out.logits[:, -1], temperature, top_p, generator)
        _sync(device)
        timings.decode_ms += (time.perf_counter() - step_start) * 1e3
        decoded += int((~finished).sum())
        timings.decode_tokens_per_s = decoded / max(timings.decode_ms / 1e3, 1e-9)


# ---------------------------------------------------------------------------------- text API


def _as_list(value, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"got {n} prompts but {len(value)} images; pass one image (or None) per prompt")
        return list(value)
    return [value] * n


def prepare_prompt(prompt: str, has_image: bool) -> str:
    """Wrap a bare question in the chat template; check the placeholders against the images."""
    if "<|im_start|>" not in prompt:
        prompt = build_prompt(prompt, with_image=has_image)
    n = prompt.count(DEFAULT_IMAGE_TOKEN)
    if n != int(has_image):
        raise PromptError(
            f"the prompt has {n} <image> placeholder(s) for {int(has_image)} image(s); "
            "use exactly one <image> per image"
        )
    return prompt


def _tokenize_batch(model, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded ids and mask of the prompts, and the pad id used."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer (the checkpoint folder had none); pass token ids instead")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return *pad_sequences([tokenize_prompt(tok, p) for p in prompts], pad, "left"), pad


class TextStream:
    """Iterator of decoded text pieces; ``.result`` holds the whole answer once exhausted."""

    def __init__(self, model, steps: Iterator[tuple[torch.Tensor, Timings]], stop_ids: set[int]) -> None:
        self.model, self.steps, self.stop_ids = model, steps, stop_ids
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        tok = self.model.tokenizer
        ids: list[int] = []
        emitted = ""
        timings = Timings()
        finish = "length"
        for token, step_timings in self.steps:
            timings = step_timings
            t = int(token[0])
            if t in self.stop_ids:
                finish = "stop"
                break
            ids.append(t)
            text = tok.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
                yield text[len(emitted) :]
                emitted = text
        text = tok.decode(ids, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted) :]
        self.result = GenerationResult(text=text, token_ids=ids, timings=timings, finish_reason=finish)


def generate(
    model,
    image: ImageInput | Sequence[ImageInput | None] | None = None,
    prompt: str | Sequence[str] | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    stream: bool = False,
    seed: int | None = None,
    image_features: torch.Tensor | None = None,
):
    """Answer ``prompt`` about ``image``.

    ``prompt`` is a question (wrapped in the qwen_2 chat template with the image first)
    or an already templated prompt with ``<image>`` where the image goes. ``image`` is a
    path, PIL image, array or tensor. Lists of prompts (and one image per prompt) run as
    one left-padded batch and return a list of results. Greedy unless ``temperature`` > 0.
    With ``stream=True`` (one prompt) a :class:`TextStream` is returned.
    """
    if prompt is None:
        raise ValueError("generate() needs a prompt")
    batched = not isinstance(prompt, str)
    prompts = list(prompt) if batched else [prompt]
    images = _as_list(image, len(prompts)) if batched else [image]
    has_image = [img is not None for img in images] if image_features is None else [True] * len(prompts)
    texts = [prepare_prompt(p, h) for p, h in zip(prompts, has_image, strict=True)]
    ids, mask, pad = _tokenize_batch(model, texts)
    pixel_values = None
    if image_features is None and any(has_image):
        pixel_values = model.image_processor.batch([img for img in images if img is not None])
    stops = stop_token_ids(model)
    steps = generate_tokens(
        model,
        ids,
        mask,
        pixel_values=pixel_values,
        image_features=image_features,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_ids=stops,
        pad_token_id=pad,
        seed=seed,
    )
    if stream:
        if batched:
            raise ValueError("stream=True takes a single prompt, not a batch")
        return TextStream(model, steps, stops)
    rows: list[list[int]] = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    timings = Timings()
    for token, step_timings in steps:
        timings = step_timings
        for i, t in enumerate(token.tolist()):
            if finish[i] == "stop":
                continue
            if t in stops:
                finish[i] = "stop"
            else:
                rows[i].append(t)
    results = [
        GenerationResult(
            text=model.tokenizer.decode(r, skip_special_tokens=True), token_ids=r, timings=timings, finish_reason=f
        )
        for r, f in zip(rows, finish, strict=True)
    ]
    return results if batched else results[0]


class ChatSession:
    """A conversation about one image whose visual tokens are computed once and reused every turn."""

    def __init__(self, model, image: ImageInput | None = None, *, system: str | None = None) -> None:
        self.model = model
        self.conversation = Conversation() if system is None else Conversation(system=system)
        self.image_features = None
        self.vision_ms = 0.0
        if image is not None:
            start = time.perf_counter()
            pixels = model.image_processor(image)[None]
            with torch.inference_mode():
                self.image_features = model.encode_images(pixels)
            self.vision_ms = (time.perf_counter() - start) * 1e3

    def ask(self, question: str, **kwargs) -> GenerationResult | TextStream:
        """Add a user turn and answer it (kwargs as for :func:`generate`; ``stream=True`` streams)."""
        first = not self.conversation.messages
        if DEFAULT_IMAGE_TOKEN in question:
            raise PromptError("do not put <image> in a chat turn; the session places the image itself")
        text = f"{DEFAULT_IMAGE_TOKEN}\n{question}" if first and self.image_features is not None else question
        self.conversation.add("user", text)
        prompt = self.conversation.prompt()
        try:
            answer = generate(self.model, prompt=prompt, image_features=self.image_features, **kwargs)
        except Exception:
            self.conversation.messages.pop()
            raise
        if isinstance(answer, TextStream):
            return _RecordingStream(answer, self)
        self.conversation.add("assistant", answer.text)
        return answer


class _RecordingStream(TextStream):
    """A TextStream that appends the finished answer to its chat session."""

    def __init__(self, inner: TextStream, session: ChatSession) -> None:
        super().__init__(inner.model, inner.steps, inner.stop_ids)
        self.session = session

    def __iter__(self) -> Iterator[str]:
        try:
            yield from super().__iter__()
        except BaseException:
            self.session.conversation.messages.pop()  # the failed user turn leaves no trace
            raise
        self.session.conversation.add("assistant", self.result.text)
