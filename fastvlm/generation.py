"""Text generation with a KV cache and a time-to-first-token breakdown.

TTFT = vision encoding (tower + projector) + LLM prefill (+ picking the first token);
then each decode step feeds one token per sequence through the cache. Batches are
left-padded with explicit position ids, so a batch gives the same tokens as its rows
one by one. The decoder's inputs come from :meth:`fastvlm.model.FastVLM.prepare_inputs`,
the same function forward and the training loss use.

The decoder itself runs in :mod:`fastvlm.decoding` (the prefill and the decode steps).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import DynamicCache

from fastvlm.decoding import DecodeSteps, prefill
from fastvlm.errors import CheckpointError
from fastvlm.processing import (
    DEFAULT_IMAGE_TOKEN,
    TURN_END,
    Conversation,
    ImageInput,
    PromptError,
    build_prompt,
    is_templated,
    pad_sequences,
    tokenize_prompt,
)

if TYPE_CHECKING:  # model.py imports this module lazily; the model types are for annotations only
    from transformers import PreTrainedTokenizerBase

    from fastvlm.model import FastVLM, ModelInputs


# KV positions allocated for the answer up front: enough for most answers, without reserving the
# whole context for a large max_new_tokens (a longer answer doubles the buffers as it goes)
ANSWER_ROOM = 512


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

    def as_dict(self) -> dict[str, float | int]:
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


@dataclass
class Sampler:
    """Next token per row: argmax when temperature is 0, else nucleus sampling."""

    temperature: float
    top_p: float | None
    generator: torch.Generator | None

    @classmethod
    def seeded(cls, temperature: float, top_p: float | None, seed: int | None, device: torch.device) -> Sampler:
        """A sampler whose draws repeat for the same ``seed`` (None: the global generator)."""
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        return cls(temperature, top_p, generator)

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax (temperature 0), which needs no logits but the largest."""
        return self.temperature <= 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p is not None and 0 < self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < self.top_p  # always keeps the most likely token
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def stop_token_ids(model: FastVLM) -> set[int]:
    """Token ids that end an answer: the config's and generation config's EOS, and the end of turn."""
    eos = (model.config.text.eos_token_id, getattr(model, "generation_eos_token_id", None))
    return end_of_answer_ids(model.tokenizer, *eos)


def end_of_answer_ids(tok: PreTrainedTokenizerBase | None, *eos: int | list[int] | None) -> set[int]:
    """The ``eos`` ids (each an id, a list of ids or None), and the tokenizer's end of turn and EOS."""
    ids: set[int] = set()
    for value in eos:
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tok is not None:
        end = tok.convert_tokens_to_ids(TURN_END)
        if isinstance(end, int) and end != tok.unk_token_id:
            ids.add(end)
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
    return ids


def _room_in_context(model: FastVLM, inputs: ModelInputs, max_new_tokens: int) -> int:
    """``max_new_tokens``, capped so that prompt + answer fit in the context; a PromptError if the prompt does not."""
    prompt_len = inputs.input_ids.shape[1]
    context = model.config.context_length
    if prompt_len > context:
        raise PromptError(
            f"the prompt is {prompt_len} tokens long ({inputs.tokens_per_image} per image included) but the "
            f"model's context holds {context}; shorten the prompt"
        )
    return min(max_new_tokens, context - prompt_len)


@torch.inference_mode()
def generate_tokens(
    model: FastVLM,
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

    ``input_ids`` [B, L] use either image-marker convention (see :class:`fastvlm.model.FastVLM`);
    rows may be left-padded (``attention_mask``). Images come as ``pixel_values`` [N, 3, S, S]
    or ``image_features`` [N, T, H]. Finished rows keep yielding ``pad_token_id``.
    """
    device = model.device
    timings = Timings()
    start = time.perf_counter()
    if image_features is None and pixel_values is not None:
        image_features = model.encode_images(pixel_values)
        _sync(device)
        timings.vision_ms = (time.perf_counter() - start) * 1e3
    prefill_start = time.perf_counter()
    inputs = model.prepare_inputs(
        input_ids, attention_mask, image_features=image_features, padding_side="left", pad_token_id=pad_token_id
    )
    max_new_tokens = _room_in_context(model, inputs, max_new_tokens)
    timings.visual_tokens = int(model.image_positions(inputs.input_ids).sum())
    timings.prompt_tokens = int(inputs.attention_mask.sum(-1).max())
    sample = Sampler.seeded(temperature, top_p, seed, device)
    cache, logits = prefill(model, inputs)
    token = sample(logits)
    _sync(device)
    now = time.perf_counter()
    timings.prefill_ms = (now - prefill_start) * 1e3
    timings.ttft_ms = (now - start) * 1e3  # from encoded pixels; image decoding/resizing is not included
    stop = torch.tensor(sorted(stop_ids or []), device=device, dtype=torch.long)
    yield from _decode(
        model,
        cache,
        token,
        inputs,
        sample=sample,
        stop=stop,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        timings=timings,
    )


def _decode(
    model: FastVLM,
    cache: DynamicCache,
    token: torch.Tensor,
    inputs: ModelInputs,
    *,
    sample: Sampler,
    stop: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int,
    timings: Timings,
) -> Iterator[tuple[torch.Tensor, Timings]]:
    """The decode loop after the prefill picked ``token`` [B]: one token per row per step."""
    mask = inputs.attention_mask  # [B, L], grows by one column per step
    next_pos = inputs.position_ids[:, -1:] + 1  # [B, 1]
    finished = torch.zeros_like(token, dtype=torch.bool)
    decoded = 0  # tokens produced by decode steps for rows still generating
    steps = DecodeSteps(model, cache, capacity=mask.shape[1] + min(max_new_tokens, ANSWER_ROOM))
    for step in range(max_new_tokens):
        token = token.masked_fill(finished, pad_token_id)
        timings.new_tokens = step + 1
        yield token, timings
        finished |= torch.isin(token, stop)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        step_start = time.perf_counter()  # the caller's time between tokens is not decode time
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        if sample.greedy:
            token = steps.greedy(token[:, None], mask, next_pos)
        else:
            token = sample(steps(token[:, None], mask, next_pos))
        next_pos = next_pos + 1
        _sync(model.device)
        timings.decode_ms += (time.perf_counter() - step_start) * 1e3
        decoded += int((~finished).sum())
        timings.decode_tokens_per_s = decoded / max(timings.decode_ms / 1e3, 1e-9)


# ---------------------------------------------------------------------------------- text API


def _as_list(value: ImageInput | Sequence[ImageInput | None] | None, n: int) -> list[ImageInput | None]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise PromptError(f"got {n} prompts but {len(value)} images; pass one image (or None) per prompt")
        return list(value)
    return [cast("ImageInput | None", value)] * n  # one image (or None) for every prompt


def prepare_prompt(prompt: str, has_image: bool) -> str:
    """Wrap a bare question in the chat template; check the placeholders against the images."""
    if not is_templated(prompt):
        prompt = build_prompt(prompt, with_image=has_image)
    n = prompt.count(DEFAULT_IMAGE_TOKEN)
    if n != int(has_image):
        raise PromptError(
            f"the prompt has {n} <image> placeholder(s) for {int(has_image)} image(s); "
            "use exactly one <image> per image"
        )
    return prompt


def _tokenizer(model: FastVLM) -> PreTrainedTokenizerBase:
    if model.tokenizer is None:
        raise CheckpointError("this model has no tokenizer (the checkpoint folder had none); pass token ids instead")
    return model.tokenizer


def _detokenize(tok: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return cast(str, tok.decode(ids, skip_special_tokens=True))  # a str for a list of ids


def _tokenize_batch(model: FastVLM, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded ids and mask of the prompts, and the pad id used."""
    tok = _tokenizer(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = pad_sequences([tokenize_prompt(tok, p) for p in prompts], pad, "left")
    return ids, mask, pad


class TextStream:
    """Iterator of decoded text pieces; ``.result`` holds the whole answer once exhausted."""

    def __init__(self, model: FastVLM, steps: Iterator[tuple[torch.Tensor, Timings]], stop_ids: set[int]) -> None:
        self.model, self.steps, self.stop_ids = model, steps, stop_ids
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        tok = _tokenizer(self.model)
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
            text = _detokenize(tok, ids)
            if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
                yield text[len(emitted) :]
                emitted = text
        text = _detokenize(tok, ids)
        if len(text) > len(emitted):
            yield text[len(emitted) :]
        self.result = GenerationResult(text=text, token_ids=ids, timings=timings, finish_reason=finish)


def _collect(
    model: FastVLM, steps: Iterator[tuple[torch.Tensor, Timings]], n: int, stops: set[int]
) -> list[GenerationResult]:
    """Run the steps to the end: each row's tokens up to its first stop token."""
    rows: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
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
    tok = _tokenizer(model)
    return [
        GenerationResult(text=_detokenize(tok, r), token_ids=r, timings=timings, finish_reason=f)
        for r, f in zip(rows, finish, strict=True)
    ]


def generate(
    model: FastVLM,
    image: ImageInput | Sequence[ImageInput | None] | None = None,
    prompt: str | Sequence[str] | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    stream: bool = False,
    seed: int | None = None,
    image_features: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
) -> GenerationResult | list[GenerationResult] | TextStream:
    """Answer ``prompt`` about ``image``.

    ``prompt`` is a question (wrapped in the qwen_2 chat template with the image first)
    or an already templated prompt with ``<image>`` where the image goes. ``image`` is a
    path, PIL image, array or tensor, decoded by the model's image processor. Lists of
    prompts (and one image per prompt) run as one left-padded batch and return a list of
    results. Greedy unless ``temperature`` > 0. With ``stream=True`` (one prompt) a
    :class:`TextStream` is returned. Instead of ``image``, every prompt's image may be
    given as ``pixel_values`` [N, 3, S, S] (e.g. ``model.image_processor.preprocess(img)[None]``
    for an image :func:`fastvlm.processing.load_image` already decoded) or as projected
    ``image_features`` [N, T, H].
    """
    if prompt is None:
        raise PromptError("generate() needs a prompt")
    if stream and not isinstance(prompt, str):
        raise PromptError("stream=True takes a single prompt, not a batch")
    batched = not isinstance(prompt, str)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    images = _as_list(image, len(prompts)) if batched else [cast("ImageInput | None", image)]
    given = image_features is not None or pixel_values is not None
    has_image = [True] * len(prompts) if given else [img is not None for img in images]
    texts = [prepare_prompt(p, h) for p, h in zip(prompts, has_image, strict=True)]
    ids, mask, pad = _tokenize_batch(model, texts)
    if not given and any(has_image):
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
        return TextStream(model, steps, stops)
    results = _collect(model, steps, len(prompts), stops)
    return results if batched else results[0]


class ChatSession:
    """A conversation about one image whose visual tokens are computed once and reused every turn."""

    def __init__(self, model: FastVLM, image: ImageInput | None = None, *, system: str | None = None) -> None:
        self.model = model
        self.conversation = Conversation() if system is None else Conversation(system=system)
        self.image_features: torch.Tensor | None = None
        self.vision_ms = 0.0
        if image is not None:
            start = time.perf_counter()
            pixels = model.image_processor(image)[None]
            with torch.inference_mode():
                self.image_features = model.encode_images(pixels)
            self.vision_ms = (time.perf_counter() - start) * 1e3

    def ask(self, question: str, **kwargs: Any) -> GenerationResult | TextStream:
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
        assert isinstance(answer, GenerationResult)  # one prompt, one result
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
        assert self.result is not None  # set when the stream is exhausted
        self.session.conversation.add("assistant", self.result.text)
