"""vLLM as the generation backend of ``fastvlm eval --engine vllm``.

:class:`VLLMEngine` answers batches for :func:`fastvlm.eval.evaluate` in place of our own
model; the runner keeps everything else (reading samples, decoding images, the predictions
file, resuming, scoring). To write the same predictions as our engine, each step is the one
:meth:`fastvlm.model.FastVLM.generate` takes:

* the prompt is rendered by :func:`fastvlm.generation.prepare_prompt` and goes to vLLM as
  text, which our plugin's processor tokenises the authors' way (the ids of
  :func:`fastvlm.processing.tokenize_prompt`); the image goes as the PIL image the runner
  decoded, which the processor pads or crops as the checkpoint says;
* decoding is greedy, ends at the same stop tokens (:func:`fastvlm.generation.end_of_answer_ids`;
  vLLM adds the generation config's EOS itself) and at the model's context length;
* the answer ids, stop token dropped, are decoded by the checkpoint's tokenizer as ours are
  (special tokens skipped); vLLM's own detokenizer is switched off.

In fp32 the predictions file is then byte for byte the default engine's
(tests/integrations/vllm/test_eval.py). The speed comes from batching: vLLM schedules every
request of one ``generate`` call together, so the runner hands it :data:`DEFAULT_BATCH_SIZE`
samples at a time instead of our engine's 1 (CPU) or 8 (GPU).

vLLM is imported when an engine is built, so this module imports where vLLM is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from fastvlm.errors import CheckpointError, PromptError, UsageError
from fastvlm.files import resolve_checkpoint
from fastvlm.formats import CheckpointFormat, load_tokenizer
from fastvlm.generation import GenerationResult, end_of_answer_ids, prepare_prompt
from fastvlm.integrations.vllm.checkpoint import IMAGES_PER_PROMPT, describe_checkpoint

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.outputs import CompletionOutput

# Samples per generate call. vLLM runs up to 1024 sequences at once on a large GPU (256 on
# smaller ones); 512 requests keep its running batch full while bounding what one call holds
# in memory (the decoded images, and a [3, 1024, 1024] fp32 pixel tensor per request in
# vLLM's queue, ~6 GB) and what an interrupted run loses. --batch-size overrides it.
DEFAULT_BATCH_SIZE = 512


class VLLMEngine:
    """A FastVLM checkpoint in vLLM, answering batches greedily like :meth:`FastVLM.generate`.

    ``model`` is a checkpoint folder or hub id in one of the released formats (the authors'
    or transformers'); ``llm_options`` go to ``vllm.LLM`` as they are.
    """

    engine = "vllm"
    default_batch_size = DEFAULT_BATCH_SIZE

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        tensor_parallel_size: int = 1,
        **llm_options: Any,
    ) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        folder = resolve_checkpoint(model)
        checkpoint = describe_checkpoint(str(folder))
        if checkpoint.format.name is CheckpointFormat.NATIVE:
            raise UsageError(
                f"{folder} is in our own checkpoint format, which vLLM does not read; convert it to a released "
                "format first (`fastvlm convert --format hf`)"
            )
        self.config = checkpoint.config
        self.source_path = folder
        self.dtype = dtype
        self.tokenizer = load_tokenizer(folder)
        if self.tokenizer is None:
            raise CheckpointError(f"{folder} has no tokenizer files; vLLM needs them")
        self.stop_ids = sorted(end_of_answer_ids(self.tokenizer, self.config.text.eos_token_id))
        options: dict[str, Any] = {
            "dtype": str(dtype).removeprefix("torch."),  # vLLM's names: float32, bfloat16, float16
            "tensor_parallel_size": tensor_parallel_size,
            "max_model_len": self.config.context_length,  # where our engine stops too
            "enforce_eager": current_platform.is_cpu(),  # no graphs to capture on a CPU
            "limit_mm_per_prompt": {"image": IMAGES_PER_PROMPT},
            **llm_options,
        }
        self.llm: LLM = LLM(model=str(folder), **options)

    def generate(
        self, images: Sequence[Image.Image | None], prompts: Sequence[str], *, max_new_tokens: int
    ) -> list[GenerationResult]:
        """Greedy answers to ``prompts``, in order, in one vLLM call (one image or None per prompt).

        A prompt vLLM refuses (longer than the context, say) fails the whole call with a
        :class:`PromptError`, as a batch of our engine does; the runner then answers one by one.
        """
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError

        requests = [_request(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.stop_ids, detokenize=False
        )
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        except VLLMValidationError as err:
            raise PromptError(f"vLLM refused a prompt: {err}") from None
        return [self._result(out.outputs[0]) for out in outputs]

    def _result(self, completion: CompletionOutput) -> GenerationResult:
        ids = list(completion.token_ids)
        finish = "stop" if completion.finish_reason == "stop" else "length"
        if finish == "stop":  # vLLM keeps the stop token; our engine's answers end before it
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)  # as fastvlm.generation decodes
        return GenerationResult(text=text, token_ids=ids, finish_reason=finish)


def _request(image: Image.Image | None, prompt: str) -> dict[str, Any]:
    """vLLM's prompt dict: the templated text, and the image when there is one."""
    text = prepare_prompt(prompt, has_image=image is not None)
    return {"prompt": text} if image is None else {"prompt": text, "multi_modal_data": {"image": image}}
