"""``report.html``: one self-contained result page that people read instead of logs.

Top to bottom: the headline (state, steps, final loss, cost, time, GPU), the samples per
checkpoint (prompts across, steps down), the loss curve with the checkpoints marked, the quality
gate with thumbnails of the excluded images and why, validation as a short table of checks, and
the receipt in human units. Every image is a small JPEG thumbnail embedded as a data URI and the
chart is inline SVG: the page makes no request at all. Nothing a person reads is a Python repr:
every value goes through :func:`human` or a formatter below, and a missing one shows as a dash.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path
from typing import Any

THUMB_PX = 192
DASH = "–"
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;
color:#1f2328;padding:0 1rem;line-height:1.45}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #d8dee4;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse} td,th{padding:.3rem .7rem;border:1px solid #e3e7eb;
vertical-align:top;text-align:left;font-size:.9rem} th{background:#f6f8fa;font-weight:600}
.grid td,.grid th{text-align:center;vertical-align:middle} .grid img{display:block;width:160px;
height:auto;margin:auto;border-radius:4px}
.ok{color:#17803d;font-weight:600} .bad{color:#b42318;font-weight:600}
.warn{color:#9a6700;font-weight:600} .muted{color:#6e7781}
.cards{display:flex;flex-wrap:wrap;gap:.7rem;margin:1rem 0}
.card{border:1px solid #d8dee4;border-radius:8px;padding:.55rem .9rem;min-width:120px}
.card .k{font-size:.75rem;color:#6e7781;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:1.25rem;font-weight:600}
.thumbs{display:flex;flex-wrap:wrap;gap:.8rem} .thumbs figure{margin:0;width:200px;font-size:.8rem}
.thumbs img{max-width:192px;border-radius:4px}
"""
STATE_CLASS = {"done": "ok", "stopped": "warn"}


def thumbnail_data_uri(path: Path, *, size: int = THUMB_PX) -> str | None:
    """A JPEG thumbnail of ``path`` as a data URI, or None when it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.thumbnail((size, size))
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def human(value: Any) -> str:
    """Text for one value, escaped: a dash for nothing, lists joined, never a repr."""
    if value is None or value == "" or value == [] or value == {}:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(human(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{html.escape(str(k))}: {human(v)}" for k, v in value.items())
    return html.escape(str(value))


def usd(value: Any) -> str:
    number = _number(value)
    return DASH if number is None else f"${number:,.2f}"


def duration(seconds: Any) -> str:
    """Seconds as people say them: 42 s, 3.5 min, 2 h 05 min."""
    number = _number(seconds)
    if number is None:
        return DASH
    if number < 90:
        return f"{number:.0f} s"
    if number < 3600:
        return f"{number / 60:.1f} min"
    hours, minutes = divmod(round(number / 60), 60)
    return f"{hours} h {minutes:02d} min"


def size_bytes(value: Any) -> str:
    number = _number(value)
    if number is None:
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if number >= scale:
            return f"{number / scale:.1f} {unit}"
    return f"{number:.0f} bytes"


def utc(epoch: Any) -> str:
    number = _number(epoch)
    return DASH if number is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(number))


def loss_svg(points: list[tuple[int, float]], *, checkpoints: list[int] | None = None,
             width: int = 720, height: int = 260) -> str:
    """The loss curve (step, loss) as an inline SVG with labelled axes; ``checkpoints`` are
    marked with a dashed line and their step."""
    points = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(points) < 2:
        return '<p class="muted">Not enough progress lines for a loss curve.</p>'
    pad_l, pad_r, pad_t, pad_b = 60, 15, 22, 35
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    s0, s1 = min(steps), max(steps) or 1
    l0, l1 = min(losses), max(losses)
    if l1 == l0:
        l1 = l0 + 1e-9
    span_s = max(s1 - s0, 1)
    bottom, right = height - pad_b, width - pad_r

    def x_of(step: float) -> float:
        return round(pad_l + (step - s0) / span_s * (right - pad_l), 1)

    def y_of(loss: float) -> float:
        return round(pad_t + (l1 - loss) / (l1 - l0) * (bottom - pad_t), 1)

    path = " ".join(f"{'M' if i == 0 else 'L'}{x_of(s)},{y_of(v)}" for i, (s, v) in enumerate(points))
    marks = []
    for step in sorted({c for c in checkpoints or [] if s0 <= c <= s1}):
        x = x_of(step)
        marks.append(f'<line x1="{x}" y1="{pad_t}" x2="{x}" y2="{bottom}" stroke="#9a6700" '
                     f'stroke-dasharray="4 3"><title>checkpoint at step {step}</title></line>'
                     f'<text x="{x}" y="{pad_t - 6}" text-anchor="middle" fill="#9a6700">'
                     f'{step}</text>')
    labels = [
        f'<text x="{pad_l - 6}" y="{pad_t + 4}" text-anchor="end">{l1:.3g}</text>',
        f'<text x="{pad_l - 6}" y="{bottom}" text-anchor="end">{l0:.3g}</text>',
        f'<text x="{pad_l}" y="{bottom + 16}">{s0}</text>',
        f'<text x="{right}" y="{bottom + 16}" text-anchor="end">{s1}</text>',
        f'<text x="{(pad_l + right) / 2}" y="{bottom + 30}" text-anchor="middle">step</text>',
        f'<text x="14" y="{(pad_t + bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(pad_t + bottom) / 2})">loss</text>',
    ]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-size="11" role="img" aria-label="loss curve">'
            f'<rect x="{pad_l}" y="{pad_t}" width="{right - pad_l}" height="{bottom - pad_t}" '
            f'fill="#fafbfc" stroke="#d0d7de"/>' + "".join(marks)
            + f'<path d="{path}" fill="none" stroke="#2563eb" stroke-width="1.5"/>'
            + "".join(labels) + "</svg>")


def _sample_grid(grid: dict[int, dict[int, Path]], prompts: list[str]) -> str:
    if not grid:
        return '<p class="muted">No samples.</p>'
    columns = sorted({idx for row in grid.values() for idx in row})
    head = "".join(f"<th>{html.escape(prompts[i] if i < len(prompts) else f'prompt {i + 1}')}</th>"
                   for i in columns)
    rows = []
    last = max(grid)
    for step in sorted(grid):
        note = " (base model)" if step == 0 else " (final)" if step == last else ""
        cells = []
        for idx in columns:
            path = grid[step].get(idx)
            uri = thumbnail_data_uri(path) if path else None
            cells.append(f'<td><img src="{uri}" alt="step {step}, prompt {idx + 1}"></td>' if uri
                         else f'<td class="muted">{DASH}</td>')
        rows.append(f"<tr><th>step {step}{note}</th>{''.join(cells)}</tr>")
    return f'<table class="grid"><tr><th>checkpoint</th>{head}</tr>{"".join(rows)}</table>'


def _gate_section(gate: dict[str, Any] | None, excluded: list[dict[str, Any]]) -> str:
    if not gate:
        return '<p class="muted">The quality gate did not run.</p>'
    verdict = ('<span class="ok">passed</span>' if gate.get("passed")
               else '<span class="bad">failed</span>')
    parts = [f"<p>Quality gate {verdict}: {human(gate.get('usable_count'))} usable of "
             f"{human(gate.get('image_count'))} images, {human(gate.get('excluded_count'))} "
             "excluded.</p>"]
    found = {k: v for k, v in (gate.get("totals") or {}).items() if v}
    if found:
        parts.append("<p>Found: " + ", ".join(f"{html.escape(k.replace('_', ' '))} {human(v)}"
                                              for k, v in found.items()) + "</p>")
    for label, items in (("Reason", gate.get("reasons")), ("Warning", gate.get("warnings"))):
        parts += [f"<p>{label}: {human(item)}</p>" for item in items or []]
    if excluded:
        figures = []
        for item in excluded:
            uri = item.get("thumb")
            img = (f'<img src="{uri}" alt="{html.escape(str(item.get("source")))}">' if uri
                   else '<div class="muted">(no preview)</div>')
            details = item.get("details") or {}
            why = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in details.items()) if isinstance(
                details, dict) else str(details)
            figures.append(f"<figure>{img}<figcaption><b>{human(item.get('source'))}</b><br>"
                           f"{html.escape(why) if why else human(item.get('categories'))}"
                           f"</figcaption></figure>")
        parts.append('<h3>Excluded images</h3><div class="thumbs">' + "".join(figures) + "</div>")
    return "".join(parts)


def _check_row(ok: bool | None, what: str, fact: str) -> str:
    mark = ('<span class="ok">pass</span>' if ok else '<span class="bad">fail</span>' if ok is False
            else f'<span class="muted">{DASH}</span>')
    return f"<tr><td>{mark}</td><td>{html.escape(what)}</td><td>{fact}</td></tr>"


def _validation_section(validation: dict[str, Any]) -> str:
    """The checks :mod:`remote.validate` made, one row each; its problems name what failed."""
    lora = validation.get("lora") or {}
    samples = validation.get("samples") or {}
    if not lora and not samples:
        return '<p class="muted">Validation did not run.</p>'
    rows = []
    problems = [str(p) for p in lora.get("problems") or []]
    if lora:
        passed = bool(lora.get("ok"))
        rows.append(_check_row(passed, "LoRA file loads with safetensors",
                               f"{human(lora.get('tensors'))} tensors, "
                               f"{size_bytes(lora.get('bytes'))}"))
        rows.append(_check_row(passed, "PEFT key names in lora_A / lora_B pairs",
                               f"{human(lora.get('pairs'))} pairs"))
        rows.append(_check_row(passed, "rank matches the spec", human(lora.get("rank"))))
        rows.append(_check_row(passed, "no NaN or Inf in any tensor", ""))
        rows.append(_check_row(lora.get("step") is not None, "metadata names the training step",
                               human(lora.get("step"))))
        rows += [_check_row(False, "problem", html.escape(p)) for p in problems]
    if samples:
        rows.append(_check_row(bool(samples.get("ok")), "sample images decode",
                               f"{human(samples.get('count'))} images"))
        rows += [_check_row(False, "sample problem", html.escape(str(p)))
                 for p in samples.get("problems") or []]
    return f"<table><tr><th>result</th><th>check</th><th>found</th></tr>{''.join(rows)}</table>"


def _receipt_section(receipt: dict[str, Any]) -> str:
    hardware = receipt.get("hardware") or {}
    steps = receipt.get("steps") or {}
    price = _number(receipt.get("price_per_hour"))
    vram = [v for v in hardware.get("vram_gb") or [] if _number(v)]
    stages = ", ".join(f"{html.escape(str(name))} {duration(sec)}"
                       for name, sec in (receipt.get("durations_s") or {}).items()
                       if _number(sec) is not None)
    rows = [
        ("cost", f"{usd(receipt.get('spend_usd'))} of a {usd(receipt.get('budget_usd'))} budget"),
        ("price", f"{usd(price)} an hour" if price else "free (local)"),
        ("time billed", duration((_number(receipt.get("hours")) or 0) * 3600)
         if receipt.get("hours") is not None else DASH),
        ("GPU", human(hardware.get("gpu")) + (f" × {hardware['num_gpus']}"
                                             if (hardware.get("num_gpus") or 0) > 1 else "")),
        ("GPU memory", ", ".join(f"{v:.0f} GB" for v in vram) or DASH),
        ("CPU", f"{human(hardware.get('cpu'))} ({human(hardware.get('cpu_count'))} cores), "
                f"{human(hardware.get('ram_gb'))} GB RAM" if hardware.get("cpu") else DASH),
        ("trainer", human(receipt.get("trainer"))),
        ("steps", f"{human(steps.get('done'))} of {human(steps.get('planned'))}"),
        ("time per step", f"{_number(receipt.get('s_per_step')):.2f} s"
         if _number(receipt.get("s_per_step")) is not None else DASH),
        ("stages", stages or DASH),
        ("started", utc(receipt.get("started_at"))),
        ("ended", utc(receipt.get("ended_at"))),
        ("run id", human(receipt.get("run_id"))),
        ("agent version", human(receipt.get("agent_version"))),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _card(label: str, value: str) -> str:
    return f'<div class="card"><div class="k">{html.escape(label)}</div><div class="v">{value}</div></div>'


def _headline(state: str, loss_points: list[tuple[int, float]], receipt: dict[str, Any]) -> str:
    steps = receipt.get("steps") or {}
    started, ended = _number(receipt.get("started_at")), _number(receipt.get("ended_at"))
    elapsed = ended - started if started is not None and ended is not None else None
    final = loss_points[-1][1] if loss_points else None
    cost = usd(receipt.get("spend_usd") or 0)
    if _number(receipt.get("budget_usd")):
        cost += f' <span class="muted">of {usd(receipt.get("budget_usd"))}</span>'
    return '<div class="cards">' + "".join([
        _card("state", f'<span class="{STATE_CLASS.get(state, "bad")}">{html.escape(state)}</span>'),
        _card("steps", f"{human(steps.get('done'))} / {human(steps.get('planned'))}"),
        _card("final loss", f"{final:.4f}" if _number(final) is not None else DASH),
        _card("cost", cost),
        _card("time", duration(elapsed)),
        _card("GPU", human((receipt.get("hardware") or {}).get("gpu"))),
    ]) + "</div>"


def render_report(*, name: str, state: str, loss_points: list[tuple[int, float]],
                  sample_grid: dict[int, dict[int, Path]], prompts: list[str],
                  gate: dict[str, Any] | None, excluded: list[dict[str, Any]],
                  validation: dict[str, Any], receipt: dict[str, Any],
                  checkpoints: list[int] | None = None) -> str:
    """The whole page. ``excluded`` items: source, categories, details, thumb (data URI);
    ``checkpoints``: the steps to mark on the loss curve (default: the sampled steps)."""
    marks = sorted(set(checkpoints if checkpoints is not None else sample_grid))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(name)}: flux-remote report</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(name)}</h1>", _headline(state, loss_points, receipt),
        "<h2>Samples per checkpoint</h2>", _sample_grid(sample_grid, prompts),
        "<h2>Loss</h2>", loss_svg(loss_points, checkpoints=marks),
        "<h2>Dataset quality gate</h2>", _gate_section(gate, excluded),
        "<h2>Validation</h2>", _validation_section(validation),
        "<h2>Receipt</h2>", _receipt_section(receipt),
        '<p class="muted">Made by flux-remote. This page is self-contained: it loads nothing '
        "from the network.</p>",
        "</body></html>",
    ])
