"""FastVLM: FastViTHD -> MLP projector -> Qwen2 decoder (transformers' ``Qwen2ForCausalLM``).

Our state-dict layout: ``vision_tower.*`` (see :mod:`fastvlm.vision.fastvit`),
``projector.linear_{1,2}.*``, ``language_model.model.*`` and ``language_model.lm_head.weight``
(absent when tied). :mod:`fastvlm.checkpoints` maps it to the authors' ``llava_qwen2``
layout and transformers' ``fast_vlm`` layout.

Images enter the sequence at placeholders: either one ``-200`` per image (the authors'
convention, expanded here to the image's visual tokens) or the checkpoint's image token
id repeated once per visual token (transformers' convention).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import AddedToken
from torch import nn
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from fastvlm.checkpoints import (
    check_state_dict,
    infer_tower_config,
    materialize,
    model_keys_from_ours,
    model_keys_to_ours,
    read_checkpoint_tensors,
    read_config,
    resolve_checkpoint,
    save_safetensors_atomic,
)
from fastvlm.processing import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ImageProcessor, PromptError, pad_sequences
from fastvlm.vision import FastViT, FastViTConfig

# Fields of the authors' config.json that describe the multimodal wrapper rather than Qwen2.
_APPLE_MM_FIELDS = {
    "mm_hidden_size",
    "mm_patch_merge_type",
    "mm_projector_type",
    "mm_use_im_patch_token",
    "mm_use_im_start_end",
    "mm_vision_select_feature",
    "mm_vision_select_layer",
    "mm_vision_tower",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "freeze_mm_mlp_adapter",
    "tune_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "architectures",
    "model_type",
    "transformers_version",
}


@dataclass
class FastVLMConfig:
    """Everything needed to rebuild a FastVLM without its weights."""

    text: Qwen2Config
    vision: FastViTConfig = field(default_factory=FastViTConfig)
    image_size: int = 1024
    projector_depth: int = 2
    # transformers' convention: this token id, repeated once per visual token, marks an image
    image_token_id: int | None = None
    image_mode: str = "pad"  # "pad" (authors) or "crop" (transformers' processor)
    model_max_length: int | None = None

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def context_length(self) -> int:
        limits = [self.text.max_position_embeddings, self.model_max_length]
        return min(v for v in limits if v)

    def num_image_tokens(self, image_size: int | None = None) -> int:
        return self.vision.num_tokens(image_size or self.image_size)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_checkpoint_config(cls, config: dict, fmt: str, vision: FastViTConfig, folder: Path | None = None):
        if fmt == "apple":
            projector = config.get("mm_projector_type", "mlp2x_gelu")
            text = {k: v for k, v in config.items() if k not in _APPLE_MM_FIELDS}
            tower_name = str(config.get("mm_vision_tower", "mobileclip_l_1024"))
            try:
                image_size = int(tower_name.rsplit("_", 1)[-1])
            except ValueError:
                raise ValueError(f"mm_vision_tower {tower_name!r} does not end in the input resolution") from None
            return cls(
                text=Qwen2Config(**text),
                vision=vision,
                image_size=image_size,
                projector_depth=_projector_depth(projector),
                image_mode="pad" if config.get("image_aspect_ratio", "pad") == "pad" else "crop",
                model_max_length=config.get("tokenizer_model_max_length"),
            )
        if fmt == "hf":
            text = _text_config(config, fmt)
            if "tie_word_embeddings" in config:  # transformers reads the top-level flag
                text["tie_word_embeddings"] = config["tie_word_embeddings"]
            image_size = _hf_image_size(config, vision, folder)
            return cls(
                text=Qwen2Config(**text),
                vision=vision,
                image_size=image_size,
                projector_depth=2,
                image_token_id=config.get("image_token_index"),
                image_mode="pad",
            )
        text = _text_config(config, fmt)
        return cls(
            text=Qwen2Config(**text),
            vision=FastViTConfig.from_dict(_require(config, "vision_config", fmt)),
            image_size=_require(config, "image_size", fmt),
            projector_depth=config.get("projector_depth", 2),
            image_token_id=config.get("image_token_id"),
            image_mode=config.get("image_mode", "pad"),
            model_max_length=config.get("model_max_length"),
        )

    def to_checkpoint_config(self, fmt: str) -> dict:
        text = self.text.to_dict()
        for key in ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            text.pop(key, None)
        if fmt == "apple":
            return {
                "architectures": ["LlavaQwen2ForCausalLM"],
                **text,
                "model_type": "llava_qwen2",
                "image_aspect_ratio": "pad" if self.image_mode == "pad" else "square",
                "mm_hidden_size": self.vision.out_channels,
                "mm_patch_merge_type": "flat",
                "mm_projector_type": f"mlp{self.projector_depth}x_gelu",
                "mm_use_im_patch_token": False,
                "mm_use_im_start_end": False,
                "mm_vision_select_feature": "patch",
                "mm_vision_select_layer": -2,
                "mm_vision_tower": f"mobileclip_l_{self.image_size}",
                "tokenizer_model_max_length": self.model_max_length or 8192,
                "tokenizer_padding_side": "right",
                "unfreeze_mm_vision_tower": True,
                "use_mm_proj": True,
            }
        if fmt == "hf":
            if self.projector_depth != 2:
                raise ValueError("transformers' fast_vlm format supports the 2-layer projector only")
            if self.image_token_id is None:
                raise ValueError("transformers' fast_vlm format needs an image token id (image_token_id)")
            return {
                "architectures": ["FastVlmForConditionalGeneration"],
                "model_type": "fast_vlm",
                "image_seq_length": self.num_image_tokens(),
                "image_token_index": self.image_token_id,
                "multimodal_projector_bias": True,
                "projector_hidden_act": "gelu",
                "text_config": {**text, "model_type": "qwen2"},
                "tie_word_embeddings": self.text.tie_word_embeddings,
                "vision_config": {
                    "architecture": "fastvit_mci3",
                    "do_pooling": False,
                    "hidden_size": self.vision.out_channels,
                    "model_args": {
                        "embed_dims": list(self.vision.widths),
                        "inference_mode": True,
                        "layers": list(self.vision.depths),
                    },
                    "model_type": "timm_wrapper",
                    "num_classes": 0,
                },
                "vision_feature_layer": -1,
                "vision_feature_select_strategy": "full",
            }
        return {
            "model_type": "fastvlm",
            "text_config": text,
            "vision_config": self.vision.to_dict(),
            "image_size": self.image_size,
            "projector_depth": self.projector_depth,
            "image_token_id": self.image_token_id,
            "image_mode": self.image_mode,
            "model_max_length": self.model_max_length,
        }


def _require(config: dict, key: str, fmt: str):
    if key not in config:
        raise ValueError(f"config.json of this {fmt}-format checkpoint has no {key!r}")
    return config[key]


def _text_config(config: dict, fmt: str) -> dict:
    """The decoder's fields of a nested ``text_config`` (transformers' and our format), as Qwen2Config kwargs."""
    text = dict(_require(config, "text_config", fmt))
    text.pop("model_type", None)
    return text


def _projector_depth(projector_type: str) -> int:
    import re

    if m := re.fullmatch(r"mlp(\d+)x_gelu", projector_type):
        return int(m[1])
    raise ValueError(f"projector type {projector_type!r} is not supported; expected mlpNx_gelu (e.g. mlp2x_gelu)")


def _hf_image_size(config: dict, vision: FastViTConfig, folder: Path | None) -> int:
    processor = folder / "preprocessor_config.json" if folder else None
    if processor is not None and processor.is_file():
        crop = json.loads(processor.read_text()).get("crop_size")
        if isinstance(crop, dict) and "height" in crop:
            return int(crop["height"])
    tokens = config.get("image_seq_length")
    if tokens:
        side = math.isqrt(int(tokens))
        return side * vision.stride
    return 1024


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
        dtype: torch.dtype = torch.float32,
        fuse: bool = True,
        image_mode: str | None = None,
    ) -> FastVLM:
        """Load a checkpoint folder in the authors', transformers' or our format (or a hub id).

        The tower's architecture is read from its tensors. ``fuse`` (default) switches
        the tower to its fused inference form; pass ``fuse=False`` to train.
        """
        folder = resolve_checkpoint(path_or_hub_id)
        raw_config, fmt = read_config(folder)
        tensors = read_checkpoint_tensors(folder)
        names = model_keys_to_ours(tensors, fmt)
        ours = {names[k]: v for k, v in tensors.items()}
        tower_tensors = {k[len("vision_tower.") :]: v for k, v in ours.items() if k.startswith("vision_tower.")}
        if not tower_tensors:
            raise ValueError(f"{folder}: the checkpoint holds no vision-tower tensors")
        # The unused CLIP head (head.proj) is kept when present, so that checkpoints round-trip.
        vision = infer_tower_config(tower_tensors, keep_head=True)
        config = FastVLMConfig.from_checkpoint_config(raw_config, fmt, vision, folder)
        if image_mode is not None:
            config.image_mode = image_mode
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        tied = config.text.tie_word_embeddings
        original = {v: k for k, v in names.items()}

        def name_in_checkpoint(key: str) -> str:
            return original.get(key) or model_keys_from_ours([key], fmt, vision)[key]

        check_state_dict(
            expected,
            ours,
            name_in_checkpoint,
            what=f"{folder} ({fmt} format) does not fit the model its config describes",
            optional=lambda key: key.endswith("num_batches_tracked") or (tied and key.endswith("lm_head.weight")),
        )
        if tied:
            ours.pop("language_model.lm_head.weight", None)
            expected = {k: v for k, v in expected.items() if k != "language_model.lm_head.weight"}
        model.load_state_dict(materialize(expected, ours, device=device, dtype=dtype), strict=False, assign=True)
        model._finish_loading(device)
        model.tokenizer = _load_tokenizer(folder)
        if config.image_token_id is None:  # the authors' checkpoints: use the tokenizer's <image>, if it has one
            config.image_token_id = _vocab_image_token(model.tokenizer, config.text.vocab_size)
        model.source_path = folder
        generation_config = folder / "generation_config.json"
        if generation_config.is_file():
            model.generation_eos_token_id = json.loads(generation_config.read_text()).get("eos_token_id")
        if fuse:
            model.vision_tower.fuse()
        return model.eval()

    def _finish_loading(self, device: torch.device | str) -> None:
        """Tie embeddings and rebuild the rotary tables, which a meta-device build leaves empty."""
        lm = self.language_model
        if self.config.text.tie_word_embeddings:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        with torch.device(device):
            lm.model.rotary_emb = type(lm.model.rotary_emb)(self.config.text)

    @classmethod
    def from_config(cls, config: FastVLMConfig, *, device="cpu", dtype=torch.float32, seed: int = 0) -> FastVLM:
        """A model with random weights (for benchmarks and tests)."""
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(config)
        return model.to(dtype).eval()

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        directory: str | os.PathLike,
        format: str = "fastvlm",
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
        if format not in ("fastvlm", "apple", "hf"):
            raise ValueError(f"unknown format {format!r}; expected fastvlm, apple or hf")
        if state_dict is None and getattr(self.vision_tower, "is_fused", False):
            raise ValueError(
                "this model's vision tower is fused for inference and no longer has checkpoint tensors; "
                "load it with fuse=False to save or convert it"
            )
        directory = Path(directory).resolve()
        if directory.exists() and (not directory.is_dir() or (any(directory.iterdir()) and not overwrite)):
            raise FileExistsError(f"{directory} exists and is not an empty folder; pass overwrite=True (--overwrite)")
        config, tokenizer = self.config, self.tokenizer
        state = dict(self.state_dict() if state_dict is None else state_dict)
        if format == "hf" and config.image_token_id is None:
            config, tokenizer, state = self._add_image_token(state)
        if config.text.tie_word_embeddings:
            state.pop("language_model.lm_head.weight", None)
        if format == "hf":  # transformers' format has no place for the unused CLIP head (its converter drops it)
            state.pop("vision_tower.head.proj", None)
        names = model_keys_from_ours(state, format, config.vision)
        tensors = {names[k]: v for k, v in state.items()}
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging.", dir=directory.parent))
        try:
            save_safetensors_atomic(tensors, staging / "model.safetensors", metadata={"format": "pt"})
            (staging / "config.json").write_text(json.dumps(config.to_checkpoint_config(format), indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            if not directory.exists():
                staging.rename(directory)
                return directory
            for stale in _weight_files(directory):
                stale.unlink()
            for item in staging.iterdir():
                os.replace(item, directory / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    def _add_image_token(self, state: dict[str, torch.Tensor]):
        """(config, tokenizer, state) with an ``<image>`` token, as transformers' format needs.

        Uses the tokenizer's ``<image>`` when it has one; otherwise (the released authors'
        checkpoints) adds it to a copy of the tokenizer, as transformers' converter does,
        growing the embedding rows (new rows zero: the image token's embedding is never
        read, image features replace it) only when the id falls outside the vocabulary.
        """
        import copy

        if self.tokenizer is None:
            raise ValueError("converting to transformers' format needs the checkpoint's tokenizer (none was found)")
        tokenizer = self.tokenizer
        token_id = _vocab_image_token(tokenizer, self.config.text.vocab_size)
        text = self.config.text
        if token_id is None:
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
            token_id = tokenizer.convert_tokens_to_ids("<image>")
            if token_id >= text.vocab_size:
                new_vocab = -(-(token_id + 1) // 64) * 64  # transformers' converter pads to a multiple of 64
                state = dict(state)
                for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
                    if key in state:
                        old = state[key]
                        state[key] = torch.cat([old, old.new_zeros(new_vocab - old.shape[0], old.shape[1])])
                text = Qwen2Config(**{**text.to_dict(), "vocab_size": new_vocab})
        config = FastVLMConfig(**{**self.config.__dict__, "text": text, "image_token_id": token_id})
        return config, tokenizer, state


def _weight_files(folder: Path) -> list[Path]:
    patterns = (
        "model*.safetensors",
        "model.safetensors.index.json",
        "pytorch_model*.bin",
        "pytorch_model.bin.index.json",
    )
    return [p for pattern in patterns for p in folder.glob(pattern)]


def _vocab_image_token(tokenizer, vocab_size: int) -> int | None:
    """Id of the tokenizer's ``<image>`` token when it exists and has an embedding row, else None."""
    if tokenizer is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids("<image>")
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id or not 0 <= token_id < vocab_size:
        return None
    return token_id


def _load_tokenizer(folder: Path):
    has_tokenizer = any((folder / name).exists() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
    if not has_tokenizer:
        return None
    # AutoTokenizer reads config.json too and warns that llava_qwen2 is not a type it knows: expected here.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(level)


# Decoders of the released FastVLM checkpoints (Qwen2 configurations as published).
_QWEN2_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "tie_word_embeddings")  # fmt: skip
QWEN2_PRESETS = {
    size: dict(zip(_QWEN2_FIELDS, values, strict=True))
    for size, values in {
        "0.5b": (896, 24, 14, 2, 4864, 151936, True),
        "1.5b": (1536, 28, 12, 2, 8960, 151936, True),
        "7b": (3584, 28, 28, 4, 18944, 152064, False),
    }.items()
}


def qwen2_config(size: str) -> Qwen2Config:
    """The published Qwen2 decoder of a FastVLM size ("0.5b", "1.5b" or "7b")."""
    if size not in QWEN2_PRESETS:
        raise ValueError(f"unknown LLM size {size!r}; expected one of {sorted(QWEN2_PRESETS)}")
    return Qwen2Config(
        **QWEN2_PRESETS[size],
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        bos_token_id=151643,
        eos_token_id=151645,
        use_sliding_window=False,
    )


def fastvlm_config(llm: str = "0.5b", *, image_size: int = 1024, clip_head: bool = False) -> FastVLMConfig:
    """The architecture of a released FastVLM (FastViTHD + the named Qwen2 size), for random-weight use."""
    text = qwen2_config(llm)
    vision = FastViTConfig(projection_dim=768 if clip_head else None)
    return FastVLMConfig(text=text, vision=vision, image_size=image_size, model_max_length=8192)
