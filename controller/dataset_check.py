"""The dataset check on the laptop: the agent's ingest, captions and quality gate, run here with
a spec's settings so that a dataset can be fixed before anything is rented.

``checks_for`` turns a spec (a file, a loaded ``RunSpec``) or a bare folder into the arguments of
``remote.dataset.check.check_dataset``; ``run_checks`` runs them. ``flux-remote check-dataset``
and the notebook both call these and only draw the reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from controller.errors import SpecError

if TYPE_CHECKING:
    from controller.spec.model import RunSpec


def check_arguments(spec: "RunSpec") -> dict[str, Any]:
    """``check_dataset`` keyword arguments for one run: its folder, gate, trigger and captions."""
    return {
        "directory": spec.dataset.path,
        "gate": spec.quality_gate.model_dump(mode="json"),
        "trigger": spec.trigger_word,
        "caption_ext": spec.dataset.caption_ext,
        "caption_mode": spec.captioning.mode,
        "template": spec.captioning.template,
        "insert_trigger": spec.captioning.insert_trigger,
        "max_side": spec.dataset.max_side,
    }


def checks_for(target: Union[Path, str, "RunSpec"]) -> list[tuple[str, dict[str, Any]]]:
    """(label, ``check_dataset`` keyword arguments) for each distinct check ``target`` needs.

    A ``RunSpec``: its dataset with its settings. A folder: the defaults. A spec file: each run
    (a batch has several) with its settings, a dataset checked once per distinct setting.
    Raises SpecError for a path that does not exist or a spec that does not load.
    """
    from controller.spec.model import RunSpec

    if isinstance(target, RunSpec):
        return [(str(target.dataset.path), check_arguments(target))]
    path = Path(target)
    if not path.exists():
        raise SpecError(f"{path}: no such file or folder",
                        hint="give a run spec (run.yaml) or a dataset folder")
    if path.is_dir():
        return [(str(path), {"directory": path})]
    from controller.spec.loader import load_file

    checks: dict[str, tuple[str, dict[str, Any]]] = {}
    for spec in load_file(path).runs:
        kwargs = check_arguments(spec)
        key = json.dumps(kwargs, sort_keys=True, default=str)
        checks.setdefault(key, (f"{path} ({spec.name})", kwargs))
    return list(checks.values())


def run_check(kwargs: dict[str, Any]) -> dict[str, Any]:
    """One check's report (``remote.dataset.check.check_dataset``); bad input is a SpecError."""
    from remote.dataset.check import check_dataset

    try:
        return check_dataset(**kwargs)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise SpecError(f"{kwargs['directory']}: {exc}") from exc


def run_checks(target: Union[Path, str, "RunSpec"]) -> list[tuple[str, dict[str, Any]]]:
    """(label, report) of every check ``target`` needs; each report has ``passed``."""
    return [(label, run_check(kwargs)) for label, kwargs in checks_for(target)]
