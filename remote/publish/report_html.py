"""``report.html``: one self-contained page people read instead of logs.

The loss curve is an inline SVG, sample images per checkpoint form a grid (prompts across, steps
down), the quality gate summary shows thumbnails of the excluded images and why, and the receipt
closes the page. Every image is a small JPEG thumbnail embedded as a data URI: the page loads no
external asset.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

THUMB_PX = 192
CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.3rem;margin-top:2rem}
table{border-collapse:collapse} td,th{padding:.25rem .6rem;border:1px solid #e3e3e3;
vertical-align:top;text-align:left;font-size:.9rem} .grid img{display:block;max-width:192px}
.ok{color:#17803d;font-weight:600} .bad{color:#b42318;font-weight:600} .muted{color:#777}
.thumbs{display:flex;flex-wrap:wrap;gap:.8rem} .thumbs figure{margin:0;width:200px;font-size:.8rem}
pre{background:#f6f6f6;padding:.8rem;overflow:auto;font-size:.8rem}
"""


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
    rgb.save(buffer, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def loss_svg(points: list[tuple[int, float]], *, width: int = 720, height: int = 260) -> str:
    """The loss curve (step, loss) as an inline SVG with labelled axes."""
    points = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(points) < 2:
        return '<p class="muted">Not enough progress lines for a loss curve.</p>'
    pad_l, pad_r, pad_t, pad_b = 60, 15, 15, 35
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    s0, s1 = min(steps), max(steps) or 1
    l0, l1 = min(losses), max(losses)
    if l1 == l0:
        l1 = l0 + 1e-9
    span_s = max(s1 - s0, 1)

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = pad_l + (step - s0) / span_s * (width - pad_l - pad_r)
        y = pad_t + (l1 - loss) / (l1 - l0) * (height - pad_t - pad_b)
        return round(x, 1), round(y, 1)

    path = " ".join(f"{'M' if i == 0 else 'L'}{x},{y}"
                    for i, (x, y) in enumerate(xy(s, v) for s, v in points))
    bottom, right = height - pad_b, width - pad_r
    labels = [
        f'<text x="{pad_l - 6}" y="{pad_t + 4}" text-anchor="end">{l1:.4g}</text>',
        f'<text x="{pad_l - 6}" y="{bottom}" text-anchor="end">{l0:.4g}</text>',
        f'<text x="{pad_l}" y="{bottom + 16}">{s0}</text>',
        f'<text x="{right}" y="{bottom + 16}" text-anchor="end">{s1}</text>',
        f'<text x="{(pad_l + right) / 2}" y="{bottom + 30}" text-anchor="middle">step</text>',
    ]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-size="11" role="img" aria-label="loss curve">'
            f'<rect x="{pad_l}" y="{pad_t}" width="{right - pad_l}" height="{bottom - pad_t}" '
            f'fill="#fafafa" stroke="#ccc"/>'
            f'<path d="{path}" fill="none" stroke="#2563eb" stroke-width="1.5"/>'
            + "".join(labels) + "</svg>")


def _sample_grid(grid: dict[int, dict[int, Path]], prompts: list[str]) -> str:
    if not grid:
        return '<p class="muted">No samples.</p>'
    columns = sorted({idx for row in grid.values() for idx in row})
    head = "".join(f"<th>{html.escape(prompts[i] if i < len(prompts) else f'prompt {i}')}</th>"
                   for i in columns)
    rows = []
    for step in sorted(grid):
        cells = []
        for idx in columns:
            path = grid[step].get(idx)
            uri = thumbnail_data_uri(path) if path else None
            cells.append(f'<td><img src="{uri}" alt="step {step} prompt {idx}"></td>' if uri
                         else '<td class="muted">-</td>')
        rows.append(f"<tr><th>step {step}</th>{''.join(cells)}</tr>")
    return f'<table class="grid"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def _gate_section(gate: dict[str, Any] | None, excluded: list[dict[str, Any]]) -> str:
    if not gate:
        return '<p class="muted">The quality gate did not run.</p>'
    verdict = ('<span class="ok">passed</span>' if gate.get("passed")
               else '<span class="bad">failed</span>')
    parts = [f"<p>Quality gate {verdict}: {gate.get('usable_count')} usable of "
             f"{gate.get('image_count')} images, {gate.get('excluded_count')} excluded.</p>"]
    found = {k: v for k, v in (gate.get("totals") or {}).items() if v}
    if found:
        parts.append("<p>Found: " + ", ".join(f"{html.escape(k)} {v}" for k, v in found.items())
                     + "</p>")
    for label, items in (("Reason", gate.get("reasons")), ("Warning", gate.get("warnings"))):
        parts += [f"<p>{label}: {html.escape(str(item))}</p>" for item in items or []]
    if excluded:
        figures = []
        for item in excluded:
            uri = item.get("thumb")
            img = f'<img src="{uri}" alt="">' if uri else '<div class="muted">(no preview)</div>'
            why = "; ".join(f"{k}: {v}" for k, v in (item.get("details") or {}).items())
            figures.append(f"<figure>{img}<figcaption><b>{html.escape(item['source'])}</b><br>"
                           f"{html.escape(why or ', '.join(item.get('categories') or []))}"
                           f"</figcaption></figure>")
        parts.append('<h3>Excluded images</h3><div class="thumbs">' + "".join(figures) + "</div>")
    return "".join(parts)


def _value_html(key: str, value: Any) -> str:
    """A receipt value as HTML: nested tables for dicts, UTC times for ``*_at`` epochs."""
    if isinstance(value, dict):
        return _receipt_table(value) if value else "-"
    if isinstance(value, list):
        return html.escape(", ".join(str(v) for v in value)) or "-"
    if key.endswith("_at") and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("-" if value is None else str(value))


def _receipt_table(receipt: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(key))}</th><td>{_value_html(str(key), value)}</td>"
                   "</tr>" for key, value in receipt.items())
    return f"<table>{rows}</table>"


def render_report(*, name: str, state: str, loss_points: list[tuple[int, float]],
                  sample_grid: dict[int, dict[int, Path]], prompts: list[str],
                  gate: dict[str, Any] | None, excluded: list[dict[str, Any]],
                  validation: dict[str, Any], receipt: dict[str, Any]) -> str:
    """The whole page. ``excluded`` items: source, categories, details, thumb (data URI)."""
    valid = validation.get("ok")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(name)}: flux-remote report</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(name)}</h1>",
        f'<p>State: <b>{html.escape(state)}</b>. Steps {receipt.get("steps", {}).get("done")} of '
        f'{receipt.get("steps", {}).get("planned")}, spend ${receipt.get("spend_usd") or 0:.2f}. '
        f'Validation: <span class="{"ok" if valid else "bad"}">{"ok" if valid else "problems"}'
        "</span>.</p>",
        "<h2>Loss</h2>", loss_svg(loss_points),
        "<h2>Samples per checkpoint</h2>", _sample_grid(sample_grid, prompts),
        "<h2>Dataset quality gate</h2>", _gate_section(gate, excluded),
        "<h2>Validation</h2>",
        f"<pre>{html.escape(json.dumps(validation, indent=2, default=str))}</pre>",
        "<h2>Receipt</h2>", _receipt_table(receipt),
        "</body></html>",
    ])
