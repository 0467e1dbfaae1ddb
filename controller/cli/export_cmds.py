"""``flux-remote export skypilot`` and ``flux-remote publish``: taking a run elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from controller.cli.common import JSON_OPTION, console, emit_json, handles_errors

export_app = typer.Typer(help="Export a run spec for other launchers.", no_args_is_help=True)


@export_app.command("skypilot")
@handles_errors
def export_skypilot_cmd(
    file: Path = typer.Argument(..., help="The run spec (run.yaml)."),
    out: Optional[Path] = typer.Option(
        None, "-o", "--out", help="Task YAML to write (default: ./<name>.sky.yaml)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a SkyPilot task YAML (and its plan.json) that runs the same pipeline on any cloud.

    Example: flux-remote export skypilot run.yaml -o me.sky.yaml
    then:    sky launch -c me --secret HF_TOKEN me.sky.yaml
    """
    from controller.export_skypilot import export_skypilot

    result = export_skypilot(file, out)
    if as_json:
        emit_json({"ok": True, **result.to_dict()})
        return
    out_console = console()
    out_console.print(f"wrote {result.task_path} and {result.plan_path}", soft_wrap=True, markup=False)
    out_console.print(f"launch with: {result.to_dict()['launch']}", soft_wrap=True, markup=False)


def publish_cmd(
    run_or_bundle: str = typer.Argument(
        ..., help="A fetched bundle, a run folder holding publish/, or a run id (or unique prefix)."),
    repo: Optional[str] = typer.Option(
        None, "--repo", help="Hub repo id, e.g. alice/my-lora (default: publish.hf_repo of the "
                             "spec the run was launched with)."
    ),
    public: bool = typer.Option(False, "--public", help="Create the repo public (default: private)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Upload a fetched bundle to the Hugging Face Hub (model card first), with HF_TOKEN.

    Example: HF_TOKEN=hf_... flux-remote publish runs/me --repo alice/me-lora
    or:      HF_TOKEN=hf_... flux-remote publish demo-local-20261129 (a run id or prefix)
    """
    from controller.errors import SpecError
    from controller.hf_publish import publish_bundle, publish_target

    from controller.journal import open_journal

    bundle, run_id = resolve_bundle(run_or_bundle)
    journal = open_journal()
    # the repo and its visibility come from the journal's spec, never from the fetched bundle
    run = journal.get_run(run_id) if run_id else run_of_bundle(journal.list_runs(), bundle)
    run_id = run["run_id"] if run else None
    target = publish_target(run)
    repo_id = repo or target.get("hf_repo")
    if not repo_id:
        raise SpecError(f"{bundle}: no repo to publish to",
                        hint="pass --repo OWNER/NAME or set publish.hf_repo")
    private = not public and bool(target.get("hf_private", True))
    url = publish_bundle(bundle, repo_id, private=private)
    if run_id is not None:
        journal.add_event(run_id, "published", {"url": url})
    if as_json:
        emit_json({"ok": True, "repo": repo_id, "url": url, "private": private, "bundle": str(bundle)})
        return
    visibility = "private" if private else "public"
    console().print(f"published {bundle} to {url} ({visibility})", soft_wrap=True, markup=False)


def resolve_bundle(ref: str) -> tuple[Path, str | None]:
    """(bundle folder, run id or None) for a path, else a run id or unique prefix in the journal.

    A path that exists wins over a run id; a run's bundle is its recorded ``bundle_path``, else
    whatever was fetched into its ``out_dir``.
    """
    from controller.errors import SpecError
    from controller.journal import open_journal

    path = Path(ref)
    if path.exists():
        return find_bundle(path), None
    found = open_journal().find_runs(ref)
    if not found:
        raise SpecError(f"{ref}: no such folder and no run with that id",
                        hint="give a bundle folder or a run id from `flux-remote ls`")
    if len(found) > 1:
        names = ", ".join(run["run_id"] for run in found[:5])
        raise SpecError(f"{ref!r} matches {len(found)} runs ({names}); give more of the id")
    run = found[0]
    recorded = run.get("bundle_path")
    if recorded and (Path(recorded) / "SHA256SUMS").is_file():
        return Path(recorded), run["run_id"]
    try:
        return find_bundle(Path(run["out_dir"])), run["run_id"]
    except SpecError as exc:
        raise SpecError(f"run {run['run_id']} ({run['state']}) has no fetched bundle in "
                        f"{run['out_dir']}", hint=f"fetch it first: flux-remote fetch "
                                                  f"{run['run_id']}") from exc


def run_of_bundle(runs: list[dict[str, Any]], bundle: Path) -> dict[str, Any] | None:
    """The journaled run whose bundle (or out dir) is the folder ``bundle``, newest first."""
    where = bundle.resolve()
    for run in reversed(runs):
        for recorded in (run.get("bundle_path"), run.get("out_dir")):
            if recorded and where in (Path(recorded).resolve(),
                                      (Path(recorded) / "publish").resolve()):
                return run
    return None


def find_bundle(path: Path) -> Path:
    """The bundle folder: ``path`` itself when it holds SHA256SUMS, else its ``publish/``."""
    from controller.errors import SpecError

    for candidate in (path, path / "publish"):
        if (candidate / "SHA256SUMS").is_file():
            return candidate
    raise SpecError(f"{path}: no bundle here (no SHA256SUMS in it or in its publish/ folder)",
                    hint="fetch the run first: flux-remote fetch RUN")


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
    app.command("publish")(handles_errors(publish_cmd))
