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
            problems = getattr(exc, "problems", None)
            if as_json:
                data: dict[str, Any] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                if problems is not None:
                    data["problems"] = problems
                emit_json(data)
            else:
                _print_error(exc, problems)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _print_error(exc: FluxRemoteError, problems: list[str] | None) -> None:
    """One problem on the error line; several as a count, then one ``FILE:LINE:COL:`` line each."""
    from rich.markup import escape

    from controller.untrusted import clean_text

    exc_text = clean_text(str(exc))  # a message may quote the instance: no control sequences
    err = console(stderr=True)
    if problems and len(problems) > 1:
        err.print(f"[bold red]error:[/] {len(problems)} problems", soft_wrap=True)
        for problem in problems:
            err.print(escape(clean_text(problem)), soft_wrap=True)
        if exc.hint:
            err.print(f"  hint: {escape(clean_text(exc.hint))}", soft_wrap=True)
        return
    err.print(f"[bold red]error:[/] {escape(exc_text)}", soft_wrap=True)


JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
