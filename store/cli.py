"""Shared `python -m <package> <command> …` dispatch: each command is a `module:function(argv) -> int`."""

from __future__ import annotations

import importlib
import sys

__all__ = ["dispatch"]


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None) -> int:
    """Run `commands[argv[0]]`, a (module:function, help) pair; the module is imported only when used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        width = max(map(len, commands))
        print(f"usage: python -m {prog} <command> [options]\n\ncommands:")
        for name, (_, text) in commands.items():
            print(f"  {name:<{width}}  {text}")
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    target, _ = commands[argv[0]]
    module, _, func = target.partition(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
