"""Calibration for dynamic trees: how often each head's guesses are accepted, measured by decoding prompts.

`dyntree calibrate` reads its prompts with `read_prompts` and decodes them with `collect_acceptance_stats`;
the statistics it writes start the calibrated node scores (`--tree-score rank|binned --tree-calibration`).
Calibration prompts must not be the benchmark's: rates measured on MT-Bench would flatter every MT-Bench run.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DynTreeError
from ..jsonl import read_jsonl_objects
from ..training.prompts import prompts_from_row
from ..trees.dynamic import collect_acceptance_stats

__all__ = ["collect_acceptance_stats", "read_prompts"]


def read_prompts(path: str, limit: int) -> list[str]:
    """Up to `limit` prompts from a .jsonl file (read like `dyntree distill` reads them) or a text file (one per
    line)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DynTreeError(f"no prompt file {file}")
    prompts: list[str] = []
    if file.suffix == ".jsonl":
        for number, row in read_jsonl_objects(file):
            try:
                texts = prompts_from_row(row)
            except ValueError as exc:
                raise DynTreeError(f"{file}:{number}: {exc}") from None
            prompts += [t for t in texts if isinstance(t, str) and t.strip()]
    else:
        prompts = [line for line in file.read_text(errors="replace").splitlines() if line.strip()]
    if not prompts:
        raise DynTreeError(f"{file} holds no prompts")
    return prompts[:limit]
