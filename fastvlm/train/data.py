"""Training data in LLaVA's conversation format: reading, checking, tokenising, masking.

A record is ``{"id": ..., "image": "rel/path.jpg" (optional), "conversations": [{"from": "human",
"value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}, ...]}``. JSON files (a list)
and JSONL files (one record per line, read lazily so large files stream) are accepted.

Tokenisation follows the inference prompt exactly: the same template rendering
(:meth:`fastvlm.processing.Conversation.segments`), chunk-wise around ``<image>``. Labels
are ``IGNORE_INDEX`` everywhere except the assistant's answers and their closing
``<|im_end|>`` (so the model learns to stop). Sequences longer than ``max_length``
are cut at the end, turn content first; a cut that would split off or pass the image's
visual tokens rejects the record instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

from fastvlm.errors import DataError
from fastvlm.processing import (
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    SYSTEM_PROMPT,
    Conversation,
    extra_visual_tokens,
    tokenize_prompt,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RecordError(DataError):
    """A training record that cannot be used; the message names it (file, line, id) and the reason."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist (still a ``FileNotFoundError`` for existing callers)."""


@dataclass
class Record:
    id: str
    image: Path | None
    turns: list[tuple[str, str]]  # (role "user"/"assistant", text)
    where: str = ""  # "file:line" for messages


@dataclass
class ReadReport:
    """What reading skipped, so a long run never loses records silently."""

    read: int = 0
    skipped: list[str] = field(default_factory=list)


def parse_record(raw: object, *, image_root: Path | None, where: str, check_image: bool = True) -> Record:
    """Check and normalise one raw record; raise ``RecordError`` naming it and the problem."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    rid = str(raw.get("id", "?"))
    label = f"{where} (id {rid})"
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordError(f"{label}: 'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise RecordError(f"{label}: turn {i} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.80}")
        turns.append((ROLES[turn["from"]], turn["value"]))
    if not any(role == "assistant" for role, _ in turns):
        raise RecordError(f"{label}: no assistant ('gpt') turn to learn from")
    if turns[0][0] != "user":
        raise RecordError(f"{label}: the conversation must start with a human turn")
    if any(role == "assistant" and not text.strip() for role, text in turns):
        raise RecordError(f"{label}: an assistant turn is empty")
    placeholders = sum(text.count(DEFAULT_IMAGE_TOKEN) for _, text in turns)
    image = raw.get("image")
    if image is not None and not isinstance(image, str):
        raise RecordError(f"{label}: 'image' must be one relative path (a string), got {type(image).__name__}")
    if image is None:
        if placeholders:
            raise RecordError(f"{label}: {placeholders} <image> placeholder(s) but no 'image'")
        return Record(rid, None, turns, where)
    if placeholders > 1:
        raise RecordError(f"{label}: {placeholders} <image> placeholders for one image")
    if placeholders == 0:  # LLaVA convention: the image goes before the first question
        role, text = turns[0]
        turns[0] = (role, f"{DEFAULT_IMAGE_TOKEN}\n{text}")
    path = Path(image) if image_root is None else image_root / image
    if check_image and not path.is_file():
        raise RecordError(f"{label}: image file not found: {path}")
    return Record(rid, path, turns, where)


def _raw_records(path: Path) -> Iterator[tuple[str, int, object | None, str | None]]:
    """(where, byte offset or list index, raw record or None, reason it could not be parsed)."""
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            offset = 0
            for number, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                where = f"{path.name}:{number}"
                try:
                    yield where, start, json.loads(line.decode("utf-8")), None
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    yield where, start, None, f"{where}: malformed JSON ({getattr(err, 'msg', None) or 'not UTF-8'})"
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: malformed JSON at line {err.lineno} ({err.msg})") from None
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records")
    for index, raw in enumerate(data):
        yield f"{path.name}[{index}]", index, raw, None


@overload
def iter_records(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    strict: bool = False,
    report: ReadReport | None = None,
    check_image: bool = True,
    with_offsets: Literal[False] = False,
) -> Iterator[Record]: ...


@overload
def iter_records(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    strict: bool = False,
    report: ReadReport | None = None,
    check_image: bool = True,
    with_offsets: Literal[True],
) -> Iterator[tuple[int, Record]]: ...


def iter_records(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    strict: bool = False,
    report: ReadReport | None = None,
    check_image: bool = True,
    with_offsets: bool = False,
) -> Iterator[Record] | Iterator[tuple[int, Record]]:
    """Records of a .jsonl file (streamed line by line) or a .json list (read whole).

    Image paths are relative to ``image_root``, by default the data file's folder. Bad
    records are skipped and noted in ``report`` (with file, line and id), or raise with
    ``strict``. With ``with_offsets`` it yields (byte offset or list index, record) pairs,
    which is what random access (:class:`fastvlm.train.dataset.RecordIndex`) needs.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    report = report if report is not None else ReadReport()
    if not path.is_file():
        raise DataFileNotFoundError(f"data file not found: {path}")
    for where, offset, raw, reason in _raw_records(path):
        try:
            if reason is not None:
                raise RecordError(reason)
            record = parse_record(raw, image_root=root, where=where, check_image=check_image)
        except RecordError as err:
            if strict:
                raise
            report.skipped.append(str(err))
            continue
        report.read += 1
        yield (offset, record) if with_offsets else record


@dataclass
class Example:
    input_ids: list[int]  # one IMAGE_TOKEN_INDEX where the image goes
    labels: list[int]
    image: Path | None


def tokenize_record(
    tokenizer: PreTrainedTokenizerBase,
    record: Record,
    *,
    num_image_tokens: int,
    max_length: int,
    system: str = SYSTEM_PROMPT,
) -> Example:
    """Token ids and labels of a record, learning only the assistant turns; see the module docstring."""
    ids: list[int] = []
    labels: list[int] = []
    conversation = Conversation(system=system, messages=list(record.turns))
    # a record that ends with a question is followed by the assistant's turn header, as at inference
    for text, is_answer in conversation.segments(add_generation_prompt=record.turns[-1][0] == "user"):
        piece = tokenize_prompt(tokenizer, text)
        ids.extend(piece)
        labels.extend(t if is_answer and t != IMAGE_TOKEN_INDEX else IGNORE_INDEX for t in piece)
    # lengths count the image as its visual tokens
    extra = extra_visual_tokens(ids, num_image_tokens)
    if len(ids) + extra > max_length:
        keep = max_length - extra
        if IMAGE_TOKEN_INDEX in ids and ids.index(IMAGE_TOKEN_INDEX) >= keep:
            raise RecordError(
                f"{record.where} (id {record.id}): the image's {num_image_tokens} visual tokens do not fit in "
                f"max_length {max_length}"
            )
        ids, labels = ids[:keep], labels[:keep]
    if all(label == IGNORE_INDEX for label in labels):
        raise RecordError(f"{record.where} (id {record.id}): nothing left to learn after truncation to {max_length}")
    return Example(ids, labels, record.image)
