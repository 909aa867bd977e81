"""Checkpoint layouts: detection, key maps and strict loading.

Vision tower layouts (the same tensors under three naming schemes):

* ``"fastvlm"`` (ours): ``stem.N``, ``stages.S.{downsample.{spatial,pointwise},pos_embed,blocks.B}``,
  ``final_conv``; training-form branches ``conv_branches.I``, ``scale_branch``, ``skip_branch``.
* ``"apple"`` (the authors' MobileCLIP/FastViT code, in ``llava_qwen2`` checkpoints under
  ``model.vision_tower.vision_tower.model.``): ``patch_embed.N``, a flat ``network.N`` list,
  ``conv_exp``; branches ``rbr_conv.I``, ``rbr_scale``, ``rbr_skip``; ``lkb_reparam`` /
  ``lkb_origin``; RepCPE ``pe``; ConvFFN ``convffn``.
* ``"timm"`` (timm's ``fastvit_mci3``, in transformers ``fast_vlm`` checkpoints under
  ``model.vision_tower.timm_model.``): ``stem.N``, ``stages.S.{downsample.proj.{0,1},pos_emb,blocks.B}``,
  ``final_conv``; branches ``conv_kxk.I``, ``conv_scale``, ``identity``; ``se.fc1/fc2``; layer
  scales as ``….gamma``; RepCPE ``pos_enc``.

Every conversion goes through our layout, so ``apple -> timm`` is ``apple -> ours -> timm``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastvlm.vision.config import FastViTConfig

if TYPE_CHECKING:
    from fastvlm.vision.fastvit import FastViT

TOWER_LAYOUTS = ("fastvlm", "apple", "timm")

# Where each layout's tower sits inside a whole FastVLM checkpoint.
TOWER_PREFIXES = {
    "apple": "model.vision_tower.vision_tower.model.",
    "timm": "model.vision_tower.timm_model.",
    "fastvlm": "vision_tower.",
}
# Every prefix a tower is found under, most specific first: the above, plus the base models
# (LlavaQwen2Model, transformers' FastVlmModel) and MobileCLIP image encoders.
_KNOWN_TOWER_PREFIXES = (
    "model.vision_tower.vision_tower.model.",
    "vision_tower.vision_tower.model.",
    "model.vision_tower.timm_model.",
    "vision_tower.timm_model.",
    "image_encoder.model.",
    "vision_tower.",
)

# ----------------------------------------------------------------------------------------
# Key grammar of our layout: a structural unit, then the key inside that unit.
# ----------------------------------------------------------------------------------------

_OURS_UNIT = re.compile(
    r"^(?:(?P<stem>stem\.\d+)"
    r"|stages\.(?P<stage>\d+)\.(?:(?P<down>downsample\.(?:spatial|pointwise))|(?P<cpe>pos_embed)|blocks\.(?P<block>\d+))"
    r"|(?P<final>final_conv)|(?P<head>head))\.(?P<rest>.+)$"
)

# Renames inside a unit, as (ours, theirs) fragments matched on whole dotted segments.
_MOBILEONE = {
    "apple": [("conv_branches", "rbr_conv"), ("scale_branch", "rbr_scale"), ("skip_branch", "rbr_skip")],
    "timm": [
        ("conv_branches", "conv_kxk"),
        ("scale_branch", "conv_scale"),
        ("skip_branch", "identity"),
        ("se.reduce", "se.fc1"),
        ("se.expand", "se.fc2"),
    ],
}
_LARGE_KERNEL = {
    "apple": [("reparam_conv", "lkb_reparam"), ("large_conv", "lkb_origin")],
    "timm": [("se.reduce", "se.fc1"), ("se.expand", "se.fc2")],
}
_POS_EMBED = {"apple": [("pos_conv", "pe")], "timm": [("pos_conv", "pos_enc")]}
_BLOCK = {
    "apple": [("mlp", "convffn")] + _MOBILEONE["apple"],
    "timm": [
        ("layer_scale", "layer_scale.gamma"),
        ("layer_scale_1", "layer_scale_1.gamma"),
        ("layer_scale_2", "layer_scale_2.gamma"),
    ]
    + _MOBILEONE["timm"],
}


def _rename(key: str, pairs: list[tuple[str, str]], reverse: bool) -> str:
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        key = re.sub(rf"(?<![^.]){re.escape(src)}(?![^.])", dst, key)
    return key


def network_table(config: FastViTConfig) -> list[tuple[str, int]]:
    """The authors' flat ``network`` list as (kind, stage) entries, kind in downsample/pos_embed/blocks."""
    table = []
    for stage in range(len(config.depths)):
        if stage > 0:
            table.append(("downsample", stage))
        if config.pos_embeds[stage]:
            table.append(("pos_embed", stage))
        table.append(("blocks", stage))
    return table


def _network_table_from_apple_keys(keys: Iterable[str]) -> list[tuple[str, int]]:
    kinds: dict[int, str] = {}
    for key in keys:
        m = re.match(r"^network\.(\d+)\.([^.]+)\.", key)
        if not m:
            continue
        idx, sub = int(m.group(1)), m.group(2)
        kind = "downsample" if sub == "proj" else "blocks" if sub.isdigit() else "pos_embed"
        if kinds.setdefault(idx, kind) != kind:
            raise ValueError(f"network.{idx} mixes tensors of a {kinds[idx]} and a {kind}: {key}")
    if sorted(kinds) != list(range(len(kinds))):
        raise ValueError(f"the authors' 'network' list has gaps: indices {sorted(kinds)}")
    table, stage = [], 0
    for idx in range(len(kinds)):
        kind = kinds[idx]
        if kind == "downsample":
            stage += 1
        elif table and table[-1][0] == "blocks":
            raise ValueError(
                f"network.{idx - 1} and network.{idx} are block groups with no patch embedding between them; "
                "towers whose stages do not all downsample are not supported"
            )
        table.append((kind, stage))
    return table


def _to_foreign(key: str, layout: str, table: list[tuple[str, int]]) -> str:
    m = _OURS_UNIT.match(key)
    if not m:
        raise ValueError(f"not a FastViT tensor name in our layout: {key!r}")
    rest = m["rest"]
    if m["stem"]:
        unit = m["stem"].replace("stem", "patch_embed") if layout == "apple" else m["stem"]
        return f"{unit}.{_rename(rest, _MOBILEONE[layout], False)}"
    if m["final"]:
        unit = "conv_exp" if layout == "apple" else "final_conv"
        return f"{unit}.{_rename(rest, _MOBILEONE[layout], False)}"
    if m["head"]:
        return key
    stage = int(m["stage"])
    if m["down"]:
        part = m["down"].split(".")[1]
        pairs = _LARGE_KERNEL[layout] if part == "spatial" else _MOBILEONE[layout]
        sub = "0" if part == "spatial" else "1"
        rest = _rename(rest, pairs, False)
        if layout == "apple":
            return f"network.{table.index(('downsample', stage))}.proj.{sub}.{rest}"
        return f"stages.{stage}.downsample.proj.{sub}.{rest}"
    if m["cpe"]:
        rest = _rename(rest, _POS_EMBED[layout], False)
        if layout == "apple":
            return f"network.{table.index(('pos_embed', stage))}.{rest}"
        return f"stages.{stage}.pos_emb.{rest}"
    rest = _rename(rest, _BLOCK[layout], False)
    if layout == "apple":
        return f"network.{table.index(('blocks', stage))}.{m['block']}.{rest}"
    return f"stages.{stage}.blocks.{m['block']}.{rest}"


def _from_apple(key: str, table: list[tuple[str, int]]) -> str:
    if m := re.match(r"^patch_embed\.(\d+)\.(.+)$", key):
        return f"stem.{m[1]}.{_rename(m[2], _MOBILEONE['apple'], True)}"
    if m := re.match(r"^conv_exp\.(.+)$", key):
        return f"final_conv.{_rename(m[1], _MOBILEONE['apple'], True)}"
    if key.startswith("head."):
        return key
    if m := re.match(r"^network\.(\d+)\.(.+)$", key):
        idx, rest = int(m[1]), m[2]
        if idx >= len(table):
            raise ValueError(f"unexpected tensor {key!r}: there is no network.{idx}")
        kind, stage = table[idx]
        if kind == "downsample" and (d := re.match(r"^proj\.([01])\.(.+)$", rest)):
            part, pairs = ("spatial", _LARGE_KERNEL["apple"]) if d[1] == "0" else ("pointwise", _MOBILEONE["apple"])
            return f"stages.{stage}.downsample.{part}.{_rename(d[2], pairs, True)}"
        if kind == "pos_embed":
            return f"stages.{stage}.pos_embed.{_rename(rest, _POS_EMBED['apple'], True)}"
        if kind == "blocks" and (b := re.match(r"^(\d+)\.(.+)$", rest)):
            return f"stages.{stage}.blocks.{b[1]}.{_rename(b[2], _BLOCK['apple'], True)}"
    raise ValueError(f"not a FastViT tensor name in the authors' layout: {key!r}")


def _from_timm(key: str) -> str:
    if m := re.match(r"^(stem\.\d+|final_conv)\.(.+)$", key):
        return f"{m[1]}.{_rename(m[2], _MOBILEONE['timm'], True)}"
    if key.startswith("head."):
        return key
    if m := re.match(r"^stages\.(\d+)\.(.+)$", key):
        stage, rest = m[1], m[2]
        if d := re.match(r"^downsample\.proj\.([01])\.(.+)$", rest):
            part, pairs = ("spatial", _LARGE_KERNEL["timm"]) if d[1] == "0" else ("pointwise", _MOBILEONE["timm"])
            return f"stages.{stage}.downsample.{part}.{_rename(d[2], pairs, True)}"
        if p := re.match(r"^pos_emb\.(.+)$", rest):
            return f"stages.{stage}.pos_embed.{_rename(p[1], _POS_EMBED['timm'], True)}"
        if b := re.match(r"^blocks\.(\d+)\.(.+)$", rest):
            return f"stages.{stage}.blocks.{b[1]}.{_rename(b[2], _BLOCK['timm'], True)}"
    raise ValueError(f"not a FastViT tensor name in timm's layout: {key!r}")


# ----------------------------------------------------------------------------------------
# Layout detection and conversion
# ----------------------------------------------------------------------------------------


def extract_tower_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The tower's tensors of a whole-model state dict without their prefix, and that prefix.

    A state dict of the tower alone comes back unchanged with prefix "".
    """
    for prefix in _KNOWN_TOWER_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix
    return dict(state_dict), ""


def detect_tower_layout(keys: Iterable[str]) -> str:
    """Name the layout ("fastvlm", "apple" or "timm") of un-prefixed tower keys."""
    keys = list(keys)
    first = {k.split(".")[0] for k in keys}
    if first & {"patch_embed", "network", "conv_exp"}:
        return "apple"
    if any(".downsample.proj." in k or ".pos_emb." in k or k.endswith(".gamma") or ".se.fc1." in k for k in keys):
        return "timm"
    if any(".downsample.spatial." in k or ".pos_embed." in k or ".se.reduce." in k for k in keys):
        return "fastvlm"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise ValueError(
        "cannot tell the layout of this vision-tower state dict: expected the authors' keys "
        "(patch_embed.*, network.N.*, conv_exp.*), timm's (stem.*, stages.N.*, final_conv.se.fc1.*) "
        f"or ours (stem.*, stages.N.*, final_conv.se.reduce.*); got {sample}"
    )


def tower_keys_to_ours(keys: Iterable[str], layout: str) -> dict[str, str]:
    """Map each un-prefixed key of ``layout`` to our name ({theirs: ours})."""
    keys = list(keys)
    if layout == "fastvlm":
        for key in keys:
            if not _OURS_UNIT.match(key):
                raise ValueError(f"not a FastViT tensor name in our layout: {key!r}")
        return {k: k for k in keys}
    if layout == "apple":
        table = _network_table_from_apple_keys(keys)
        names = {k: _from_apple(k, table) for k in keys}
    elif layout == "timm":
        names = {k: _from_timm(k) for k in keys}
    else:
        raise ValueError(f"unknown tower layout {layout!r}; expected one of {TOWER_LAYOUTS}")
    seen: dict[str, str] = {}
    for theirs, ours in names.items():
        if ours in seen:
            raise ValueError(f"tensors {seen[ours]!r} and {theirs!r} would both be {ours!r}: not one FastViT tower")
        seen[ours] = theirs
    return names


def convert_tower_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    to: str,
    *,
    prefix: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename a tower state dict (any layout, prefixed or not) into layout ``to``.

    Tensors are passed through untouched (no copy). With ``prefix=True`` the keys get
    the prefix the tower has inside a whole FastVLM checkpoint of that layout.
    """
    if to not in TOWER_LAYOUTS:
        raise ValueError(f"unknown tower layout {to!r}; expected one of {TOWER_LAYOUTS}")
    tensors, _ = extract_tower_state_dict(state_dict)
    names = tower_keys_to_ours(tensors, detect_tower_layout(tensors))
    ours = {names[k]: v for k, v in tensors.items()}
    if to == "fastvlm":
        out = ours
    else:
        config = infer_tower_config(ours)
        table = network_table(config)
        out = {_to_foreign(k, to, table): v for k, v in ours.items()}
    if prefix:
        out = {TOWER_PREFIXES[to] + k: v for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------------
# Config inference and strict loading
# ----------------------------------------------------------------------------------------


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    t = sd.get(key)
    return tuple(t.shape) if t is not None else None


def infer_tower_config(ours: Mapping[str, torch.Tensor], keep_head: bool = False) -> FastViTConfig:
    """Read a :class:`FastViTConfig` off a state dict in our layout."""
    stages = sorted({int(m[1]) for k in ours if (m := re.match(r"^stages\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise ValueError(f"tower state dict has stages {stages}; expected 0..N-1 with N >= 1")
    inference = "stem.0.reparam_conv.weight" in ours
    if not inference and "stem.0.conv_branches.0.conv.weight" not in ours:
        raise ValueError(
            "tower state dict has neither stem.0.reparam_conv.weight (inference form) nor "
            "stem.0.conv_branches.0.conv.weight (training form)"
        )
    depths, widths, mixers, pos, ratios, se = [], [], [], [], [], []
    for s in stages:
        blocks = {int(m[1]) for k in ours if (m := re.match(rf"^stages\.{s}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise ValueError(f"stage {s} of the tower state dict has no blocks")
        depths.append(max(blocks) + 1)
        fc1 = _shape(ours, f"stages.{s}.blocks.0.mlp.fc1.weight")
        if fc1 is None:
            raise ValueError(f"missing tensor stages.{s}.blocks.0.mlp.fc1.weight (needed to read stage {s}'s width)")
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
        raise ValueError(f"missing tensor final_conv.{branch}.weight")
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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.bin``/``.pt`` file loaded with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder; expected a checkpoint file (.safetensors, .bin or .pt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors alike: the file is not readable weights
        raise ValueError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from None


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a .safetensors file so that a crash never leaves a half-written file at ``path``.

    The tensors go to a temporary file in the same folder, which is then renamed over
    ``path`` (an atomic step on POSIX file systems).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before it takes the final name
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    provided: Mapping[str, torch.Tensor],
    name_of: Callable[[str], str],
    *,
    what: str,
    optional: Callable[[str], bool] = lambda key: key.endswith("num_batches_tracked"),
) -> None:
    """Raise a ValueError listing missing, unexpected and mis-shaped tensors.

    Keys are ours; ``name_of`` spells them as the checkpoint does, so that the message
    names tensors the user can find in their file. ``optional`` keys may be missing.
    """
    missing = [k for k in expected if k not in provided and not optional(k)]
    unexpected = [k for k in provided if k not in expected]
    mismatched = [
        f"{name_of(k)}: checkpoint {list(provided[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in provided and provided[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe([name_of(k) for k in missing])}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe([name_of(k) for k in unexpected])}")
    if mismatched:
        problems.append(f"tensors with the wrong shape: {_describe(mismatched)}")
    if problems:
        details = "\n  ".join(problems)
        raise ValueError(f"{what}:\n  {details}")


def materialize(
    expected: Mapping[str, torch.Tensor],
    provided: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """The tensors to assign into a meta-built model: cast, moved, with absent counters as zeros."""
    out = {}
    for key in expected:
        value = provided.get(key)
        if value is None:  # num_batches_tracked: a training counter, irrelevant to the output
            value = torch.zeros((), dtype=torch.long)
        if value.is_floating_point() and dtype is not None:
            value = value.to(dtype)
        out[key] = value.to(device) if device is not None else value
    return out


def _describe(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def load_tower_state_dict(
    cls: type[FastViT],
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    config: FastViTConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> FastViT:
    """Implementation of :meth:`FastViT.from_state_dict` (strict, with named errors)."""
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = read_state_dict(state_dict)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"state dict entries that are not tensors: {_describe(not_tensors)}")
    tensors, prefix = extract_tower_state_dict(state_dict)
    layout = detect_tower_layout(tensors)
    names = tower_keys_to_ours(tensors, layout)
    original = {ours: prefix + theirs for theirs, ours in names.items()}
    ours = {names[k]: v for k, v in tensors.items()}
    keep_head = config is not None and config.projection_dim is not None
    if not keep_head:
        ours.pop("head.proj", None)
    if config is None:
        try:
            config = infer_tower_config(ours)
        except (IndexError, ZeroDivisionError, TypeError) as err:
            raise ValueError(
                f"cannot read the tower's architecture from its tensors (a tensor has an odd shape: {err})"
            ) from None

    with torch.device("meta"):
        model = cls(config)
    table = network_table(config)

    def theirs(key: str) -> str:
        if key in original:
            return original[key]
        return prefix + (key if layout == "fastvlm" else _to_foreign(key, layout, table))

    expected = model.state_dict()
    check_state_dict(expected, ours, theirs, what=f"vision tower checkpoint ({layout} layout) does not fit {config}")
    model.load_state_dict(materialize(expected, ours, device=device, dtype=dtype), strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------
# Whole FastVLM checkpoints (folders): formats, files, key maps
# ----------------------------------------------------------------------------------------

MODEL_FORMATS = ("fastvlm", "apple", "hf")
_TOWER_LAYOUT_OF_FORMAT = {"fastvlm": "fastvlm", "apple": "apple", "hf": "timm"}
_MODEL_TYPES = {"llava_qwen2": "apple", "fast_vlm": "hf", "fastvlm": "fastvlm"}
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint folder, downloading a Hugging Face Hub id (``owner/name``) if needed.

    Offline (no network, or ``HF_HUB_OFFLINE=1``) a hub id works only from the local
    cache; otherwise this raises a ``FileNotFoundError`` saying so.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder not found: {path} (expected a folder or a hub id owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=WEIGHT_PATTERNS))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"cannot download {text!r} from the Hugging Face Hub: this machine is offline (or HF_HUB_OFFLINE is "
            "set) and the hub cache has no copy; download it on a connected machine "
            f"(`huggingface-cli download {text}`) or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no model {text!r} on the Hugging Face Hub (or it is private)") from None
    except (HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(f"cannot download {text!r} from the Hugging Face Hub: {err}") from None


def read_config(folder: Path) -> tuple[dict, str]:
    """config.json of a checkpoint folder and its format ("apple", "hf" or "fastvlm")."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a FastVLM checkpoint folder?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"{config_path}: model_type {model_type!r} is not a FastVLM checkpoint; expected one of "
            f"{sorted(_MODEL_TYPES)} (the authors' llava_qwen2, transformers' fast_vlm, or ours)"
        )
    return config, _MODEL_TYPES[model_type]


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, sharded safetensors (with an index) or pytorch_model*.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' naming the shard of each tensor")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shard files that are missing: {', '.join(missing)}")
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(read_state_dict(folder / shard))
            return tensors
    for pattern in ("model.safetensors", "model*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            tensors = {}
            for file in files:
                tensors.update(read_state_dict(file))
            return tensors
    raise FileNotFoundError(f"{folder} has no weights (model.safetensors, model*.safetensors or pytorch_model*.bin)")


def _llm_to_ours(key: str, fmt: str) -> str | None:
    if fmt == "apple" and key.startswith("model."):
        return "language_model.model." + key[len("model.") :]
    if fmt == "hf" and key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    return None


def _projector_to_ours(key: str, fmt: str) -> str | None:
    if fmt == "apple" and (m := re.match(r"^model\.mm_projector\.(\d+)\.(weight|bias)$", key)):
        if int(m[1]) % 2:
            raise ValueError(f"unexpected tensor {key!r}: mm_projector has Linear layers at even indices only")
        return f"projector.linear_{int(m[1]) // 2 + 1}.{m[2]}"
    if fmt == "hf" and (m := re.match(r"^model\.multi_modal_projector\.(linear_\d+\.(?:weight|bias))$", key)):
        return f"projector.{m[1]}"
    return None


def model_keys_to_ours(keys: Iterable[str], fmt: str) -> dict[str, str]:
    """{checkpoint key: our key} for a whole-model checkpoint of format ``fmt``."""
    keys = list(keys)
    if fmt == "fastvlm":
        return {k: k for k in keys}
    tower_prefix = TOWER_PREFIXES["apple" if fmt == "apple" else "timm"]
    tower_keys = [k[len(tower_prefix) :] for k in keys if k.startswith(tower_prefix)]
    tower_map = tower_keys_to_ours(tower_keys, _TOWER_LAYOUT_OF_FORMAT[fmt]) if tower_keys else {}
    out = {}
    for key in keys:
        if key.startswith(tower_prefix):
            out[key] = "vision_tower." + tower_map[key[len(tower_prefix) :]]
        elif (ours := _projector_to_ours(key, fmt)) is not None or (ours := _llm_to_ours(key, fmt)) is not None:
            out[key] = ours
        else:
            raise ValueError(f"unexpected tensor {key!r} in a {fmt}-format FastVLM checkpoint")
    return out


def model_keys_from_ours(keys: Iterable[str], fmt: str, tower_config: FastViTConfig) -> dict[str, str]:
    """{our key: checkpoint key} for writing a whole-model checkpoint in format ``fmt``."""
    if fmt == "fastvlm":
        return {k: k for k in keys}
    layout = _TOWER_LAYOUT_OF_FORMAT[fmt]
    table = network_table(tower_config)
    out = {}
    for key in keys:
        if key.startswith("vision_tower."):
            out[key] = TOWER_PREFIXES[layout] + _to_foreign(key[len("vision_tower.") :], layout, table)
        elif m := re.match(r"^projector\.linear_(\d+)\.(weight|bias)$", key):
            out[key] = (
                f"model.mm_projector.{2 * (int(m[1]) - 1)}.{m[2]}"
                if fmt == "apple"
                else f"model.multi_modal_projector.{key[len('projector.') :]}"
            )
        elif key == "language_model.lm_head.weight":
            out[key] = "lm_head.weight"
        elif key.startswith("language_model.model."):
            rest = key[len("language_model.model.") :]
            out[key] = ("model." if fmt == "apple" else "model.language_model.") + rest
        else:
            raise ValueError(f"not a FastVLM tensor name in our layout: {key!r}")
    return out
