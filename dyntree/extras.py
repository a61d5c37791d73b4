"""Optional parts of the install: which extra brings which library, and the one-line error when one is missing.

The core install holds what decoding needs; commands that need more check for it before loading a model,
so a user without the extra reads one line naming the `pip install` that fixes it, never a traceback.
"""

from __future__ import annotations

import importlib

from .errors import DynTreeError

EXTRA_MODULES = {
    "bench": ("sacrebleu", "matplotlib"),
    "viz": ("matplotlib",),
    "train": ("accelerate", "tqdm"),
    "server": ("fastapi", "uvicorn", "prometheus_client"),
    "llamacpp": ("llama_cpp",),
}


def require_extra(extra: str, user: str) -> None:
    """Raise DynTreeError naming `extra` when one of its libraries cannot be imported (`user` needs them)."""
    for module in EXTRA_MODULES[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise DynTreeError(f"{user} needs the '{extra}' extra ({module} is missing): "
                               f"pip install 'dyntree[{extra}]'") from None
