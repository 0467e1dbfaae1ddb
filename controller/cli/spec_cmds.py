"""Commands about the spec itself: validate, render, schema."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
