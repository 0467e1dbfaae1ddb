"""Commands about the spec itself: validate, render, schema."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from controller.cli.common import JSON_OPTION, console, emit_json, handles_errors

if typing.TYPE_CHECKING:
    from controller.spec.model import RunSpec
    from controller.spec.loader import LoadedFile

FILE_ARGUMENT = typer.Argument(..., help="The run spec (run.yaml) or batch file.")


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    app.command("render")(render)
    app.command("schema")(schema)


@handles_errors
def validate(file: Path = FILE_ARGUMENT, as_json: bool = JSON_OPTION) -> None:
    """Check a spec (or batch) file and summarise each run it describes.

    Every problem is reported at once as FILE:LINE:COL: field.path: what is wrong (exit 2).

    Example: flux-remote validate configs/flux-dev-vast.yaml
    """
    from controller.spec.loader import load_file

    loaded = load_file(file)
    data = validation_report(loaded)
    if as_json:
        emit_json(data)
        return
    out = console()
    if data["batch"]:
        batch = data["batch"]
        out.print(f"[bold]{file}[/]: batch of {len(data['runs'])} runs, ${batch['max_usd']:g} in total, "
                  f"{batch['max_parallel']} at a time")
    else:
        out.print(f"[bold]{file}[/]: ok")
    for run in data["runs"]:
        out.print(
            f"  [bold]{run['name']}[/]: {run['base_model']}, {run['trainer']} {run['steps']} steps, "
            f"lr {run['lr']:g}, rank {run['rank']}, {run['images']} images in {run['dataset']}, "
            f"{run['provider']}, budget ${run['max_usd']:g}",
            soft_wrap=True,
        )


@handles_errors
def render(
    file: Path = FILE_ARGUMENT,
    run: Optional[str] = typer.Option(None, "--run", help="For a batch file: only this run."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print the ai-toolkit YAML that would run (one document per run of a batch).

    Folders are shown as they will be where it trains (<run_id> is decided at launch).

    Example: flux-remote render configs/flux-dev-vast.yaml > config.yaml
    """
    from controller.errors import SpecError
    from controller.spec.loader import load_file
    from remote.aitk_config import dump_yaml

    loaded = load_file(file)
    specs = loaded.runs
    if run is not None:
        specs = [spec for spec in specs if spec.name == run]
        if not specs:
            names = ", ".join(spec.name for spec in loaded.runs)
            raise SpecError(f"{file}: no run named {run!r} (the runs are: {names})")
    configs = [(spec.name, render_config(spec)) for spec in specs]
    if as_json:
        emit_json({"ok": True, "runs": [{"name": name, "config": cfg} for name, cfg in configs]})
        return
    sys.stdout.write("---\n".join(dump_yaml(cfg) for _, cfg in configs))


@handles_errors
def schema(as_json: bool = JSON_OPTION) -> None:
    """Print the JSON Schema of run.yaml (batch section included) for editor completion.

    Example: flux-remote schema > run.schema.json

    Then start run.yaml with: # yaml-language-server: $schema=run.schema.json
    """
    from controller.spec.model import json_schema

    emit_json(json_schema())


def validation_report(loaded: "LoadedFile") -> dict[str, Any]:
    """What ``validate`` reports, as data (also its ``--json`` output)."""
    batch = loaded.batch.model_dump(mode="json") if loaded.batch is not None else None
    runs = []
    for index, spec in enumerate(loaded.runs):
        label = loaded.labels[index] if index < len(loaded.labels) else ""
        runs.append(_run_summary(spec, label))
    return {"ok": True, "file": str(loaded.path), "batch": batch, "runs": runs}


def render_config(spec: "RunSpec") -> dict[str, Any]:
    """The ai-toolkit job dict for ``spec``, with the folders it will have where it trains."""
    from remote.aitk_config import build_aitk_config

    if spec.provider.type == "local":
        run_dir = "<local run dir>"
    else:
        run_dir = f"{spec.provider.remote_root.rstrip('/')}/<run_id>"
    device = "cpu" if spec.training.trainer == "tiny" else "cuda:0"
    return build_aitk_config(spec.model_dump(mode="json"), dataset_dir=f"{run_dir}/work/dataset",
                             training_folder=f"{run_dir}/output", device=device)


def _run_summary(spec: "RunSpec", label: str) -> dict[str, Any]:
    from controller.spec.loader import IMAGE_EXTS

    images = sum(1 for p in spec.dataset.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    return {
        "name": spec.name,
        "from": label or None,
        "base_model": spec.base_model_path,
        "trainer": spec.training.trainer,
        "steps": spec.training.steps,
        "lr": spec.training.lr,
        "rank": spec.training.rank,
        "resolutions": spec.training.resolutions,
        "dataset": str(spec.dataset.path),
        "images": images,
        "provider": spec.provider.type,
        "max_usd": spec.budget.max_usd,
        "out_dir": str(spec.out_dir),
    }
