"""The authors' ``llava_qwen2`` config.json as a transformers config class.

Their config is a flat Qwen2 config with the multimodal settings mixed in (``mm_*``,
``image_aspect_ratio``; see :mod:`fastvlm.formats.llava_qwen2`). A subclass of
``Qwen2Config`` keeps it flat: the class is its own text config, which is what vLLM's
Qwen2 decoder reads, and the multimodal fields stay on it as plain attributes. Only the
``model_type`` differs, so that ``AutoConfig`` can map ``llava_qwen2`` to this class
instead of asking for the checkpoint's remote code.
"""

from __future__ import annotations

from transformers import Qwen2Config


class LlavaQwen2Config(Qwen2Config):
    """``model_type: llava_qwen2``: Qwen2's fields plus the authors' multimodal ones."""

    model_type = "llava_qwen2"
