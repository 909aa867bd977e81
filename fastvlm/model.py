"""FastVLM: FastViTHD -> MLP projector -> Qwen2 decoder (transformers' ``Qwen2ForCausalLM``).

Our state-dict layout: ``vision_tower.*`` (see :mod:`fastvlm.vision.fastvit`),
``projector.linear_{1,2}.*``, ``language_model.model.*`` and ``language_model.lm_head.weight``
(absent when tied). :mod:`fastvlm.formats` maps it to the authors' ``llava_qwen2``
layout and transformers' ``fast_vlm`` layout.

Images enter the sequence at placeholders: either one ``-200`` per image (the authors'
convention, expanded here to the image's visual tokens) or the checkpoint's image token
id repeated once per visual token (transformers' convention).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from fastvlm.config import FastVLMConfig
from fastvlm.dtypes import dtype_name
from fastvlm.errors import CheckpointError, ConfigError, OutputExistsError
from fastvlm.files import read_json, resolve_checkpoint
from fastvlm.formats import (
    CheckpointFormat,
    get_format,
    load_tokenizer,
    read_checkpoint,
    vocab_image_token,
    write_checkpoint,
)
from fastvlm.formats.base import OUR_LM_HEAD
from fastvlm.greedy_head import GreedyHead, greedy_head_of
from fastvlm.processing import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ImageProcessor, PromptError, pad_sequences
from fastvlm.quantization import check_quantization, quantize_decoder, use_gemv_decode
from fastvlm.state_dicts import check_state_dict, is_batch_counter, materialize
from fastvlm.vision import FastViT

__all__ = ["FastVLM", "FastVLMConfig", "MultiModalProjector"]


class MultiModalProjector(nn.Module):
    """``mlpNx_gelu``: Linear(C_vision, H), then (GELU, Linear(H, H)) N-1 times."""

    def __init__(self, in_dim: int, hidden: int, depth: int = 2) -> None:
        super().__init__()
        self.depth = depth
        self.linear_1 = nn.Linear(in_dim, hidden)
        for i in range(2, depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(hidden, hidden))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x


if TYPE_CHECKING:  # generation imports this module; these names are for annotations only
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from fastvlm.generation import ChatSession, GenerationResult, TextStream
    from fastvlm.precision import PrecisionChoice
    from fastvlm.processing import ImageInput


@dataclass
class ModelInputs:
    """What the decoder reads for a batch: the output of :meth:`FastVLM.prepare_inputs`.

    B is the batch size, L the length after each image marker is expanded to its T
    visual tokens, H the decoder's hidden size and N the number of images.
    """

    input_ids: torch.Tensor  # [B, L] ids with the image positions expanded (one per visual token)
    inputs_embeds: torch.Tensor  # [B, L, H] token embeddings with the visual tokens written in
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens, 0 for padding
    position_ids: torch.Tensor  # [B, L] 0, 1, ... over the real tokens of each row (padding: 0)
    labels: torch.Tensor | None  # [B, L] targets, IGNORE_INDEX at image positions and padding; None without labels
    image_features: torch.Tensor | None  # [N, T, H] projected visual tokens; None without images
    tokens_per_image: int  # T

    @property
    def visual_tokens(self) -> int:
        """Visual tokens in the whole batch (N x T)."""
        return 0 if self.image_features is None else self.image_features.shape[0] * self.image_features.shape[1]


def _check_auto_dtype(dtype: torch.dtype | str | None, *, fuse: bool, quantization: str | None) -> bool:
    """Whether ``dtype`` is ``"auto"``; a ConfigError for another string or a conflicting option."""
    if not isinstance(dtype, str):
        return False
    if dtype != "auto":
        raise ConfigError(f"dtype {dtype!r}: pass a torch dtype or 'auto'")
    if quantization is not None:
        raise ConfigError("dtype='auto' chooses the decoder's form itself; drop quantization= (or pass a torch dtype)")
    if not fuse:
        raise ConfigError("dtype='auto' tunes the inference model; it needs fuse=True")
    return True


class FastVLM(nn.Module):
    """Vision tower + projector + Qwen2 decoder, with loading, saving and generation."""

    def __init__(self, config: FastVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = FastViT(config.vision)
        self.projector = MultiModalProjector(config.vision.out_channels, config.hidden_size, config.projector_depth)
        text = config.text
        text._attn_implementation = getattr(text, "_attn_implementation", None) or "sdpa"
        self.language_model = Qwen2ForCausalLM(text)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.image_processor = ImageProcessor(config.image_size, config.image_mode)
        self.source_path: Path | None = None
        self.generation_eos_token_id: int | list[int] | None = None  # from generation_config.json
        self.quantization: str | None = None  # "int8"/"int4" once the decoder is quantized (fastvlm.quantization)
        self.precision: PrecisionChoice | None = None  # the per-stage choice of dtype="auto" (fastvlm.precision)
        use_gemv_decode(self)  # few-row bf16 decode steps read the weights at memory speed on CPU (fastvlm.linears)
        # Decode steps over preallocated KV buffers (fastvlm.decoding); False: transformers' forward
        self.lean_decode = True
        # ...and with every layer of a step in one call to our compiled op where it can (fastvlm.decoding.NativeLayers)
        self.native_decode = True
        # ...and their attention through our kernel (fastvlm.native.decode_attention_kernel); False: ATen's SDPA
        self.native_attention = True
        # Greedy decode steps find the argmax through an int8 screen of the head and a few exact rows
        # (fastvlm.greedy_head); False: they read the whole head
        self.screen_greedy_head = True
        self.greedy_head: GreedyHead | None = None  # made by fastvlm.greedy_head.greedy_head_of, kept here

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ images
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [0, 1] -> projected visual tokens [N, T, hidden]."""
        pixel_values = pixel_values.to(self.device)
        features = self.vision_tower.image_embeddings(pixel_values.to(self._tower_dtype()))
        features = features.to(self.projector.linear_1.weight.dtype)
        return self.projector(features).to(self.dtype)

    def _tower_dtype(self) -> torch.dtype:
        return next(p for p in self.vision_tower.parameters()).dtype

    def stage_precision(self) -> dict[str, str]:
        """Each stage's form, named as ``dtype="auto"`` names its candidates (fp32, bf16, int8, int8-head, bf16+int8).

        The server lists it on ``/v1/models``, so a client can see what ``--dtype auto`` chose.
        """
        decoder = [] if self.dtype == torch.float32 else [dtype_name(self.dtype)]
        decoder += [self.quantization] if self.quantization else []
        return {"encoder": dtype_name(self._tower_dtype()), "decoder": "+".join(decoder) or "fp32"}

    # ------------------------------------------------------------------ sequences
    def expand_image_markers(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        num_image_tokens: int,
        *,
        labels: torch.Tensor | None = None,
        pad_token_id: int = 0,
        padding_side: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace each ``-200`` by ``num_image_tokens`` copies and re-pad the batch.

        Returns (ids, attention mask, labels). ``labels`` are expanded alongside, with
        ``IGNORE_INDEX`` at the image positions. Sequences without ``-200`` pass through
        unchanged (already in transformers' convention). Padding (from ``attention_mask``)
        is removed first and put back on ``padding_side``, by default the side the input
        was padded on.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not (input_ids == IMAGE_TOKEN_INDEX).any():
            return input_ids, attention_mask, labels
        if padding_side is None:
            padding_side = "left" if bool((attention_mask[:, 0] == 0).any()) else "right"
        id_rows, label_rows = [], []
        label_list = labels.tolist() if labels is not None else [None] * len(input_ids)
        for ids, mask, row_labels in zip(input_ids.tolist(), attention_mask.tolist(), label_list, strict=True):
            keep = [i for i, m in enumerate(mask) if m]
            expanded, expanded_labels = [], []
            for i in keep:
                n = num_image_tokens if ids[i] == IMAGE_TOKEN_INDEX else 1
                expanded += [ids[i]] * n
                if row_labels is not None:
                    expanded_labels += [IGNORE_INDEX] * n if ids[i] == IMAGE_TOKEN_INDEX else [row_labels[i]]
            id_rows.append(expanded)
            label_rows.append(expanded_labels)
        ids_out, mask_out = pad_sequences(id_rows, pad_token_id, padding_side)
        labels_out = pad_sequences(label_rows, IGNORE_INDEX, padding_side)[0] if labels is not None else None
        device = input_ids.device
        return ids_out.to(device), mask_out.to(device), None if labels_out is None else labels_out.to(device)

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids == IMAGE_TOKEN_INDEX
        if self.config.image_token_id is not None:
            mask |= input_ids == self.config.image_token_id
        return mask

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the visual tokens written over the image positions."""
        positions = self.image_positions(input_ids)
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(positions, 0))
        n_positions = int(positions.sum())
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_positions != n_features:
            per_image = self.config.num_image_tokens() if image_features is None else image_features.shape[1]
            raise PromptError(
                f"the input has {n_positions} image positions but {n_features} visual tokens were given "
                f"({0 if image_features is None else image_features.shape[0]} image(s) x {per_image}); "
                "each image needs exactly one <image> placeholder in the prompt"
            )
        if image_features is not None and n_features:
            embeds = embeds.masked_scatter(positions.unsqueeze(-1), image_features.reshape(-1, embeds.shape[-1]))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **lm_kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and loss with ``labels``) for token ids with image placeholders.

        ``pixel_values`` [N, 3, S, S] holds the images in the order their placeholders
        appear, row by row; ``image_features`` may be given instead (already projected).
        """
        inputs = self.prepare_inputs(
            input_ids, attention_mask, pixel_values=pixel_values, image_features=image_features, labels=labels
        )
        return self.language_model(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            labels=inputs.labels,
            **lm_kwargs,
        )

    def training_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the next-token cross-entropies, number of target tokens).

        A sum rather than a mean lets the trainer divide by the target count of the whole
        global batch, so the result does not depend on how the batch is split over
        processes and accumulation steps. Logits are computed only where there is a
        target: with a 150k vocabulary that is most of the LM head's cost.
        """
        inputs = self.prepare_inputs(input_ids, attention_mask, pixel_values=pixel_values, labels=labels)
        assert inputs.labels is not None  # given labels are expanded, never dropped
        hidden = self.language_model.model(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
        ).last_hidden_state  # [B, L, H]
        targets = inputs.labels[:, 1:]  # [B, L-1]: position i predicts token i+1
        keep = targets != IGNORE_INDEX
        logits = self.language_model.lm_head(hidden[:, :-1][keep]).float()
        return nn.functional.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
        pad_token_id: int = 0,
    ) -> ModelInputs:
        """The decoder's inputs for ids with image placeholders: used by forward, the loss and generation.

        ``input_ids`` [B, L0] use either image convention (see the module docstring);
        ``attention_mask`` [B, L0] marks padding (None: no padding). The images are
        ``pixel_values`` [N, 3, S, S], encoded here, or ``image_features`` [N, T, H]
        (already projected), in the order their placeholders appear, row by row.
        ``labels`` [B, L0] are optional. After expansion the batch is padded on
        ``padding_side`` (None: the side the input was padded on) with ``pad_token_id``.
        Everything returned is on the model's device.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        tokens = image_features.shape[1] if image_features is not None else self.config.num_image_tokens()
        ids, mask, labels = self.expand_image_markers(
            input_ids, attention_mask, tokens, labels=labels, pad_token_id=pad_token_id, padding_side=padding_side
        )
        return ModelInputs(
            input_ids=ids,
            inputs_embeds=self.embed(ids, image_features),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            labels=labels,
            image_features=image_features,
            tokens_per_image=tokens,
        )

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        image: ImageInput | Sequence[ImageInput | None] | None = None,
        prompt: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> GenerationResult | list[GenerationResult] | TextStream:
        """Answer ``prompt`` about ``image``; see :func:`fastvlm.generation.generate`."""
        from fastvlm.generation import generate

        return generate(self, image=image, prompt=prompt, **kwargs)

    def chat(self, image: ImageInput | None = None, **kwargs: Any) -> ChatSession:
        """A multi-turn conversation about ``image`` (its features are computed once)."""
        from fastvlm.generation import ChatSession

        return ChatSession(self, image, **kwargs)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = torch.float32,
        fuse: bool = True,
        image_mode: str | None = None,
        quantization: str | None = None,
    ) -> FastVLM:
        """Load a checkpoint folder in the authors', transformers' or our format (or a hub id).

        The tower's architecture is read from its tensors. ``fuse`` (default) switches
        the tower to its fused inference form; pass ``fuse=False`` to train.
        ``quantization`` (``"int8"``, ``"int8-head"`` or ``"int4"``) quantizes the decoder's
        linear weights once loaded: int8 on our CPU kernel where it builds (else ATen's, or
        torchao off the CPU), int4 with torchao; see :mod:`fastvlm.quantization`.
        ``dtype="auto"`` loads fp32 and picks each stage's precision (encoder fp32/bf16,
        decoder fp32/bf16/int8) by measuring them on this machine within a quality bound,
        cached per machine; the choice is ``model.precision``. See :mod:`fastvlm.precision`.
        """
        check_quantization(quantization)  # a typo is reported before the weights are read
        auto = _check_auto_dtype(dtype, fuse=fuse, quantization=quantization)
        folder = resolve_checkpoint(path_or_hub_id)
        checkpoint = read_checkpoint(folder)
        config, ours = checkpoint.config, checkpoint.tensors
        if image_mode is not None:
            config.image_mode = image_mode
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        tied = config.text.tie_word_embeddings
        check_state_dict(
            expected,
            ours,
            checkpoint.name_of,
            what=f"{folder} ({checkpoint.format.name} format) does not fit the model its config describes",
            optional=lambda key: is_batch_counter(key) or (tied and key == OUR_LM_HEAD),
        )
        if tied:
            ours.pop(OUR_LM_HEAD, None)
            expected = {k: v for k, v in expected.items() if k != OUR_LM_HEAD}
        load_dtype = torch.float32 if auto else dtype
        assert not isinstance(load_dtype, str)  # "auto" is the only name, checked above
        model.load_state_dict(materialize(expected, ours, device=device, dtype=load_dtype), strict=False, assign=True)
        model._finish_loading(device)
        model.tokenizer = load_tokenizer(folder)
        if config.image_token_id is None:  # the authors' checkpoints: use the tokenizer's <image>, if it has one
            config.image_token_id = vocab_image_token(model.tokenizer, config.text.vocab_size)
        model.source_path = folder
        generation_config = folder / "generation_config.json"
        if generation_config.is_file():
            model.generation_eos_token_id = read_json(generation_config).get("eos_token_id")
        if fuse:
            model.vision_tower.fuse()
        if quantization is not None:
            quantize_decoder(model, quantization)
        model.eval()
        if auto:
            from fastvlm.precision import auto_precision

            auto_precision(model)
        if fuse:  # an inference model: its greedy head's int8 screen is made now, not inside the first answer
            greedy_head_of(model)
        return model

    def _finish_loading(self, device: torch.device | str) -> None:
        """Tie embeddings and rebuild the rotary tables, which a meta-device build leaves empty."""
        lm = self.language_model
        if self.config.text.tie_word_embeddings:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        with torch.device(device):
            lm.model.rotary_emb = type(lm.model.rotary_emb)(self.config.text)

    @classmethod
    def from_config(
        cls,
        config: FastVLMConfig,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> FastVLM:
        """A model with random weights (for benchmarks and tests)."""
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(config)
        return model.to(dtype).eval()

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        directory: str | os.PathLike,
        format: str | CheckpointFormat = CheckpointFormat.NATIVE,
        *,
        overwrite: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write a checkpoint folder in our format, the authors' (``apple``) or transformers' (``hf``).

        Everything is written to a staging folder first and moved into place at the end,
        so a failure never leaves a half-written checkpoint. An existing non-empty folder
        is refused unless ``overwrite``; then only the files written here (and stale
        weight files, which would shadow the new ones) are replaced: nothing else in the
        folder is touched. ``state_dict`` (our layout) replaces the module's own tensors:
        the trainer passes weights gathered from sharded or adapter-carrying models.
        """
        fmt = get_format(format)
        if state_dict is None and self.quantization is not None:
            raise CheckpointError(
                f"this model's decoder is quantized ({self.quantization}) and is not saved in that form; save the "
                "unquantized model and pass quantization= to from_pretrained (--quantization) when loading it"
            )
        if state_dict is None and getattr(self.vision_tower, "is_fused", False):
            raise CheckpointError(
                "this model's vision tower is fused for inference and no longer has checkpoint tensors; "
                "load it with fuse=False to save or convert it"
            )
        directory = Path(directory).resolve()
        if directory.exists() and (not directory.is_dir() or (any(directory.iterdir()) and not overwrite)):
            raise OutputExistsError(f"{directory} exists and is not an empty folder; pass overwrite=True (--overwrite)")
        state = dict(self.state_dict() if state_dict is None else state_dict)
        return write_checkpoint(directory, fmt, self.config, self.tokenizer, state)
