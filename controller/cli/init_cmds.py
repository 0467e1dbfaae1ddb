"""``flux-remote init PHOTOS_DIR``: a commented run.yaml for a folder of photos
(``controller.starter``)."""

from __future__ import annotations

from pathlib import Path

import typer

from controller.cli.common import JSON_OPTION, console, emit_json, handles_errors


def register(app: typer.Typer) -> None:
    app.command("init")(init)


@handles_errors
def init(
    photos: Path = typer.Argument(..., metavar="PHOTOS_DIR",
                                  help="The folder of photos to train on."),
    out: Path = typer.Option(Path("run.yaml"), "--out", "-o",
                             help="Where the spec goes (never over an existing file)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a commented run.yaml for a folder of photos: name, trigger word, captions, the
    quality gate's verdict on the photos and, with a Vast.ai key, the cheapest estimate now.

    Nothing is rented. Exit 2 when the file exists or the folder has no images.

    Example: flux-remote init ~/photos/anna
    """
    from rich.text import Text

    from controller.starter import init as write_starter

    starter = write_starter(photos, out)
    est = starter.estimate
    if as_json:
        emit_json({"ok": True, "path": str(out), "name": starter.name,
                   "trigger_word": starter.trigger, "captions": starter.sidecars.mode,
                   "gate_passed": bool(starter.gate.get("passed")),
                   "budget_usd": starter.budget_usd,
                   "estimate": None if est is None else est.__dict__})
        return
    con = console()
    con.print(Text(f"wrote {out}", style="bold"), soft_wrap=True)
    con.print(Text(f"  name {starter.name}, trigger word {starter.trigger}, captions "
                   f"{starter.sidecars.mode} ({starter.sidecars.captioned} of "
                   f"{starter.sidecars.images} images have one)"), soft_wrap=True)
    passed = bool(starter.gate.get("passed"))
    con.print(Text("  quality gate: ") + Text(starter.gate_line(),
                                                style="green" if passed else "red"),
              soft_wrap=True)
    if est is None:
        con.print(Text("  no Vast.ai key: no estimate (set VAST_API_KEY, then "
                       f"`flux-remote plan {out}`)", style="dim"), soft_wrap=True)
    elif est.problem:
        con.print(Text(f"  no estimate now: {est.problem}", style="yellow"), soft_wrap=True)
    else:
        con.print(Text(f"  cheapest now: {est.gpu_name} at ${est.dph_total:.3f}/h, about "
                       f"{est.est_hours:.2f} h, est ${est.est_usd:.2f} (budget set to "
                       f"${starter.budget_usd:g})"), soft_wrap=True)
    con.print(Text(f"next: flux-remote validate {out} && flux-remote launch {out}"),
              soft_wrap=True)
