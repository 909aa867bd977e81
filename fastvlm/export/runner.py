"""Generation with an exported ONNX folder on onnxruntime (CPU): :class:`OnnxFastVLM`.

The folder is what :func:`fastvlm.export.onnx.export_onnx` writes: three graphs in
``onnx/`` and the config, tokenizer and processor files beside them. Prompts are built,
tokenised and ended exactly as :func:`fastvlm.generation.generate` does (the same
functions), images are preprocessed by our :class:`~fastvlm.processing.ImageProcessor`,
and decoding is greedy with the KV cache carried through ``decoder_model_merged`` (past
length 0 on the first step). ``variant`` picks the graph files of a precision the
quantizer wrote (``vision_encoder_q4.onnx`` ...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fastvlm.errors import CheckpointNotFoundError, ConfigError, PromptError
from fastvlm.files import read_json
from fastvlm.formats import load_tokenizer
from fastvlm.generation import GenerationResult, Timings, end_of_answer_ids, prepare_prompt
from fastvlm.processing import IMAGE_TOKEN_INDEX, ImageInput, ImageProcessor, tokenize_prompt

if TYPE_CHECKING:
    import onnxruntime as ort
    from transformers import PreTrainedTokenizerBase

GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
ONNX_DIR = "onnx"
# Graph-file suffixes of each precision (Transformers.js' names); fp32 has none.
VARIANT_SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "uint8": "_uint8", "q4": "_q4", "q4f16": "_q4f16"}
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def graph_path(folder: Path, graph: str, variant: str = "fp32") -> Path:
    """``folder/onnx/{graph}{suffix}.onnx`` for ``variant``."""
    if variant not in VARIANT_SUFFIXES:
        raise ConfigError(f"unknown ONNX variant {variant!r}; expected one of {', '.join(VARIANT_SUFFIXES)}")
    return folder / ONNX_DIR / f"{graph}{VARIANT_SUFFIXES[variant]}.onnx"


@dataclass
class Step:
    """One generated token, the logits it was picked from ([V], float32) and the timings so far."""

    token: int
    logits: np.ndarray
    timings: Timings


class OnnxFastVLM:
    """An exported FastVLM folder on onnxruntime: ``generate(image, prompt)`` like :class:`fastvlm.model.FastVLM`."""

    def __init__(
        self,
        folder: Path,
        sessions: dict[str, ort.InferenceSession],
        tokenizer: PreTrainedTokenizerBase,
        config: dict[str, Any],
        generation_config: dict[str, Any],
    ) -> None:
        self.folder = folder
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.config = config
        self.image_processor = ImageProcessor(int(config["image_size"]), str(config.get("image_mode", "pad")))
        self.image_token_id = int(config["image_token_index"])
        self.tokens_per_image = int(config["tokens_per_image"])
        self.num_layers = int(config["num_hidden_layers"])
        self.stop_ids = end_of_answer_ids(tokenizer, config.get("eos_token_id"), generation_config.get("eos_token_id"))
        decoder_inputs = {i.name: i for i in sessions["decoder_model_merged"].get_inputs()}
        self._past_names = [n for n in decoder_inputs if n.startswith("past_key_values.")]
        past = decoder_inputs[self._past_names[0]]
        self._past_shape = (int(past.shape[1]), int(past.shape[3]))  # (kv heads, head dim)
        self._past_dtype = _NUMPY_TYPES[past.type]
        self._embeds_dtype = _NUMPY_TYPES[decoder_inputs["inputs_embeds"].type]

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, variant: str = "fp32", threads: int | None = None
    ) -> OnnxFastVLM:
        """Open the three graphs of ``variant`` in ``folder`` on onnxruntime's CPU provider."""
        import onnxruntime as ort

        folder = Path(folder)
        config_path = folder / "config.json"
        if not (folder / ONNX_DIR).is_dir() or not config_path.is_file():
            raise CheckpointNotFoundError(
                f"{folder} is not an exported ONNX folder (config.json and onnx/); write one with `fastvlm export onnx`"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        sessions = {}
        for graph in GRAPHS:
            path = graph_path(folder, graph, variant)
            if not path.is_file():
                found = sorted(p.name for p in (folder / ONNX_DIR).glob(f"{graph}*.onnx"))
                raise CheckpointNotFoundError(f"{path} not found (variant {variant!r}); this folder has {found}")
            sessions[graph] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        generation = folder / "generation_config.json"
        tokenizer = load_tokenizer(folder)
        if tokenizer is None:
            raise CheckpointNotFoundError(f"{folder} has no tokenizer files; generation needs one")
        return cls(
            folder,
            sessions,
            tokenizer,
            read_json(config_path),
            read_json(generation) if generation.is_file() else {},
        )

    # ------------------------------------------------------------------ graphs
    def encode_images(self, pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
        """[N, 3, S, S] in [0, 1] -> projected visual tokens [N, T, H] (float32)."""
        pixels = np.asarray(pixel_values, dtype=np.float32)
        session = self.sessions["vision_encoder"]
        dtype = _NUMPY_TYPES.get(session.get_inputs()[0].type, np.float32)
        return session.run(["image_features"], {"pixel_values": pixels.astype(dtype)})[0].astype(np.float32)

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        """Token embeddings [B, L, H] with the visual tokens written over the image positions."""
        ids = np.asarray(input_ids, dtype=np.int64)
        embeds = self.sessions["embed_tokens"].run(["inputs_embeds"], {"input_ids": ids})[0]
        embeds = embeds.astype(self._embeds_dtype)
        positions = ids == self.image_token_id
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if int(positions.sum()) != n_features:
            raise PromptError(f"the input has {int(positions.sum())} image positions but {n_features} visual tokens")
        if image_features is not None and n_features:
            embeds[positions] = image_features.reshape(n_features, -1).astype(embeds.dtype)
        return embeds

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        heads, dim = self._past_shape
        return [np.zeros((batch, heads, 0, dim), dtype=self._past_dtype) for _ in self._past_names]

    def decoder_step(
        self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [B, L, V] (float32) and the present key/values after feeding ``inputs_embeds``."""
        feeds = {
            "inputs_embeds": inputs_embeds.astype(self._embeds_dtype),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
            **dict(zip(self._past_names, past, strict=True)),
        }
        logits, *present = self.sessions["decoder_model_merged"].run(None, feeds)
        return logits.astype(np.float32), present

    # ------------------------------------------------------------------ generation
    def prompt_ids(self, prompt: str, has_image: bool) -> list[int]:
        """The prompt's ids with each image marker expanded to the placeholder id, T times."""
        ids: list[int] = []
        for token in tokenize_prompt(self.tokenizer, prepare_prompt(prompt, has_image)):
            ids += [self.image_token_id] * self.tokens_per_image if token == IMAGE_TOKEN_INDEX else [token]
        return ids

    def steps(
        self, input_ids: list[int], image_features: np.ndarray | None, max_new_tokens: int, timings: Timings
    ) -> Iterator[Step]:
        """Greedy decoding, one :class:`Step` per new token (batch 1), stopping after a stop token."""
        context = int(self.config.get("context_length") or self.config["max_position_embeddings"])
        if len(input_ids) > context:
            raise PromptError(f"the prompt is {len(input_ids)} tokens long but the model's context holds {context}")
        max_new_tokens = min(max_new_tokens, context - len(input_ids))
        start = time.perf_counter()
        ids = np.asarray([input_ids], dtype=np.int64)
        length = ids.shape[1]
        logits, past = self.decoder_step(
            self.embed(ids, image_features), np.ones((1, length)), np.arange(length)[None], self.empty_past()
        )
        timings.prefill_ms = (time.perf_counter() - start) * 1e3
        timings.ttft_ms = timings.vision_ms + timings.prefill_ms
        timings.prompt_tokens = length
        for step in range(max_new_tokens):
            row = logits[0, -1]
            token = int(row.argmax())
            timings.new_tokens = step + 1
            yield Step(token, row, timings)
            if token in self.stop_ids or step + 1 == max_new_tokens:
                return
            step_start = time.perf_counter()
            position = length + step
            logits, past = self.decoder_step(
                self.embed(np.asarray([[token]])), np.ones((1, position + 1)), np.asarray([[position]]), past
            )
            timings.decode_ms += (time.perf_counter() - step_start) * 1e3
            timings.decode_tokens_per_s = (step + 1) / max(timings.decode_ms / 1e3, 1e-9)

    def generate(
        self,
        image: ImageInput | None = None,
        prompt: str | None = None,
        *,
        max_new_tokens: int = 256,
        pixel_values: np.ndarray | torch.Tensor | None = None,
    ) -> GenerationResult:
        """Answer ``prompt`` about ``image`` (or ``pixel_values`` [1, 3, S, S]) greedily; one prompt."""
        if prompt is None:
            raise PromptError("generate() needs a prompt")
        timings = Timings()
        features = None
        if image is not None and pixel_values is None:
            pixel_values = self.image_processor(image)[None]
        if pixel_values is not None:
            start = time.perf_counter()
            features = self.encode_images(pixel_values)
            timings.vision_ms = (time.perf_counter() - start) * 1e3
            timings.visual_tokens = features.shape[0] * features.shape[1]
        ids = self.prompt_ids(prompt, features is not None)
        tokens, finish = [], "length"
        for step in self.steps(ids, features, max_new_tokens, timings):
            if step.token in self.stop_ids:
                finish = "stop"
                break
            tokens.append(step.token)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return GenerationResult(text=str(text), token_ids=tokens, timings=timings, finish_reason=finish)
