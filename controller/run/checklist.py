"""The agent's stages as a checklist a person reads: state, time and the one fact that matters.

Input is the agent's ``status.json`` (``stages``: ``{name: {state, started_at, ended_at,
detail}}``, written by ``remote.status.RunRecorder``). It comes from the instance, so it is
untrusted: every value is type-checked before use, anything odd is left out rather than shown as
a Python repr, and text from it goes through :func:`plain` (control characters removed, length
capped). rich-free: ``controller.ui`` draws the rows, and so does any other reporter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from controller.untrusted import clean_text
from remote.status import STAGES

STAGE_STATES = ("pending", "running", "done", "failed", "stopped", "skipped")
MAX_TEXT = 200
S = TypeVar("S")


def plain(text: Any, *, limit: int = MAX_TEXT) -> str:
    """Instance text made safe to show on one line: control sequences gone, its lines joined
    with "; ", runs of blanks as one, at most ``limit`` characters. Not markup-escaped: draw it
    with rich ``Text``."""
    lines = (" ".join(line.split()) for line in clean_text(text).split("\n"))
    cleaned = "; ".join(line for line in lines if line)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def label(stage: Any) -> str:
    """``quality_gate`` -> ``quality gate``; an unknown stage name is shown cleaned."""
    return plain(stage, limit=40).replace("_", " ") if stage else ""


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value else None  # NaN is no number to show


def _int(value: Any) -> int | None:
    number = _num(value)
    return int(number) if number is not None else None


def checked(snap: S) -> S:
    """A poll's snapshot with its numbers from the instance type-checked: a step, total, loss,
    s/step or ETA that is not a number (or a total of 0) reads as unknown, a stage that is not
    text as none, so that drawing it can neither fail nor show a repr."""
    fields: dict[str, Any] = {name: _num(getattr(snap, name))
                              for name in ("loss", "s_per_step", "eta_s")}
    fields.update(step=_int(getattr(snap, "step")), total=_int(getattr(snap, "total")) or None)
    for name in ("stage", "agent_state", "error"):
        value = getattr(snap, name)
        fields[name] = value if isinstance(value, str) and value else None
    if not isinstance(getattr(snap, "status"), dict):
        fields["status"] = {}
    return dataclasses.replace(snap, **fields)  # type: ignore[type-var]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _counts(pairs: list[tuple[Any, str]]) -> str:
    """``6 kept, 6 templated``: the non-zero counts, in words."""
    return ", ".join(f"{n} {words}" for n, words in ((_int(v), w) for v, w in pairs) if n)


def _checks(d: dict[str, Any]) -> str:
    checks = [c for c in d.get("checks") or [] if isinstance(c, dict)]
    gpu = _dict(d.get("gpu"))
    if not gpu and not checks:
        return ""
    name, count = gpu.get("name"), _int(gpu.get("count"))
    machine = (f"{count}x {plain(name, limit=40)}" if count and count > 1 else
               plain(name, limit=40)) if isinstance(name, str) and name else "no GPU"
    warned = sum(1 for c in checks if c.get("status") == "warn")
    passed = sum(1 for c in checks if c.get("status") in ("pass", "skipped"))
    counts = f"{passed}/{len(checks)} checks" + (f", {_plural(warned, 'warning')}" if warned
                                                  else "")
    return f"{machine}, {counts}" if checks else machine


def _bootstrap(d: dict[str, Any]) -> str:
    trainer, source, commit = d.get("trainer"), d.get("source"), d.get("commit")
    if trainer == "tiny":
        return "tiny trainer (CPU)"
    parts = [plain(trainer, limit=30) if isinstance(trainer, str) else "trainer"]
    if isinstance(commit, str) and commit:
        parts.append(plain(commit, limit=12)[:7])
    if isinstance(source, str) and source:
        parts.append(f"({plain(source, limit=20)})")
    return " ".join(parts)


def _ingest(d: dict[str, Any]) -> str:
    totals = _dict(d.get("totals"))
    usable = _int(totals.get("ingested"))
    if usable is None:
        return ""
    left = _counts([(totals.get("unusable"), "unusable"), (totals.get("skipped"), "skipped")])
    return _plural(usable, "image") + (f" ({left})" if left else "")


def _caption(d: dict[str, Any]) -> str:
    counts = _counts([(d.get("kept"), "kept"), (d.get("generated"), "by the model"),
                      (d.get("templated"), "from the template"), (d.get("missing"), "missing")])
    inserted = _int(d.get("trigger_inserted"))
    return ", ".join(p for p in (counts, f"trigger added to {inserted}" if inserted else "") if p)


def _quality_gate(d: dict[str, Any]) -> str:
    usable, excluded = _int(d.get("usable")), _int(d.get("excluded")) or 0
    if usable is None:
        return ""
    warnings = d.get("warnings")
    extra = f", {_plural(len(warnings), 'warning')}" if isinstance(warnings, list) and warnings \
        else ""
    return f"{usable}/{usable + excluded} images pass{extra}"


def _config(d: dict[str, Any]) -> str:
    steps, rank = _int(d.get("steps")), _int(d.get("rank"))
    return ", ".join(part for part in (f"{steps} steps" if steps else "",
                                       f"rank {rank}" if rank else "") if part)


def _train(d: dict[str, Any]) -> str:
    step, speed = _int(d.get("step")), _num(d.get("s_per_step"))
    if step is None:
        return ""
    fact = f"{step} steps" if d.get("state") != "stopped" else f"stopped at step {step}"
    return fact + (f", {speed:.2f} s/step" if speed else "")


def _validate(d: dict[str, Any]) -> str:
    lora, samples = _dict(d.get("lora")), _dict(d.get("samples"))
    parts = []
    if lora:
        tensors = _int(lora.get("tensors"))
        parts.append("LoRA loads" + (f" ({tensors} tensors)" if tensors else "")
                     if lora.get("ok") else "LoRA has problems")
    count = _int(samples.get("count"))
    if count is not None:
        parts.append(_plural(count, "sample"))
    return ", ".join(parts)


def _publish(d: dict[str, Any]) -> str:
    files = _int(d.get("files"))
    return f"{_plural(files, 'file')} packed" if files is not None else ""


FACTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "checks": _checks, "bootstrap": _bootstrap, "ingest": _ingest, "caption": _caption,
    "quality_gate": _quality_gate, "config": _config, "train": _train, "validate": _validate,
    "publish": _publish,
}


def stage_fact(stage: str, state: str, detail: Any) -> str:
    """The one fact of a finished stage (``12 images``, ``12/12 images pass``); for a failed one
    its error, for a skipped one why; "" when the detail holds nothing usable."""
    d = _dict(detail)
    if state == "failed":
        return plain(d.get("error") or "failed")
    if state == "skipped":
        return plain(d["reason"]) if isinstance(d.get("reason"), str) else ""
    if state not in ("done", "stopped"):
        return ""
    try:
        return FACTS[stage](d) if stage in FACTS else ""
    except (TypeError, ValueError, AttributeError):  # a detail of an unexpected shape
        return ""


@dataclass(frozen=True)
class StageRow:
    """One line of the checklist."""

    stage: str  # the agent's name (``quality_gate``)
    label: str  # what a person reads (``quality gate``)
    state: str  # one of STAGE_STATES
    seconds: float | None  # how long it took, once it ended
    fact: str


def stage_rows(status: Mapping[str, Any] | None, current: str | None = None) -> list[StageRow]:
    """The checklist of a ``status.json``: every stage of ``remote.status.STAGES`` in order
    (missing or malformed entries read as pending, ``current`` (its ``stage``) as running;
    unknown stage names are not shown)."""
    stages = _dict((status or {}).get("stages"))
    current = current or (status or {}).get("stage")
    rows = []
    for name in STAGES:
        entry = _dict(stages.get(name))
        state = entry.get("state") if entry.get("state") in STAGE_STATES else "pending"
        if state == "pending" and name == current:
            state = "running"
        start, end = _num(entry.get("started_at")), _num(entry.get("ended_at"))
        seconds = max(0.0, end - start) if start is not None and end is not None \
            and state != "running" else None
        rows.append(StageRow(name, label(name), str(state), seconds,
                             stage_fact(name, str(state), entry.get("detail"))))
    return rows
