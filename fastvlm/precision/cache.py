"""The per-machine cache of precision choices: one JSON file, one entry per (machine, model, settings).

The machine part is what timings depend on (processor or GPU name, core count, torch threads,
torch and torchao versions, device type); the model part is its architecture plus a
fingerprint of its weights, because the quality bound is a property of the weights (a
near-tie in one model's logits is not in another's). The file is written whole through a
temporary file renamed over it, so a crash never leaves half a file; a corrupt file warns
and counts as empty. Two processes tuning at once each write their entry; the last rename
wins and the lost entry is measured again next time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastvlm.files import write_text_atomic
from fastvlm.measure import machine_description

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

CACHE_VERSION = 1
CACHE_FILE = "precision.json"
CACHE_DIR_ENV = "FASTVLM_CACHE_DIR"
TEXT_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


def default_cache_path() -> Path:
    """``$FASTVLM_CACHE_DIR/precision.json``, else ``~/.cache/fastvlm/precision.json``."""
    folder = os.environ.get(CACHE_DIR_ENV)
    return (Path(folder) if folder else Path.home() / ".cache" / "fastvlm") / CACHE_FILE


def machine_key(device: torch.device) -> dict[str, Any]:
    """What the timings depend on: processor (or GPU), cores, threads, library versions, device type."""
    key: dict[str, Any] = {
        "device": device.type,
        "cpu": machine_description()["cpu"],
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchao": _torchao_version(),
    }
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


def _torchao_version() -> str | None:
    try:
        import torchao
    except ImportError:
        return None
    return str(torchao.__version__)


def model_key(model: FastVLM) -> dict[str, Any]:
    """The architecture (what speed depends on) and a fingerprint of the weights (what quality depends on)."""
    return {
        "image_size": model.config.image_size,
        "projector_depth": model.config.projector_depth,
        "vision": dataclasses.asdict(model.config.vision),
        "text": {name: getattr(model.config.text, name) for name in TEXT_SIZES},
        "weights": weights_fingerprint(model),
    }


def weights_fingerprint(model: FastVLM, values: int = 16) -> str:
    """A hash of every tensor's name, shape and first ``values`` values: cheap, and differs between checkpoints."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        if tensor.is_floating_point():
            digest.update(tensor.detach().reshape(-1)[:values].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def entry_key(machine: Mapping[str, Any], model: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The cache key of one (machine, model, tuning settings) triple."""
    text = json.dumps({"machine": machine, "model": model, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries by key; a missing file is empty, a corrupt one warns and counts as empty."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("it has no 'entries' table")
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"precision cache {path} is unreadable or corrupt ({err}); measuring again", stacklevel=3)
        return {}
    return data["entries"] if data.get("version") == CACHE_VERSION else {}


def write_cache(path: Path, entries: Mapping[str, Any]) -> None:
    """Write the whole cache at once (:func:`~fastvlm.files.write_text_atomic`)."""
    text = json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, default=str)
    write_text_atomic(path, text + "\n")
