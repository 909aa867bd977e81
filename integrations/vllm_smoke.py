"""Smoke check of the vLLM plugin's registration, run with .venv-vllm's python (no model is run).

    .venv-vllm/bin/python integrations/vllm_smoke.py [CHECKPOINT_FOLDER ...]

Checks that vLLM finds our entry point, that loading the general plugins runs our
register(), and that vLLM's config reader reads each given checkpoint folder's config.json
(the authors' llava_qwen2 or transformers' fast_vlm) without remote code.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points


def main(folders: list[str]) -> None:
    import vllm
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_general_plugins
    from vllm.transformers_utils.config import get_config

    names = [ep.name for ep in entry_points(group=DEFAULT_PLUGINS_GROUP)]
    assert "fastvlm" in names, f"entry point missing from {DEFAULT_PLUGINS_GROUP}: {names}"
    load_general_plugins()
    from transformers import AutoConfig

    from fastvlm.integrations.vllm import LlavaQwen2Config

    assert AutoConfig.for_model("llava_qwen2").__class__ is LlavaQwen2Config
    print(f"vllm {vllm.__version__}: plugin registered")
    for folder in folders:
        config = get_config(folder, trust_remote_code=False)
        text = config.get_text_config()
        print(
            f"{folder}: {type(config).__name__} ({config.model_type}), decoder {text.model_type} "
            f"hidden {text.hidden_size} heads {text.num_attention_heads} layers {text.num_hidden_layers}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
