"""Files on disk and on the Hugging Face Hub: reading weights, writing them atomically.

Nothing here knows what a tensor is called; naming belongs to :mod:`fastvlm.formats`
and :mod:`fastvlm.vision.layouts`. What this module guarantees:

* a weight file or checkpoint folder either appears whole under its final name or not
  at all: it is assembled under a hidden staging name, flushed to disk, then renamed
  (an atomic step on POSIX file systems);
* a folder being deleted first leaves its name, so a kill mid-delete never leaves a
  half-deleted folder that looks complete;
* hub ids download with ``huggingface_hub`` and fail offline with a message that says
  what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from fastvlm.errors import CheckpointError, CheckpointNotFoundError

# Files a FastVLM checkpoint needs from a hub repository (weights, configs, tokenizer).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.jinja", "tokenizer*"]
# Weight files of a checkpoint folder; a new save removes the old ones, which would shadow it.
WEIGHT_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)
# Hidden names of folders in the middle of being written or deleted.
STAGING_SUFFIX = ".staging"
DELETING_SUFFIX = ".deleting"
# safetensors' dtype names (in file headers) as torch dtypes, for meta tensors.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.bin``/``.pt`` file loaded with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointNotFoundError(f"{path} is a folder; expected a checkpoint file (.safetensors, .bin or .pt)")
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors alike: the file is not readable weights
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from None


def read_checkpoint_tensors(folder: Path, *, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, sharded safetensors (with an index) or pytorch_model*.bin.

    ``shapes_only`` gives tensors on the meta device (names, shapes and dtypes, no data):
    safetensors files are read from their headers only, so describing a 7B checkpoint
    costs no memory.
    """
    read = read_state_dict_shapes if shapes_only else read_state_dict
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_weight_files(folder):
        tensors.update(read(file))
    return tensors


def checkpoint_weight_files(folder: Path) -> list[Path]:
    """The weight files a checkpoint folder is read from (the shards its index names, when it has one)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' naming the shard of each tensor")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointNotFoundError(f"{index} names shard files that are missing: {', '.join(missing)}")
            return [folder / shard for shard in shards]
    for pattern in ("model.safetensors", "model*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointNotFoundError(
        f"{folder} has no weights (model.safetensors, model*.safetensors or pytorch_model*.bin)"
    )


def read_state_dict_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file as meta tensors (a safetensors file's header is all that is read)."""
    if path.suffix != ".safetensors":
        return {k: torch.empty_like(v, device="meta") for k, v in read_state_dict(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # a truncated or foreign file: say which
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from None
    return {
        k: torch.empty(shape, dtype=_SAFETENSORS_DTYPES.get(dtype, torch.float32), device="meta")
        for k, (shape, dtype) in shapes.items()
    }


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, with the file named in the error when it is not valid JSON."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def weight_files(folder: Path) -> list[Path]:
    """The weight files (and their index) in a checkpoint folder."""
    return [p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)]


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint folder, downloading a Hugging Face Hub id (``owner/name``) if needed.

    Offline (no network, or ``HF_HUB_OFFLINE=1``) a hub id works only from the local
    cache; otherwise this raises a :class:`CheckpointNotFoundError` saying so.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointNotFoundError(f"checkpoint folder not found: {path} (expected a folder or a hub id owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"cannot download {text!r} from the Hugging Face Hub: this machine is offline (or HF_HUB_OFFLINE is "
            "set) and the hub cache has no copy; download it on a connected machine "
            f"(`huggingface-cli download {text}`) or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(f"no model {text!r} on the Hugging Face Hub (or it is private)") from None
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointNotFoundError(f"cannot download {text!r} from the Hugging Face Hub: {err}") from None


# ----------------------------------------------------------------------------- writing


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a .safetensors file so that a crash never leaves a half-written file at ``path``.

    The tensors go to a temporary file in the same folder, which is flushed to disk and
    then renamed over ``path``.
    """
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)

    _replace_atomically(Path(path), write, fsync=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder renamed over it.

    Readers see the old content or the new, never half a file, even if the writer is killed.
    """
    _replace_atomically(Path(path), lambda tmp: Path(tmp).write_text(text), fsync=False)


def _replace_atomically(path: Path, write: Callable[[str], object], *, fsync: bool) -> None:
    """``write`` a temporary file beside ``path`` (given its name), then rename it over ``path``.

    ``fsync`` flushes the file to disk before the rename (weights: a crash must not leave a
    named but empty file). A failure removes the temporary file and leaves ``path`` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        if fsync:
            fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def fsync_folder(folder: Path) -> None:
    """Flush every file directly inside ``folder``, then the folder's own entry list."""
    for item in folder.iterdir():
        if item.is_file():
            fsync_file(item)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(final: Path) -> Path:
    """The hidden sibling where ``final`` is assembled before it takes its name.

    The name is fixed (not random) so that every process of a distributed job can write
    its own files into the same staging folder.
    """
    return final.parent / f".{final.name}{STAGING_SUFFIX}"


def new_staging_dir(final: Path) -> Path:
    """:func:`staging_dir` of ``final``, emptied of anything an interrupted write left in it."""
    staging = staging_dir(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def leftover_dirs(folder: Path) -> list[Path]:
    """Hidden staging or half-deleted folders that an interrupted write left in ``folder``."""
    return sorted(
        p
        for p in folder.glob(".*")
        if p.is_dir() and (p.name.endswith(STAGING_SUFFIX) or p.name.endswith(DELETING_SUFFIX))
    )


def remove_dir_atomically(folder: Path) -> None:
    """Delete ``folder``, renaming it to a hidden name first so it never looks whole half-deleted."""
    aside = folder.with_name(f".{folder.name}{DELETING_SUFFIX}")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(folder, aside)
    shutil.rmtree(aside)


def publish_dir(staging: Path, final: Path, *, merge: bool = False) -> None:
    """Flush ``staging`` to disk and give it the name ``final``.

    An existing ``final`` is replaced whole, or with ``merge`` keeps what it holds and only
    gets the staged files put over its own (one atomic rename per file).
    """
    fsync_folder(staging)
    if final.exists() and merge:
        for item in staging.iterdir():
            os.replace(item, final / item.name)
        shutil.rmtree(staging)
    else:
        if final.exists():
            remove_dir_atomically(final)
        os.rename(staging, final)
    fsync_folder(final.parent)


@contextmanager
def atomic_dir(final: str | os.PathLike, *, merge: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``final``, on failure it is removed.

    ``merge`` as for :func:`publish_dir`.
    """
    final = Path(final)
    staging = new_staging_dir(final)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, final, merge=merge)
