"""Where dyntree keeps what it converts and measures once per machine (models, timings, verdicts)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$DYNTREE_CACHE`, else `$XDG_CACHE_HOME/dyntree`, else `~/.cache/dyntree`."""
    if os.environ.get("DYNTREE_CACHE"):
        return Path(os.environ["DYNTREE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "dyntree"
