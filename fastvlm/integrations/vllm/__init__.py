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

__all__ = ["ARCHITECTURES", "LlavaQwen2Config", "register"]

# config.json's ``architectures`` of the two released formats; both are served by one class.
ARCHITECTURES = ("LlavaQwen2ForCausalLM", "FastVlmForConditionalGeneration")
MODEL_CLASS = "fastvlm.integrations.vllm.model:FastVLMForVLLM"


def register() -> None:
    """Register FastVLM's model class with vLLM and the ``llava_qwen2`` config with transformers.

    The model class is registered by name, so vLLM imports it (and itself) only when a
    FastVLM checkpoint is served. transformers knows ``fast_vlm`` itself; ``llava_qwen2``
    is known only through :class:`LlavaQwen2Config`, registered with ``AutoConfig``
    (which is what vLLM's config reader asks), so no remote code is needed.
    """
    from transformers import AutoConfig
    from vllm import ModelRegistry

    AutoConfig.register(LlavaQwen2Config.model_type, LlavaQwen2Config, exist_ok=True)
    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, MODEL_CLASS)
