"""The dataset stages: ``ingest``, ``caption``, ``quality_gate``.

They run together (each needs the previous one's in-memory result, kept in
``Runner.ingest_result``), so a resumed run repeats all three unless all three finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from remote.plan import write_json_atomic
from remote.status import StageFailed

if TYPE_CHECKING:
    from remote.runner import Runner


def _dataset_spec(run: "Runner") -> dict[str, Any]:
    return run.spec.get("dataset") or {}


def ingest(run: "Runner") -> tuple[str, dict[str, Any]]:
    from remote.dataset.ingest import ingest as copy_in

    dataset = _dataset_spec(run)
    try:
        result = copy_in(Path(run.plan["dataset_dir"]), run.work,
                         caption_ext=dataset.get("caption_ext", "txt"),
                         max_side=int(dataset.get("max_side", 2048)))
    except (OSError, ValueError) as exc:
        raise StageFailed(f"cannot ingest the dataset: {exc}", cause="dataset") from exc
    run.ingest_result = result
    totals = result.to_dict()["totals"]
    run.log.agent(ingest_line(totals))
    return "done", {"dataset_dir": str(result.dataset_dir),
                    "manifest": str(result.manifest_path), "totals": totals}


def ingest_line(totals: dict[str, int]) -> str:
    """``ingest: 12 of 12 images usable`` plus what was left out, in words (not a dict)."""
    left_out = (("unusable", "unusable"), ("skipped", "skipped"),
                ("orphan_captions", "captions without an image"))
    extra = [f"{totals[key]} {words}" for key, words in left_out if totals.get(key)]
    return (f"ingest: {totals.get('ingested', 0)} of {totals.get('files', 0)} images usable"
            + (f" ({', '.join(extra)})" if extra else ""))


def caption(run: "Runner") -> tuple[str, dict[str, Any]]:
    from remote.dataset.caption import caption as write_captions

    captioning = run.spec.get("captioning") or {}
    try:
        report = write_captions(run.ingest_result, mode=captioning.get("mode", "template"),
                                template=captioning.get("template", "a photo of [trigger]"),
                                trigger=run.spec.get("trigger_word"),
                                caption_ext=_dataset_spec(run).get("caption_ext", "txt"),
                                model=captioning.get("model"),
                                insert_trigger=captioning.get("insert_trigger", True),
                                batch_size=int(captioning.get("batch_size", 8)))
    except (OSError, ValueError, ImportError) as exc:
        raise StageFailed(f"captioning failed: {exc}", cause="caption") from exc
    full = report.to_dict()
    write_json_atomic(run.work / "caption_report.json", full)
    summary = {k: v for k, v in full.items() if k != "entries"}
    run.recorder.event("captions", **summary)
    return "done", summary


def quality_gate(run: "Runner") -> tuple[str, dict[str, Any]]:
    from remote.dataset.quality import run_gate, write_report

    caption_ext = _dataset_spec(run).get("caption_ext", "txt")
    try:
        report = run_gate(run.ingest_result, run.spec.get("quality_gate") or {},
                          caption_ext=caption_ext)
    except ValueError as exc:
        raise StageFailed(f"bad quality_gate settings: {exc}", cause="quality_gate") from exc
    write_report(report, run.work / "quality_report.json")
    write_excluded(run, report.to_dict())
    summary = report.summary()
    run.log.agent(summary)
    run.recorder.event("quality_gate", passed=report.passed, reasons=report.reasons,
                       warnings=report.warnings, usable=len(report.usable),
                       excluded=report.excluded)
    if not report.passed:
        raise StageFailed(summary, cause="quality_gate")
    return "done", {"passed": True, "usable": len(report.usable),
                    "excluded": len(report.excluded), "warnings": report.warnings,
                    "report": str(run.work / "quality_report.json")}


def write_excluded(run: "Runner", gate: dict[str, Any]) -> None:
    """Thumbnails of the excluded originals, for report.html (made now, while they exist)."""
    from remote.publish.report_html import thumbnail_data_uri

    source_root = Path(run.plan["dataset_dir"])
    items = [{"source": entry["source"], "categories": entry.get("categories"),
              "details": entry.get("details"),
              "thumb": thumbnail_data_uri(source_root / entry["source"], size=160)}
             for entry in gate.get("images") or [] if entry.get("excluded")]
    write_json_atomic(run.work / "excluded.json", items)
