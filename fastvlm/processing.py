"""Images and prompts, prepared exactly as the reference implementations prepare them.

Images: the authors' path (``image_aspect_ratio: pad``) pads to a square with black,
centred, resizes bicubically to the tower's input side and divides by 255 (no mean/std:
the released processor has mean 0 and std 1). transformers' alternative resizes the
shortest edge and centre-crops. Both read EXIF orientation and accept grayscale,
RGBA, palette, CMYK and 16-bit images.

Prompts: the ``qwen_2`` ChatML template of the authors' LLaVA fork, rendered only by
:meth:`Conversation.segments` (inference prompts and training records alike); tokenised
chunk by chunk around each ``<image>`` (``tokenizer_image_token``), with one ``-200``
marker per image, which the model expands to the image's visual tokens.

``ImageError`` and ``PromptError`` live in :mod:`fastvlm.errors` and are re-exported here.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fastvlm.errors import ConfigError, ImageError, ImageTooLargeError
from fastvlm.errors import PromptError as PromptError  # re-exported: `from fastvlm.processing import PromptError`

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IMAGE_TOKEN_INDEX = -200  # the authors' in-sequence image marker (LLaVA's IMAGE_TOKEN_INDEX)
IGNORE_INDEX = -100  # label of positions without a target (PyTorch's cross-entropy ignore_index)
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused unless allowed (decompression bombs)
SYSTEM_PROMPT = "You are a helpful assistant."
# ChatML turn delimiters of the qwen_2 template
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
ROLES = ("user", "assistant")

_ORIENTATION_INFO = ("exif", "xmp", "XML:com.adobe.xmp")  # where PIL keeps the orientation exif_transpose reads
_PIL_LIMIT_LOCK = threading.Lock()  # guards the swap of PIL's global pixel limit in load_image

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor


# ------------------------------------------------------------------------------------- images


def load_image(
    image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, exif_transpose: bool = True
) -> Image.Image:
    """Open ``image`` as an upright 8-bit RGB PIL image, with clear errors for bad files.

    ``max_pixels`` guards against decompression bombs (None disables the guard).
    ``exif_transpose=False`` keeps the stored orientation (benchmarks were scored that way).
    A tensor or array is taken as already decoded: HWC or CHW, uint8 or float in [0, 1].
    """
    if isinstance(image, Image.Image):
        img = image
        _check_size(img, max_pixels, getattr(img, "filename", None) or "image")
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        return _array_to_pil(image)
    else:
        path: str | Path
        source: io.BytesIO | Path
        if isinstance(image, (bytes, bytearray)):  # an encoded file held in memory (e.g. a parquet cell)
            path, source = "(encoded bytes)", io.BytesIO(image)
        else:
            path = source = Path(image)
            if not source.is_file():
                raise ImageError(f"image file not found: {path}")
        # Our max_pixels check below replaces PIL's guard, a module global; open() reads the header only.
        # The swap is under a lock: two threads interleaving it would leave PIL's guard off for good.
        with _PIL_LIMIT_LOCK:
            pil_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(source)
            except (UnidentifiedImageError, OSError) as err:
                raise ImageError(f"cannot read image {path}: not an image file PIL can decode ({err})") from None
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
        _check_size(img, max_pixels, path)
        try:
            img.load()
        except (OSError, SyntaxError) as err:
            raise ImageError(f"cannot read image {path}: the file is truncated or corrupt ({err})") from None
    if exif_transpose:
        return to_rgb(ImageOps.exif_transpose(img))
    return _without_orientation(to_rgb(img))


def _without_orientation(img: Image.Image) -> Image.Image:
    """``img`` with its orientation metadata dropped, so that no later step rotates it after all.

    A PIL image passed on (to ``generate``, to vLLM) is decoded again by :func:`load_image`,
    which would apply the EXIF/XMP orientation the caller chose to keep stored.
    """
    if not any(key in img.info for key in _ORIENTATION_INFO) and 0x0112 not in img.getexif():
        return img
    img = img.copy()
    for key in _ORIENTATION_INFO:
        img.info.pop(key, None)
    img.getexif().pop(0x0112, None)
    return img


def _check_size(img: Image.Image, max_pixels: int | None, name: object) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"{name} is empty ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{name} has {w}x{h} = {w * h / 1e6:.0f} MP, more than the {max_pixels / 1e6:.0f} MP allowed "
            "(a guard against decompression bombs); pass max_pixels=None (--allow-large-images) to allow it"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode (16/32-bit integer and float images are rescaled to 8 bits)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif img.mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        scale = 65535 if arr.max(initial=0) > 255 else 255
        img = Image.fromarray((np.clip(arr, 0, scale) * 255 // scale).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray((np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _array_to_pil(array: np.ndarray | torch.Tensor) -> Image.Image:
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ImageError(f"expected an image array of shape HxW, HxWxC or CxHxW with C in 1/3/4, got {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ImageError("a float image array must hold values in [0, 1]")
        arr = (arr.astype(np.float32) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Pad the short side so the image is square, the original centred (LLaVA's ``expand2square``)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_and_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shortest edge to ``size`` (bicubic), then a centred ``size`` x ``size`` crop (CLIPImageProcessor)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


@dataclass
class ImageProcessor:
    """Image -> float tensor [3, size, size] in [0, 1].

    ``mode="pad"`` is the authors' path (pad to square with black, then resize);
    ``mode="crop"`` is transformers' (shortest-edge resize, centre crop). Calling the
    processor decodes the image with :func:`load_image`; :meth:`preprocess` takes an image
    that :func:`load_image` already returned and does not decode or rotate it again.
    """

    size: int = 1024
    mode: str = "pad"
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.mode not in ("pad", "crop"):
            raise ConfigError(f"image mode must be 'pad' or 'crop', got {self.mode!r}")

    def __call__(self, image: ImageInput) -> torch.Tensor:
        """Decode ``image`` (see :func:`load_image`) and return its pixels [3, size, size]."""
        return self.preprocess(load_image(image, max_pixels=self.max_pixels))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Pixels [3, size, size] of an upright RGB image as :func:`load_image` returns it."""
        img = expand_to_square(image) if self.mode == "pad" else image
        img = resize_and_center_crop(img, self.size)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def batch(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Pixels [N, 3, size, size] of the images, each decoded once."""
        return torch.stack([self(image) for image in images])


# ------------------------------------------------------------------------------------- prompts


@dataclass
class Conversation:
    """A qwen_2 (ChatML) conversation as the authors' ``conv_qwen_2`` renders it.

    ``messages`` holds (role, text) pairs with role "user" or "assistant"; the image
    placeholder ``<image>`` appears in the text where the image goes (the first user
    turn, by default).
    """

    system: str = SYSTEM_PROMPT
    messages: list[tuple[str, str]] = field(default_factory=list)

    def add(self, role: str, text: str) -> Conversation:
        if role not in ROLES:
            raise PromptError(f"role must be 'user' or 'assistant', got {role!r}")
        self.messages.append((role, text))
        return self

    def segments(self, add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
        """The rendered template as (text, is_answer) pieces, in order; they join to :meth:`prompt`.

        ``is_answer`` marks an assistant's reply with its closing ``<|im_end|>``: what a
        model is trained to produce. Everything else (system, user turns, turn headers
        and the newline after each turn) is context.
        """
        header = f"{TURN_START}assistant\n"
        pieces = [(f"{TURN_START}system\n{self.system}{TURN_END}\n", False)]
        for role, text in self.messages:
            if role == "assistant":
                pieces += [(header, False), (f"{text}{TURN_END}", True), ("\n", False)]
            else:
                pieces.append((f"{TURN_START}{role}\n{text}{TURN_END}\n", False))
        if add_generation_prompt:
            pieces.append((header, False))
        return pieces

    def prompt(self, add_generation_prompt: bool = True) -> str:
        """The text the model reads, ending with the assistant's turn header when asked."""
        return "".join(text for text, _ in self.segments(add_generation_prompt))


# The same template as Jinja, for engines that render prompts themselves (vLLM's server,
# Transformers.js on an exported folder): content as a string or as OpenAI-style parts, the
# images of a message first, each as <image> on its own line. A <image> typed into the text
# has no image behind it and is refused. A test holds it equal to Conversation.prompt.
_TYPED_PLACEHOLDER = (
    f"the text of a message contains {DEFAULT_IMAGE_TOKEN}, which stands for an image; send images as "
    "image_url content parts (they are placed before the text) and leave the placeholder out of the text"
)

_NEWLINE = "{{ '\\n' }}"  # emitted as an expression: whitespace control around tags would eat a bare newline

CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}"
    f"{{%- if '{DEFAULT_IMAGE_TOKEN}' in content -%}}{{{{ raise_exception('{_TYPED_PLACEHOLDER}') }}}}{{%- endif -%}}"
    "{{- content -}}"
    "{%- else -%}"
    "{%- set ns = namespace(parts=[]) -%}"
    "{%- for part in content -%}"
    f"{{%- if part['type'] in ['image', 'image_url'] -%}}{{%- set ns.parts = ns.parts + ['{DEFAULT_IMAGE_TOKEN}'] -%}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}"
    f"{{%- if '{DEFAULT_IMAGE_TOKEN}' in part['text'] -%}}{{{{ raise_exception('{_TYPED_PLACEHOLDER}') }}}}"
    "{%- endif -%}"
    "{%- set ns.parts = ns.parts + [part['text']] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.parts | join('\\n') -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    f"{TURN_START}system{_NEWLINE}{{{{ render(messages[0]['content']) }}}}{TURN_END}{_NEWLINE}"
    "{%- else -%}"
    f"{TURN_START}system{_NEWLINE}{SYSTEM_PROMPT}{TURN_END}{_NEWLINE}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}"
    f"{TURN_START}{{{{ message['role'] }}}}{_NEWLINE}{{{{ render(message['content']) }}}}{TURN_END}{_NEWLINE}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{TURN_START}assistant{_NEWLINE}{{%- endif -%}}"
)


def is_templated(prompt: str) -> bool:
    """Whether ``prompt`` is already rendered in the chat template (rather than a bare question)."""
    return TURN_START in prompt


def build_prompt(question: str, *, with_image: bool = True, system: str = SYSTEM_PROMPT) -> str:
    """A one-turn prompt; the image placeholder is put first unless the question already has one."""
    text = question
    if with_image and DEFAULT_IMAGE_TOKEN not in question:
        text = f"{DEFAULT_IMAGE_TOKEN}\n{question}"
    return Conversation(system=system).add("user", text).prompt()


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with one ``IMAGE_TOKEN_INDEX`` per ``<image>``, chunk by chunk.

    Each text chunk between placeholders is tokenised on its own, as the authors'
    ``tokenizer_image_token`` does; this is what makes the ids bit-exact with theirs.
    """
    ids: list[int] = []
    for i, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            chunk_ids = tokenizer(chunk, add_special_tokens=True).input_ids
            bos = getattr(tokenizer, "bos_token_id", None)
            if i and bos is not None and chunk_ids and chunk_ids[0] == bos:
                chunk_ids = chunk_ids[1:]  # one BOS at the very start only
            ids.extend(chunk_ids)
    return ids


def extra_visual_tokens(ids: Sequence[int], tokens_per_image: int) -> int:
    """How many positions the image markers in ``ids`` add once each becomes its visual tokens."""
    return sum(1 for t in ids if t == IMAGE_TOKEN_INDEX) * (tokens_per_image - 1)


def pad_sequences(
    rows: Sequence[Sequence[int]], pad_value: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length id lists into [B, L] (padded on ``side``) and the matching attention mask."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
