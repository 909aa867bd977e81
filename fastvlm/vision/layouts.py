"""Vision-tower key layouts: the same tensors under three naming schemes.

* :attr:`TowerLayout.OURS` (``"fastvlm"``): ``stem.N``,
  ``stages.S.{downsample.{spatial,pointwise},pos_embed,blocks.B}``, ``final_conv``;
  training-form branches ``conv_branches.I``, ``scale_branch``, ``skip_branch``.
* :attr:`TowerLayout.APPLE` (``"apple"``, the authors' MobileCLIP/FastViT code, in
  ``llava_qwen2`` checkpoints under ``model.vision_tower.vision_tower.model.``):
  ``patch_embed.N``, a flat ``network.N`` list, ``conv_exp``; branches ``rbr_conv.I``,
  ``rbr_scale``, ``rbr_skip``; ``lkb_reparam`` / ``lkb_origin``; RepCPE ``pe``; ConvFFN
  ``convffn``.
* :attr:`TowerLayout.TIMM` (``"timm"``, timm's ``fastvit_mci3``, in transformers
  ``fast_vlm`` checkpoints under ``model.vision_tower.timm_model.``): ``stem.N``,
  ``stages.S.{downsample.proj.{0,1},pos_emb,blocks.B}``, ``final_conv``; branches
  ``conv_kxk.I``, ``conv_scale``, ``identity``; ``se.fc1/fc2``; layer scales as
  ``….gamma``; RepCPE ``pos_enc``.

Every conversion goes through our layout, so ``apple -> timm`` is ``apple -> ours -> timm``.
Renames are two-way tables matched on whole dotted key segments, so no rename depends on
the order of the others. The architecture is read back from our names and shapes
(:func:`infer_tower_config`), which is what lets any FastViT-family tower load without a
config file. Nothing here reads files or builds modules (see :mod:`fastvlm.vision.loading`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum

import torch

from fastvlm.errors import CheckpointError, ConfigError
from fastvlm.vision.config import FastViTConfig


class TowerLayout(str, Enum):
    """A naming scheme of the tower's tensors; the values are the names users type."""

    OURS = "fastvlm"
    APPLE = "apple"
    TIMM = "timm"

    def __str__(self) -> str:
        return str(self.value)


TOWER_LAYOUTS = tuple(layout.value for layout in TowerLayout)

# Where each layout's tower sits inside a whole FastVLM checkpoint of the matching format.
TOWER_PREFIXES = {
    TowerLayout.APPLE: "model.vision_tower.vision_tower.model.",
    TowerLayout.TIMM: "model.vision_tower.timm_model.",
    TowerLayout.OURS: "vision_tower.",
}
# Every prefix a tower is found under, most specific first: the above, plus the base models
# (LlavaQwen2Model, transformers' FastVlmModel) and MobileCLIP image encoders.
KNOWN_TOWER_PREFIXES = (
    "model.vision_tower.vision_tower.model.",
    "vision_tower.vision_tower.model.",
    "model.vision_tower.timm_model.",
    "vision_tower.timm_model.",
    "image_encoder.model.",
    "vision_tower.",
)

# Key grammar of our layout: a structural unit, then the key inside that unit.
_OURS_UNIT = re.compile(
    r"^(?:(?P<stem>stem\.\d+)"
    r"|stages\.(?P<stage>\d+)\.(?:(?P<down>downsample\.(?:spatial|pointwise))|(?P<cpe>pos_embed)|blocks\.(?P<block>\d+))"
    r"|(?P<final>final_conv)|(?P<head>head))\.(?P<rest>.+)$"
)

# Renames inside a unit, as (ours, theirs) fragments matched on whole dotted segments.
_SE_TIMM = [("se.reduce", "se.fc1"), ("se.expand", "se.fc2")]
_MOBILEONE = {
    TowerLayout.APPLE: [("conv_branches", "rbr_conv"), ("scale_branch", "rbr_scale"), ("skip_branch", "rbr_skip")],
    TowerLayout.TIMM: [("conv_branches", "conv_kxk"), ("scale_branch", "conv_scale"), ("skip_branch", "identity")]
    + _SE_TIMM,
}
_LARGE_KERNEL = {
    TowerLayout.APPLE: [("reparam_conv", "lkb_reparam"), ("large_conv", "lkb_origin")],
    TowerLayout.TIMM: _SE_TIMM,
}
_POS_EMBED = {TowerLayout.APPLE: [("pos_conv", "pe")], TowerLayout.TIMM: [("pos_conv", "pos_enc")]}
_BLOCK = {
    TowerLayout.APPLE: [("mlp", "convffn")] + _MOBILEONE[TowerLayout.APPLE],
    TowerLayout.TIMM: [
        ("layer_scale", "layer_scale.gamma"),
        ("layer_scale_1", "layer_scale_1.gamma"),
        ("layer_scale_2", "layer_scale_2.gamma"),
    ]
    + _MOBILEONE[TowerLayout.TIMM],
}

# One entry of the authors' flat ``network`` list: (kind, stage), kind in downsample/pos_embed/blocks.
NetworkTable = list[tuple[str, int]]


def tower_layout(name: str | TowerLayout) -> TowerLayout:
    """The layout called ``name`` ("fastvlm", "apple" or "timm")."""
    try:
        return TowerLayout(name)
    except ValueError:
        raise ConfigError(f"unknown tower layout {name!r}; expected one of {TOWER_LAYOUTS}") from None


def _rename(key: str, pairs: list[tuple[str, str]], reverse: bool) -> str:
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        key = re.sub(rf"(?<![^.]){re.escape(src)}(?![^.])", dst, key)
    return key


def network_table(config: FastViTConfig) -> NetworkTable:
    """The authors' flat ``network`` list as (kind, stage) entries, kind in downsample/pos_embed/blocks."""
    table = []
    for stage in range(len(config.depths)):
        if stage > 0:
            table.append(("downsample", stage))
        if config.pos_embeds[stage]:
            table.append(("pos_embed", stage))
        table.append(("blocks", stage))
    return table


def _network_table_from_apple_keys(keys: Iterable[str]) -> NetworkTable:
    kinds: dict[int, str] = {}
    for key in keys:
        m = re.match(r"^network\.(\d+)\.([^.]+)\.", key)
        if not m:
            continue
        idx, sub = int(m.group(1)), m.group(2)
        kind = "downsample" if sub == "proj" else "blocks" if sub.isdigit() else "pos_embed"
        if kinds.setdefault(idx, kind) != kind:
            raise CheckpointError(f"network.{idx} mixes tensors of a {kinds[idx]} and a {kind}: {key}")
    if sorted(kinds) != list(range(len(kinds))):
        raise CheckpointError(f"the authors' 'network' list has gaps: indices {sorted(kinds)}")
    table: NetworkTable = []
    stage = 0
    for idx in range(len(kinds)):
        kind = kinds[idx]
        if kind == "downsample":
            stage += 1
        elif table and table[-1][0] == "blocks":
            raise CheckpointError(
                f"network.{idx - 1} and network.{idx} are block groups with no patch embedding between them; "
                "towers whose stages do not all downsample are not supported"
            )
        table.append((kind, stage))
    return table


def _to_foreign(key: str, layout: TowerLayout, table: NetworkTable) -> str:
    m = _OURS_UNIT.match(key)
    if not m:
        raise CheckpointError(f"not a FastViT tensor name in our layout: {key!r}")
    apple = layout is TowerLayout.APPLE
    rest = m["rest"]
    if m["stem"]:
        unit = m["stem"].replace("stem", "patch_embed") if apple else m["stem"]
        return f"{unit}.{_rename(rest, _MOBILEONE[layout], False)}"
    if m["final"]:
        return f"{'conv_exp' if apple else 'final_conv'}.{_rename(rest, _MOBILEONE[layout], False)}"
    if m["head"]:
        return key
    stage = int(m["stage"])
    if m["down"]:
        part = m["down"].split(".")[1]
        pairs = _LARGE_KERNEL[layout] if part == "spatial" else _MOBILEONE[layout]
        sub = "0" if part == "spatial" else "1"
        rest = _rename(rest, pairs, False)
        if apple:
            return f"network.{table.index(('downsample', stage))}.proj.{sub}.{rest}"
        return f"stages.{stage}.downsample.proj.{sub}.{rest}"
    if m["cpe"]:
        rest = _rename(rest, _POS_EMBED[layout], False)
        if apple:
            return f"network.{table.index(('pos_embed', stage))}.{rest}"
        return f"stages.{stage}.pos_emb.{rest}"
    rest = _rename(rest, _BLOCK[layout], False)
    if apple:
        return f"network.{table.index(('blocks', stage))}.{m['block']}.{rest}"
    return f"stages.{stage}.blocks.{m['block']}.{rest}"


def _downsample_to_ours(stage: int | str, key: str, layout: TowerLayout) -> str | None:
    """``proj.{0,1}.…`` of a patch embedding, in our names; None when ``key`` is not one."""
    d = re.match(r"^proj\.([01])\.(.+)$", key)
    if d is None:
        return None
    part, pairs = ("spatial", _LARGE_KERNEL[layout]) if d[1] == "0" else ("pointwise", _MOBILEONE[layout])
    return f"stages.{stage}.downsample.{part}.{_rename(d[2], pairs, True)}"


def _from_apple(key: str, table: NetworkTable) -> str:
    apple = TowerLayout.APPLE
    if m := re.match(r"^patch_embed\.(\d+)\.(.+)$", key):
        return f"stem.{m[1]}.{_rename(m[2], _MOBILEONE[apple], True)}"
    if m := re.match(r"^conv_exp\.(.+)$", key):
        return f"final_conv.{_rename(m[1], _MOBILEONE[apple], True)}"
    if key.startswith("head."):
        return key
    if m := re.match(r"^network\.(\d+)\.(.+)$", key):
        idx, rest = int(m[1]), m[2]
        if idx >= len(table):
            raise CheckpointError(f"unexpected tensor {key!r}: there is no network.{idx}")
        kind, stage = table[idx]
        if kind == "downsample" and (down := _downsample_to_ours(stage, rest, apple)):
            return down
        if kind == "pos_embed":
            return f"stages.{stage}.pos_embed.{_rename(rest, _POS_EMBED[apple], True)}"
        if kind == "blocks" and (b := re.match(r"^(\d+)\.(.+)$", rest)):
            return f"stages.{stage}.blocks.{b[1]}.{_rename(b[2], _BLOCK[apple], True)}"
    raise CheckpointError(f"not a FastViT tensor name in the authors' layout: {key!r}")


def _from_timm(key: str) -> str:
    timm = TowerLayout.TIMM
    if m := re.match(r"^(stem\.\d+|final_conv)\.(.+)$", key):
        return f"{m[1]}.{_rename(m[2], _MOBILEONE[timm], True)}"
    if key.startswith("head."):
        return key
    if m := re.match(r"^stages\.(\d+)\.(.+)$", key):
        stage, rest = m[1], m[2]
        if (d := re.match(r"^downsample\.(.+)$", rest)) and (down := _downsample_to_ours(stage, d[1], timm)):
            return down
        if p := re.match(r"^pos_emb\.(.+)$", rest):
            return f"stages.{stage}.pos_embed.{_rename(p[1], _POS_EMBED[timm], True)}"
        if b := re.match(r"^blocks\.(\d+)\.(.+)$", rest):
            return f"stages.{stage}.blocks.{b[1]}.{_rename(b[2], _BLOCK[timm], True)}"
    raise CheckpointError(f"not a FastViT tensor name in timm's layout: {key!r}")


# ----------------------------------------------------------------------------------------
# Detection and conversion
# ----------------------------------------------------------------------------------------


def extract_tower_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The tower's tensors of a whole-model state dict without their prefix, and that prefix.

    A state dict of the tower alone comes back unchanged with prefix "".
    """
    for prefix in KNOWN_TOWER_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix
    return dict(state_dict), ""


def detect_tower_layout(keys: Iterable[str]) -> TowerLayout:
    """The layout of un-prefixed tower keys (equal to "fastvlm", "apple" or "timm")."""
    keys = list(keys)
    first = {k.split(".")[0] for k in keys}
    if first & {"patch_embed", "network", "conv_exp"}:
        return TowerLayout.APPLE
    if any(".downsample.proj." in k or ".pos_emb." in k or k.endswith(".gamma") or ".se.fc1." in k for k in keys):
        return TowerLayout.TIMM
    if any(".downsample.spatial." in k or ".pos_embed." in k or ".se.reduce." in k for k in keys):
        return TowerLayout.OURS
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise CheckpointError(
        "cannot tell the layout of this vision-tower state dict: expected the authors' keys "
        "(patch_embed.*, network.N.*, conv_exp.*), timm's (stem.*, stages.N.*, final_conv.se.fc1.*) "
        f"or ours (stem.*, stages.N.*, final_conv.se.reduce.*); got {sample}"
    )


def tower_keys_to_ours(keys: Iterable[str], layout: str | TowerLayout) -> dict[str, str]:
    """Map each un-prefixed key of ``layout`` to our name ({theirs: ours})."""
    keys = list(keys)
    layout = tower_layout(layout)
    if layout is TowerLayout.OURS:
        for key in keys:
            if not _OURS_UNIT.match(key):
                raise CheckpointError(f"not a FastViT tensor name in our layout: {key!r}")
        return {k: k for k in keys}
    if layout is TowerLayout.APPLE:
        table = _network_table_from_apple_keys(keys)
        names = {k: _from_apple(k, table) for k in keys}
    else:
        names = {k: _from_timm(k) for k in keys}
    seen: dict[str, str] = {}
    for theirs, ours in names.items():
        if ours in seen:
            raise CheckpointError(
                f"tensors {seen[ours]!r} and {theirs!r} would both be {ours!r}: not one FastViT tower"
            )
        seen[ours] = theirs
    return names


def tower_keys_from_ours(keys: Iterable[str], layout: str | TowerLayout, config: FastViTConfig) -> dict[str, str]:
    """Map each of our un-prefixed keys to its name in ``layout`` ({ours: theirs}).

    ``config`` places each stage's units in the authors' flat ``network`` list.
    """
    layout = tower_layout(layout)
    if layout is TowerLayout.OURS:
        return {k: k for k in keys}
    table = network_table(config)
    return {k: _to_foreign(k, layout, table) for k in keys}


def convert_tower_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    to: str | TowerLayout,
    *,
    prefix: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename a tower state dict (any layout, prefixed or not) into layout ``to``.

    Tensors are passed through untouched (no copy). With ``prefix=True`` the keys get
    the prefix the tower has inside a whole FastVLM checkpoint of that layout.
    """
    to = tower_layout(to)
    tensors, _ = extract_tower_state_dict(state_dict)
    names = tower_keys_to_ours(tensors, detect_tower_layout(tensors))
    ours = {names[k]: v for k, v in tensors.items()}
    if to is TowerLayout.OURS:
        out = ours
    else:
        foreign = tower_keys_from_ours(ours, to, infer_tower_config(ours))
        out = {foreign[k]: v for k, v in ours.items()}
    if prefix:
        out = {TOWER_PREFIXES[to] + k: v for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------------
# The architecture, read off our names and shapes
# ----------------------------------------------------------------------------------------


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    t = sd.get(key)
    return tuple(t.shape) if t is not None else None


def infer_tower_config(ours: Mapping[str, torch.Tensor], keep_head: bool = False) -> FastViTConfig:
    """Read a :class:`FastViTConfig` off a state dict in our layout."""
    stages = sorted({int(m[1]) for k in ours if (m := re.match(r"^stages\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"tower state dict has stages {stages}; expected 0..N-1 with N >= 1")
    inference = "stem.0.reparam_conv.weight" in ours
    if not inference and "stem.0.conv_branches.0.conv.weight" not in ours:
        raise CheckpointError(
            "tower state dict has neither stem.0.reparam_conv.weight (inference form) nor "
            "stem.0.conv_branches.0.conv.weight (training form)"
        )
    depths, widths, mixers, pos, ratios, se = [], [], [], [], [], []
    for s in stages:
        blocks = {int(m[1]) for k in ours if (m := re.match(rf"^stages\.{s}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise CheckpointError(f"stage {s} of the tower state dict has no blocks")
        depths.append(max(blocks) + 1)
        fc1 = _shape(ours, f"stages.{s}.blocks.0.mlp.fc1.weight")
        if fc1 is None:
            raise CheckpointError(
                f"missing tensor stages.{s}.blocks.0.mlp.fc1.weight (needed to read stage {s}'s width)"
            )
        widths.append(fc1[1])
        ratios.append(fc1[0] / fc1[1])
        mixers.append("attention" if f"stages.{s}.blocks.0.token_mixer.qkv.weight" in ours else "repmixer")
        pos.append(any(k.startswith(f"stages.{s}.pos_embed.") for k in ours))
        se.append(f"stages.{s}.downsample.spatial.se.reduce.weight" in ours)

    def kernel_side(default: int, *keys: str) -> int:
        """Last dim of the first of ``keys`` present (a square kernel's side), else ``default``."""
        shapes = [_shape(ours, k) for k in keys]
        return next((shape[-1] for shape in shapes if shape is not None), default)

    branch = "reparam_conv" if inference else "conv_branches.0.conv"
    final = _shape(ours, f"final_conv.{branch}.weight")
    if final is None:
        raise CheckpointError(f"missing tensor final_conv.{branch}.weight")
    # The first stage that has each kind of layer (stage indices absent from the keys read as absent).
    rep = f"stages.{mixers.index('repmixer') if 'repmixer' in mixers else -1}.blocks.0.token_mixer"
    cpe = f"stages.{pos.index(True) if True in pos else -1}.pos_embed"
    down = "stages.1.downsample.spatial"
    head = _shape(ours, "head.proj")
    return FastViTConfig(
        depths=tuple(depths),
        widths=tuple(widths),
        token_mixers=tuple(mixers),
        pos_embeds=tuple(pos),
        mlp_ratios=tuple(ratios),
        se_downsamples=tuple(se),
        cls_ratio=final[0] / widths[-1],
        repmixer_kernel=kernel_side(3, f"{rep}.reparam_conv.weight", f"{rep}.mixer.conv_branches.0.conv.weight"),
        pos_embed_kernel=kernel_side(7, f"{cpe}.reparam_conv.weight", f"{cpe}.pos_conv.weight"),
        down_kernel=kernel_side(7, f"{down}.reparam_conv.weight", f"{down}.large_conv.conv.weight"),
        down_small_kernel=kernel_side(3, f"{down}.small_conv.conv.weight"),
        stem_scale_branch="stem.0.scale_branch.conv.weight" in ours,
        projection_dim=head[1] if keep_head and head else None,
        inference_mode=inference,
    )
