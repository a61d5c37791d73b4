"""Reading user-supplied JSONL files with one-line errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DynTreeError


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """`(line number, line)` for every non-blank line; a missing file or bad text -> DynTreeError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DynTreeError(f"no prompt file at {path} (file not found)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DynTreeError(f"{path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise DynTreeError(f"cannot read {path}: {exc}") from exc
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def read_jsonl_objects(path: str | Path) -> list[tuple[int, dict]]:
    """`(line number, object)` for every non-blank line; missing file, bad text or JSON -> DynTreeError."""
    path = Path(path).expanduser()
    rows: list[tuple[int, dict]] = []
    for number, line in read_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DynTreeError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DynTreeError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows
