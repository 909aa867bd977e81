"""Every import path the README (and the notes under docs/) shows works: ``from X import Y`` lines in
code blocks, dotted ``fastvlm.module.name`` references and file paths in the text."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README_PATH = Path(__file__).resolve().parents[1] / "README.md"
DOC_PATHS = [README_PATH, *sorted((README_PATH.parent / "docs").glob("*.md"))]
DOCS_TEXT = "\n".join(path.read_text() for path in DOC_PATHS)
FROM_IMPORTS = sorted(set(re.findall(r"^from (fastvlm[\w.]*) import ([\w, ]+)$", DOCS_TEXT, flags=re.MULTILINE)))
DOTTED = sorted(set(re.findall(r"`(fastvlm(?:\.\w+)+)", DOCS_TEXT)))
FILES = sorted(set(re.findall(r"`((?:fastvlm|benchmarks|examples)/[\w/]+\.(?:py|sh))", DOCS_TEXT)))


def _resolve(dotted: str) -> object:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_readme_shows_import_paths():
    assert len(FROM_IMPORTS) >= 2 and len(DOTTED) >= 3 and len(FILES) >= 1


@pytest.mark.parametrize(("module", "names"), FROM_IMPORTS)
def test_readme_from_imports_work(module, names):
    imported = importlib.import_module(module)
    for name in (n.strip() for n in names.split(",")):
        assert hasattr(imported, name), f"README or docs/: from {module} import {name} fails"


@pytest.mark.parametrize("dotted", DOTTED)
def test_readme_dotted_names_exist(dotted):
    _resolve(dotted)


@pytest.mark.parametrize("path", FILES)
def test_readme_file_paths_exist(path):
    assert (README_PATH.parent / path).is_file(), f"README or docs/ names {path}, which does not exist"
