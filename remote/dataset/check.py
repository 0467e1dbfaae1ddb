"""``python -m remote check-dataset DIR``: ingest + template captions + the quality gate into a
temporary work dir, so a dataset can be fixed on a laptop before anything is rented.

:func:`check_dataset` is the library call (the controller's ``flux-remote check-dataset`` runs it
in-process); :func:`check_dataset_main` is the command: exit 0 when the gate passes, 1 when it
fails, 2 for bad input.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from remote.dataset.caption import caption
from remote.dataset.ingest import ingest
from remote.dataset.quality import gate_settings, run_gate

DEFAULT_TEMPLATE = "a photo of [trigger]"
MAX_LISTED = 30  # flagged images listed in the text summary


def check_dataset(directory: Path, *, gate: dict[str, Any] | None = None,
                  trigger: str | None = None, caption_ext: str = "txt",
                  caption_mode: str = "template", template: str = DEFAULT_TEMPLATE,
                  insert_trigger: bool = True, max_side: int = 2048,
                  workers: int | None = None) -> dict[str, Any]:
    """Run the three dataset stages on ``directory`` in a temp dir; return the full report.

    No captioning model runs here: ``caption_mode="model"`` is checked as ``template`` (the
    instance fills those captions). Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a
    bad folder and ``ValueError`` for bad gate settings.
    """
    settings = gate_settings(gate)
    directory = Path(directory)
    mode = "keep" if caption_mode == "keep" else "template"
    with tempfile.TemporaryDirectory(prefix="flux-remote-check-") as tmp:
        result = ingest(directory, Path(tmp), caption_ext=caption_ext, max_side=max_side,
                        workers=workers)
        captions = caption(result, mode=mode, template=template, trigger=trigger,
                           caption_ext=caption_ext, insert_trigger=insert_trigger)
        report = run_gate(result, settings, caption_ext=caption_ext, load_models=False)
        return {
            "dataset": str(directory),
            "passed": report.passed,
            "summary": report.summary(),
            "gate": report.to_dict(),
            "captions": captions.to_dict(),
            "ingest": {"elapsed_s": round(result.elapsed_s, 3),
                       "decisions": _decision_counts(result.to_dict()["images"])},
        }


def _decision_counts(images: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for image in images:
        for decision in image["decisions"]:
            kind = decision.split(" from ")[0].split(" (")[0].split(":")[0]
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def render_text(report: dict[str, Any]) -> str:
    """The human-readable form: the gate summary, caption statistics, the flagged images."""
    lines = [f"dataset: {report['dataset']}", report["summary"]]
    caps = report["captions"]
    stats = caps["length_words"]
    lines.append(f"captions: {caps['kept']} kept, {caps['trigger_inserted']} trigger added, "
                 f"{caps['templated']} from template, {caps['missing']} missing"
                 + (f"; words min {stats['min']} / median {stats['median']} / max {stats['max']}"
                    if stats["count"] else ""))
    flagged = [img for img in report["gate"]["images"] if img["categories"]]
    for img in flagged[:MAX_LISTED]:
        mark = "excluded" if img["excluded"] else "warning"
        detail = "; ".join(f"{cat}: {text}" for cat, text in img["details"].items())
        lines.append(f"  [{mark}] {img['source']}: {detail}")
    if len(flagged) > MAX_LISTED:
        lines.append(f"  ... and {len(flagged) - MAX_LISTED} more (use --json for all)")
    return "\n".join(lines)


def check_dataset_main(directory: str, *, as_json: bool, trigger: str | None,
                       gate_json: str | None) -> int:
    try:
        gate = json.loads(gate_json) if gate_json else None
        if gate is not None and not isinstance(gate, dict):
            raise ValueError("--gate must be a JSON object of quality_gate settings")
        report = check_dataset(Path(directory), gate=gate, trigger=trigger)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"check-dataset: {exc}", file=sys.stderr)
        return 2
    if as_json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(render_text(report))
    return 0 if report["passed"] else 1
