"""Reading benchmark files in the layouts their public releases use.

Two families: the parquet files of the Hugging Face datasets that lmms-eval loads
(``huggingface-cli download lmms-lab/DocVQA --repo-type dataset --local-dir DIR`` gives
``DIR/DocVQA/validation-00000-of-00006.parquet`` ...), and the JSON/JSONL question and
annotation files of LLaVA's evaluation folders next to an image folder. Parquet is
streamed in small record batches, so a 5,000-page DocVQA split never sits in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from fastvlm.errors import DataError
from fastvlm.processing import DEFAULT_MAX_PIXELS, load_image

__all__ = [
    "DataError",
    "decode_image_cell",
    "find_dir",
    "has_parquet",
    "parquet_files",
    "parquet_num_rows",
    "parquet_rows",
    "read_json",
    "read_jsonl",
]

PARQUET_BATCH_ROWS = 16  # rows decoded at a time: a few pages of DocVQA, never a whole split


def parquet_files(folder: Path, split: str, config: str | None = None) -> list[Path]:
    """The parquet shards of ``split`` (``split-*.parquet`` or ``split.parquet``) under ``folder``.

    ``folder`` is a dataset repository as downloaded (shards in ``data/``, or in a ``config``
    sub-folder when the dataset has several) or, for a config, that sub-folder itself.
    The shards of one split must sit in one folder: a mix is refused rather than merged.
    """
    found = sorted(p for p in folder.rglob("*.parquet") if p.stem == split or p.stem.startswith(f"{split}-"))

    def under(*parts: str) -> list[Path]:
        return [p for p in found if p.relative_to(folder).parts[:-1] == parts]

    if config is not None:
        found = under(config) or (under() if folder.name == config else [])
    else:
        found = under("data") or under() or found
    if not found:
        others = sorted({p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet")})[:5]
        where = f"{folder}/{config}/" if config else f"{folder}/"
        raise DataError(
            f"no '{split}' parquet files under {where} (expected {split}-*.parquet"
            + (f" in a '{config}' sub-folder" if config else "")
            + (f"; found {others}" if others else "; the folder has no parquet files")
            + ")"
        )
    parents = sorted({p.parent.relative_to(folder).as_posix() for p in found})
    if len(parents) > 1:
        raise DataError(f"'{split}' parquet files in several folders under {folder} ({parents}); point --data at one")
    return found


def has_parquet(folder: Path) -> bool:
    """Whether ``folder`` (or a sub-folder) holds any parquet file: the lmms-eval layouts' test."""
    return any(folder.rglob("*.parquet"))


def parquet_rows(files: list[Path], columns: list[str] | None = None) -> Iterator[dict]:
    """Rows of the parquet shards in order, as dicts, read a few at a time."""
    import pyarrow.parquet as pq

    for file in files:
        try:
            reader = pq.ParquetFile(file)
        except Exception as err:  # pyarrow raises several types for a broken file
            raise DataError(f"cannot read parquet file {file}: {err}") from None
        if columns is not None:
            missing = [c for c in columns if c not in reader.schema_arrow.names]
            if missing:
                raise DataError(f"{file} has no column(s) {missing}; its columns are {reader.schema_arrow.names}")
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()


def parquet_num_rows(files: list[Path]) -> int:
    """Rows in the shards, from their metadata (nothing is decoded)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def decode_image_cell(cell: Any, folder: Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A Hugging Face ``Image`` cell ({"bytes", "path"}) as an RGB PIL image (no EXIF rotation,
    as the ``datasets`` library lmms-eval used decodes it)."""
    if cell is None:
        raise DataError("the sample has no image")
    if isinstance(cell, dict) and cell.get("bytes"):
        return load_image(cell["bytes"], max_pixels=max_pixels, exif_transpose=False)
    if isinstance(cell, dict) and cell.get("path"):
        return load_image(folder / cell["path"], max_pixels=max_pixels, exif_transpose=False)
    raise DataError(f"cannot read an image from a cell of type {type(cell).__name__}")


def read_json(path: Path) -> Any:
    """The JSON document in ``path`` (a :class:`DataError` if it is missing or not JSON)."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, blank lines skipped (a bad line is named by number)."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n} is not valid JSON: {err}") from None
    return rows


def find_dir(folder: Path, *candidates: str) -> Path:
    """The first existing sub-folder among ``candidates`` (layouts differ by a level or two)."""
    for name in candidates:
        if (folder / name).is_dir():
            return folder / name
    raise DataError(f"no image folder under {folder}: expected one of {', '.join(candidates)}")
