"""A batch's results side by side: ``batch_summary.json`` and ``batch_report.html``.

Both go into the batch's out dir (``./runs/<batch name>/`` by default), beside the runs' own
folders. Per run they hold: result, bundle path, hours, dollars, final loss, s/step and the
parameters the batch varied. The data comes from each run's fetched bundle (``receipt.json``,
``samples/``, ``loss.jsonl``: the loss curve) and the controller's ``controller_receipt.json``.
A bundle packed before ``loss.jsonl`` was part of it, or a run with no bundle, has its curve read
back from the trainer's progress lines in the fetched ``logs/agent.log``.

The HTML page is self-contained: one inline SVG with every run's loss curve, and the final samples
of each run side by side (one row per prompt; every run samples the same prompts with the same
seed), each column labelled with its varied parameters and its cost.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remote.publish.report_html import DASH

if TYPE_CHECKING:
    from controller.journal import Journal

SUMMARY_NAME = "batch_summary.json"
REPORT_NAME = "batch_report.html"
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def loss_points(out_dir: Path, *, bundle: Path | None = None) -> list[tuple[int, float]]:
    """(step, loss) from ``bundle/loss.jsonl`` (the runner's own record, a step logged twice after
    a resume keeping its last value) when the run's fetched bundle has one; else from the
    trainer's progress lines in the fetched ``out_dir/logs/agent.log``."""
    from remote.progress import LogWatcher
    from remote.publish.bundle import LOSS_HISTORY, read_loss_points

    points = read_loss_points(bundle / LOSS_HISTORY) if bundle is not None else []
    if points:
        return points
    try:
        data = (out_dir / "logs" / "agent.log").read_bytes()
    except OSError:
        return []
    watcher = LogWatcher()
    by_step: dict[int, float] = {}
    for event in watcher.feed(data) + watcher.close():
        progress = event.progress
        if event.kind == "progress" and progress is not None and progress.loss is not None:
            by_step[progress.step] = progress.loss
    return sorted(by_step.items())


def final_samples(out_dir: Path) -> dict[int, Path]:
    """Prompt index -> the newest sample of that prompt in the bundle's ``samples/``."""
    from remote.validate import parse_sample_name

    newest: dict[int, tuple[int, Path]] = {}
    folder = out_dir / "samples"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        parsed = parse_sample_name(path.name)
        if parsed and (parsed[1] not in newest or parsed[0] >= newest[parsed[1]][0]):
            newest[parsed[1]] = (parsed[0], path)
    return {idx: path for idx, (_, path) in newest.items()}


def run_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One run's line in the summary, from its journal row and its fetched files."""
    out = Path(row["out_dir"]) if row.get("out_dir") else None
    receipt = _read_json(out / "receipt.json") if out else {}
    ctl = _read_json(out / "controller_receipt.json") if out else {}
    bundle = Path(row["bundle_path"]) if row.get("bundle_path") else None
    points = loss_points(out, bundle=bundle) if out else []
    state = row["slot_state"]
    hours = ctl.get("billed_hours")
    if hours is None:
        hours = receipt.get("hours")
    return {
        "name": row["name"], "label": row.get("label"), "run_id": row.get("run_id"),
        "result": state if state != "skipped" else (row.get("note") or "skipped: budget"),
        "state": state, "attempts": row.get("attempts"), "params": row.get("params") or {},
        "bundle": row.get("bundle_path"), "hours": hours,
        "usd": float(ctl.get("metered_usd") if ctl.get("metered_usd") is not None
                     else row.get("spend_usd") or 0.0),
        "est_usd": row.get("est_usd"), "reserved_usd": row.get("budget_usd"),
        "final_loss": points[-1][1] if points else row.get("loss"),
        "s_per_step": receipt.get("s_per_step"),
        "gpu": (receipt.get("hardware") or {}).get("gpu") or ctl.get("gpu_name"),
        "error": row.get("error") if state != "done" else None,
        "loss_points": points,
    }


def build_summary(journal: "Journal", batch_id: str) -> dict[str, Any]:
    from controller.batch.setup import batch_ledger, batch_rows

    from controller.batch.shares import machine_split

    batch = journal.get_batch(batch_id) or {}
    rows = batch_rows(journal, batch_id)
    runs = [run_entry(row) for row in rows]
    machines, shares = machine_split(journal, [r["run_id"] for r in rows if r.get("run_id")],
                                     journal.clock())
    names = {r["run_id"]: r["name"] for r in rows if r.get("run_id")}
    for run in runs:
        share = shares.get(run.get("run_id") or "")
        if share is not None:
            run.update(setup_share_usd=share["setup_share_usd"], share_usd=share["share_usd"],
                       machines=share["machines"])
    for machine in machines:
        machine["run_names"] = [names.get(run_id, run_id) for run_id in machine["runs"]]
    idle = sum(float(m.get("idle_usd") or 0.0) for m in machines)
    return {
        "batch_id": batch_id, "name": batch.get("name"), "state": batch.get("state"),
        "budget_usd": batch.get("max_usd"), "max_parallel": batch.get("max_parallel"),
        "reuse_machines": bool(batch.get("reuse_machines")),
        # the runs' own meters plus the idle seats of shared multi-GPU instances
        "spent_usd": round(sum(r["usd"] for r in runs) + idle, 6),
        "idle_usd": round(idle, 6),
        "ledger": batch_ledger(journal, batch).to_dict() if batch else {},
        "machines": machines,
        "varied": json.loads(batch.get("varied_json") or "[]"),
        "runs": [{k: v for k, v in r.items() if k != "loss_points"} for r in runs],
    }, runs


def write_report(journal: "Journal", batch_id: str) -> tuple[Path, Path]:
    """Write both files into the batch's out dir; returns their paths."""
    from controller.state import write_text_atomic

    summary, runs = build_summary(journal, batch_id)
    folder = Path((journal.get_batch(batch_id) or {})["out_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    summary_path, report_path = folder / SUMMARY_NAME, folder / REPORT_NAME
    write_text_atomic(summary_path, json.dumps(summary, indent=2, default=str) + "\n", mode=0o644)
    _share_into_receipts(summary)
    write_text_atomic(report_path, render_html(summary, runs), mode=0o644)
    return summary_path, report_path


def _share_into_receipts(summary: dict[str, Any]) -> None:
    """Each run's controller receipt gets its share of the machines it ran on (the batch's
    final split: known only once every run on a machine has ended)."""
    from controller.state import write_text_atomic

    machines = {m["instance_id"]: m for m in summary.get("machines") or []}
    for run in summary["runs"]:
        if not run.get("bundle") or "share_usd" not in run:
            continue
        path = Path(run["bundle"]) / "controller_receipt.json"
        receipt = _read_json(path)
        if not receipt:
            continue
        receipt["machine_share"] = {
            "share_usd": run["share_usd"], "setup_share_usd": run["setup_share_usd"],
            "metered_usd": run["usd"],
            "machines": [{key: machines[iid].get(key) for key in
                          ("instance_id", "run_names", "setup_s", "setup_usd", "metered_usd")}
                         for iid in run.get("machines") or [] if iid in machines]}
        write_text_atomic(path, json.dumps(receipt, indent=2) + "\n", mode=0o644)


def run_caption(run: dict[str, Any]) -> str:
    params = ", ".join(f"{key.split('.')[-1]}={value}" for key, value in run["params"].items())
    return f"{params or run['name']} · ${run['usd']:.2f}"


def losses_svg(runs: list[dict[str, Any]], *, width: int = 760, height: int = 300) -> str:
    """Every run's loss curve on one chart, one colour each, with a legend."""
    curves = [(run, [(s, v) for s, v in run["loss_points"] if math.isfinite(v)]) for run in runs]
    curves = [(run, pts) for run, pts in curves if len(pts) >= 2]
    if not curves:
        return '<p class="muted">No loss history in the fetched bundles or logs.</p>'
    pad_l, pad_r, pad_t, pad_b = 60, 15, 15, 35
    steps = [s for _, pts in curves for s, _ in pts]
    losses = [v for _, pts in curves for _, v in pts]
    s0, s1, l0, l1 = min(steps), max(steps), min(losses), max(losses)
    l1 = l1 if l1 > l0 else l0 + 1e-9
    span = max(s1 - s0, 1)
    bottom, right = height - pad_b, width - pad_r

    def xy(step: float, loss: float) -> str:
        x = pad_l + (step - s0) / span * (right - pad_l)
        y = pad_t + (l1 - loss) / (l1 - l0) * (bottom - pad_t)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-size="11" role="img" aria-label="loss curves">',
             f'<rect x="{pad_l}" y="{pad_t}" width="{right - pad_l}" height="{bottom - pad_t}" '
             f'fill="#fafafa" stroke="#ccc"/>']
    for i, (run, pts) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{xy(s, v)}" for j, (s, v) in enumerate(pts))
        parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5">'
                     f'<title>{html.escape(run_caption(run))}</title></path>')
        parts.append(f'<text x="{right - 4}" y="{pad_t + 14 + 13 * i}" text-anchor="end" '
                     f'fill="{color}">{html.escape(run_caption(run))}</text>')
    parts += [f'<text x="{pad_l - 6}" y="{pad_t + 4}" text-anchor="end">{l1:.4g}</text>',
              f'<text x="{pad_l - 6}" y="{bottom}" text-anchor="end">{l0:.4g}</text>',
              f'<text x="{pad_l}" y="{bottom + 16}">{s0}</text>',
              f'<text x="{right}" y="{bottom + 16}" text-anchor="end">{s1}</text>',
              f'<text x="{(pad_l + right) / 2}" y="{bottom + 30}" text-anchor="middle">step</text>',
              "</svg>"]
    return "".join(parts)


def sample_prompts(runs: list[dict[str, Any]]) -> list[str]:
    """The prompts the runs sampled, from the first bundle's ``run.yaml`` (every run of a batch
    samples the same prompts), with the trigger word filled in; [] when none can be read."""
    import yaml

    from remote.publish.model_card import fill_trigger

    for run in runs:
        try:
            spec = yaml.safe_load((Path(run["bundle"]) / "run.yaml").read_text(encoding="utf-8"))
            prompts = spec["training"]["sample"]["prompts"]
        except (OSError, TypeError, KeyError, yaml.YAMLError):
            continue
        if isinstance(prompts, list):
            return [fill_trigger(str(p), spec.get("trigger_word")) for p in prompts]
    return []


def samples_table(runs: list[dict[str, Any]]) -> str:
    """Final samples side by side: a column per run, a row per prompt (same prompt and seed)."""
    from remote.publish.report_html import thumbnail_data_uri

    shown = [(run, final_samples(Path(run["bundle"]))) for run in runs if run.get("bundle")]
    shown = [(run, samples) for run, samples in shown if samples]
    if not shown:
        return '<p class="muted">No samples.</p>'
    texts = sample_prompts([run for run, _ in shown])
    prompts = sorted({idx for _, samples in shown for idx in samples})
    head = "".join(f"<th>{html.escape(run_caption(run))}</th>" for run, _ in shown)
    rows = []
    for idx in prompts:
        cells = []
        for _, samples in shown:
            uri = thumbnail_data_uri(samples[idx]) if idx in samples else None
            cells.append(f'<td><img src="{uri}" alt="prompt {idx + 1}"></td>' if uri
                         else f"<td>{DASH}</td>")
        label = texts[idx] if idx < len(texts) else f"prompt {idx + 1}"
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f'<table class="grid"><tr><th>prompt</th>{head}</tr>{"".join(rows)}</table>'


def _cell(value: Any) -> str:
    from remote.publish.report_html import human

    return human(value)


def _result(run: dict[str, Any]) -> str:
    css = {"done": "ok", "skipped": "warn", "stopped": "warn", "budget": "warn"}.get(run["state"], "bad")
    text = f'<span class="{css}">{html.escape(str(run["result"]))}</span>'
    if run.get("error"):
        text += f'<br><span class="muted">{html.escape(str(run["error"]))}</span>'
    return text


def machines_table(summary: dict[str, Any]) -> str:
    """The machines and the runs each served in turn, with the setup paid once and each run's
    share (``controller.batch.shares``); nothing when no machine served more than one run."""
    from remote.publish.report_html import duration, usd

    machines = summary.get("machines") or []
    if not any(len(m.get("runs") or []) > 1 for m in machines):
        return ""
    share = {run.get("run_id"): run.get("share_usd") for run in summary.get("runs") or []}
    rows = []
    for machine in machines:
        served = ", ".join(f"{html.escape(str(name))} ({usd(share.get(run_id))})"
                           for name, run_id in zip(machine.get("run_names") or [],
                                                   machine.get("runs") or []))
        rows.append(f"<tr><td>{_cell(machine.get('instance_id'))}</td>"
                    f"<td>{_cell(machine.get('gpu_name'))}</td><td>{served}</td>"
                    f"<td>{duration(float(machine.get('setup_s') or 0))} · "
                    f"{usd(machine.get('setup_usd'))}</td>"
                    f"<td>{usd(machine.get('metered_usd'))}</td></tr>")
    return ("<h2>Machines</h2><p class=\"muted\">Each machine was set up once; the runs it served "
            "one after another carry equal shares of that setup.</p><table><tr><th>instance</th>"
            "<th>GPU</th><th>runs in order (each one's share)</th><th>setup, paid once</th>"
            f"<th>metered</th></tr>{''.join(rows)}</table>")


def render_html(summary: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    from remote.publish.report_html import CSS, duration, usd

    varied = summary.get("varied") or []
    head = "".join(f"<th>{html.escape(k)}</th>" for k in
                   ["run", *varied, "result", "time", "cost", "final loss", "s/step", "GPU"])
    body = []
    for run in runs:
        cells = [run["name"], *[run["params"].get(k) for k in varied]]
        hours = run["hours"]
        loss, sps = run["final_loss"], run["s_per_step"]
        body.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells)
                    + f"<td>{_result(run)}</td>"
                    f"<td>{duration(hours * 3600) if isinstance(hours, (int, float)) else DASH}</td>"
                    f"<td>{usd(run['usd'])}</td>"
                    f"<td>{f'{loss:.4f}' if isinstance(loss, (int, float)) else DASH}</td>"
                    f"<td>{f'{sps:.2f}' if isinstance(sps, (int, float)) else DASH}</td>"
                    f"<td>{_cell(run['gpu'])}</td></tr>")
    title = html.escape(f"batch {summary.get('name') or summary.get('batch_id')}")
    done = sum(1 for run in runs if run["state"] == "done")
    cards = [("state", _cell(summary.get("state"))), ("runs done", f"{done} / {len(runs)}"),
             ("spent", f"{usd(summary.get('spent_usd'))} <span class=\"muted\">of "
                       f"{usd(summary.get('budget_usd'))}</span>"),
             ("in parallel", _cell(summary.get("max_parallel")))]
    headline = '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div></div>'
        for k, v in cards) + "</div>"
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{title}: flux-remote batch report</title><style>{CSS}</style></head><body>"
            f"<h1>{title}</h1>{headline}"
            f"<h2>Runs</h2><table><tr>{head}</tr>{''.join(body)}</table>"
            f"{machines_table(summary)}"
            f"<h2>Final samples</h2>{samples_table(runs)}"
            f"<h2>Loss</h2>{losses_svg(runs)}"
            '<p class="muted">Made by flux-remote. This page is self-contained: it loads nothing '
            "from the network.</p></body></html>\n")
