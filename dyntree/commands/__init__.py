"""Subcommands of the `dyntree` CLI, one module each; every module has `add_command(subparsers)`."""

from __future__ import annotations

import importlib

SUBCOMMANDS = ("generate", "serve", "bench", "quality", "distill", "train", "viz", "calibrate", "export")


def add_commands(subparsers) -> None:
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_command(subparsers)
