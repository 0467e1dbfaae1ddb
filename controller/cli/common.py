"""What every command shares: the console, ``--json`` output, and turning our errors into exits.

rich is imported here and in the other ``controller.cli`` / ``controller.ui`` modules only.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import typer

from controller.errors import FluxRemoteError

F = TypeVar("F", bound=Callable[..., Any])


def console(stderr: bool = False):  # -> rich.console.Console (imported lazily: --help stays fast)
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def emit_json(data: Any) -> None:
    """Print one JSON document to stdout (for scripts: nothing else goes to stdout with --json)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def handles_errors(func: F) -> F:
    """Run a command; a ``FluxRemoteError`` becomes its message on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FluxRemoteError as exc:
            as_json = bool(kwargs.get("as_json"))
            if as_json:
                emit_json({"ok": False, "error": type(exc).__name__, "message": str(exc)})
            else:
                err = console(stderr=True)
                err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
