"""Architecture description of a FastViT-family vision tower.

One frozen dataclass holds every number that changes the set of tensors or the
computation, so that a tower can be rebuilt from its config alone and a config can be
inferred back from a state dict (see :func:`fastvlm.vision.layouts.infer_tower_config`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fastvlm.errors import ConfigError

TOKEN_MIXERS = ("repmixer", "attention")
# The stem halves the input side twice (two stride-2 convs); every stage after the first
# starts with a patch embedding that halves it again.
STEM_STRIDE = 4
DOWNSAMPLE_STRIDE = 2


@dataclass(frozen=True)
class FastViTConfig:
    """Stage layout of a FastViT tower.

    The tower is a stride-4 stem followed by ``len(depths)`` stages; every stage after
    the first begins with a stride-2 patch embedding, so the output stride is
    ``4 * 2 ** (len(depths) - 1)`` (64 for FastViTHD). A final depthwise expansion conv
    (``conv_exp`` in the authors' code) widens the last stage by ``cls_ratio``.
    """

    depths: tuple[int, ...] = (2, 12, 24, 4, 2)
    widths: tuple[int, ...] = (96, 192, 384, 768, 1536)
    token_mixers: tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention", "attention")
    # A RepCPE (7x7 depthwise conditional positional encoding) runs before these stages.
    pos_embeds: tuple[bool, ...] = (False, False, False, True, True)
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0, 4.0)
    # Squeeze-excitation inside the patch embedding before each stage (MobileCLIP's MCi0-2 use it;
    # FastViTHD drops it because it slows high resolutions down).
    se_downsamples: tuple[bool, ...] | None = None
    cls_ratio: float = 2.0
    head_dim: int = 32
    repmixer_kernel: int = 3
    pos_embed_kernel: int = 7
    down_kernel: int = 7
    down_small_kernel: int = 3
    # The authors' FastViTHD stem has no 1x1 "scale" branch in its training form.
    stem_scale_branch: bool = False
    layer_scale_init: float = 1e-5
    # Output width of the CLIP image head (``head.proj``); None when the tower has none.
    projection_dim: int | None = None
    # True: re-parameterised single-conv form (released checkpoints). False: training form.
    inference_mode: bool = True

    def __post_init__(self) -> None:
        n = len(self.depths)
        if self.se_downsamples is None:
            object.__setattr__(self, "se_downsamples", (False,) * n)
        for name in ("widths", "token_mixers", "pos_embeds", "mlp_ratios", "se_downsamples"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"FastViTConfig.{name} has {len(getattr(self, name))} entries, expected one per stage ({n})"
                )
        bad = [m for m in self.token_mixers if m not in TOKEN_MIXERS]
        if bad:
            raise ConfigError(f"unknown token mixer(s) {bad}; expected one of {TOKEN_MIXERS}")
        if self.pos_embeds[0]:
            raise ConfigError("a positional encoding before stage 0 is not supported")
        kernels = {
            "repmixer_kernel": self.repmixer_kernel,
            "pos_embed_kernel": self.pos_embed_kernel,
            "down_kernel": self.down_kernel,
            "down_small_kernel": self.down_small_kernel,
        }
        even = [f"{name}={k}" for name, k in kernels.items() if k < 1 or k % 2 == 0]
        if even:
            raise ConfigError(f"kernel sizes must be odd and positive: {', '.join(even)}")
        if self.down_small_kernel > self.down_kernel:
            raise ConfigError(
                f"down_small_kernel ({self.down_small_kernel}) must not exceed down_kernel ({self.down_kernel})"
            )
        for width, mixer in zip(self.widths, self.token_mixers, strict=True):
            if mixer == "attention" and width % self.head_dim:
                raise ConfigError(f"attention stage width {width} is not a multiple of head_dim {self.head_dim}")

    @property
    def stride(self) -> int:
        """Total downsampling factor of the tower (input side / feature-map side)."""
        return STEM_STRIDE * DOWNSAMPLE_STRIDE ** (len(self.depths) - 1)

    @property
    def out_channels(self) -> int:
        """Channels of the returned feature map (``conv_exp`` output)."""
        return int(self.widths[-1] * self.cls_ratio)

    def num_tokens(self, image_size: int) -> int:
        """Visual tokens for a square input of side ``image_size``."""
        side = image_size // self.stride
        return side * side

    def image_size_for(self, num_tokens: int) -> int:
        """The square input side that gives ``num_tokens`` visual tokens (the inverse of :meth:`num_tokens`)."""
        return math.isqrt(num_tokens) * self.stride

    def replace(self, **changes: Any) -> FastViTConfig:
        """A copy with ``changes`` applied (lists are taken as tuples)."""
        return FastViTConfig(**_tuples({**asdict(self), **changes}))

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (tuples as lists)."""
        values = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict) -> FastViTConfig:
        """The config that :meth:`to_dict` wrote; unknown fields are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown FastViTConfig field(s): {sorted(unknown)}")
        return cls(**_tuples(values))


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def fastvithd_config(**overrides: Any) -> FastViTConfig:
    """FastViTHD as in the paper and the released FastVLM checkpoints (``mobileclip_l``)."""
    return FastViTConfig(**overrides)


def mci2_config(**overrides: Any) -> FastViTConfig:
    """FastViT MCi2, MobileCLIP-S2's image tower: the paper's "FastViT" baseline (35.7M with its head)."""
    values = dict(
        depths=(4, 12, 24, 4),
        widths=(80, 160, 320, 640),
        token_mixers=("repmixer", "repmixer", "repmixer", "attention"),
        pos_embeds=(False, False, False, True),
        mlp_ratios=(3.0, 3.0, 3.0, 3.0),
        se_downsamples=(False, False, True, True),
        projection_dim=512,
    )
    return FastViTConfig(**{**values, **overrides})
