"""``flux-remote``: the typer app. Each command module registers its commands on ``app``.

Exit codes: 0 ok, 1 a run failed, 2 bad input, 3 refused or ended by the budget.
"""

from __future__ import annotations

import typer

from controller import __version__

app = typer.Typer(
    name="flux-remote",
    help=(
        "Train Flux LoRAs on rented Vast.ai GPUs from a laptop: the cheapest finished run within "
        "your budget, live progress and spend, the verified bundle home, nothing left billing.\n\n"
        "Exit codes: 0 ok, 1 a run failed, 2 bad input, 3 refused or ended by the budget."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flux-remote {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """flux-remote: Flux LoRA training on rented GPUs."""


def _register() -> None:
    from controller.cli import commands

    for module in commands.MODULES:
        module.register(app)


_register()


def run() -> None:
    app()


if __name__ == "__main__":
    run()
