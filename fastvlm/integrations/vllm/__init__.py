"""FastVLM as a vLLM model, through vLLM's plugin mechanism.

vLLM calls :func:`register` in each of its processes (front end, engine core, workers and
the subprocess that inspects model classes), found through this package's entry point in
the ``vllm.general_plugins`` group (pyproject.toml). It must therefore be cheap and safe to
call more than once. Importing this package does not import vLLM, so the rest of
``fastvlm`` keeps working where vLLM is not installed; vLLM lives in its own environment
(``integrations/vllm_env.sh``).
"""

from __future__ import annotations

from fastvlm.integrations.vllm.config import LlavaQwen2Config

__all__ = ["LlavaQwen2Config", "register"]


def register() -> None:
    """Make the authors' ``llava_qwen2`` config.json readable without remote code.

    transformers knows ``fast_vlm`` itself; ``llava_qwen2`` is known only through
    :class:`LlavaQwen2Config`, registered here with ``AutoConfig`` (which is what vLLM's
    config reader asks).
    """
    from transformers import AutoConfig

    AutoConfig.register(LlavaQwen2Config.model_type, LlavaQwen2Config, exist_ok=True)
