"""tqdm's one-line bar, as ai-toolkit prints it, without depending on tqdm.

``demo:  10%|#         | 20/200 [00:02<00:18,  9.80it/s, lr: 1.0e-04 loss: 4.211e-01]``
"""

from __future__ import annotations

BAR_WIDTH = 10
_PARTIAL = " 123456789"  # tqdm's ascii bar: digits for the fraction of the last cell


def format_interval(seconds: float) -> str:
    """tqdm's format: ``MM:SS`` below an hour, ``H:MM:SS`` above."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{minutes:02d}:{secs:02d}"


def _bar(fraction: float) -> str:
    cells = fraction * BAR_WIDTH
    full = int(cells)
    if full >= BAR_WIDTH:
        return "#" * BAR_WIDTH
    partial = _PARTIAL[int((cells - full) * 10)]
    return ("#" * full + partial).ljust(BAR_WIDTH)


def format_bar(desc: str, step: int, total: int, elapsed_s: float, s_per_step: float | None,
               postfix: str = "") -> str:
    """One redraw. ``s_per_step`` None (no step timed yet) prints ``?`` like tqdm does."""
    fraction = min(step / total, 1.0) if total else 1.0
    if s_per_step is None or s_per_step <= 0:
        rate, remaining = "?it/s", "?"
    else:
        rate = f"{1.0 / s_per_step:5.2f}it/s" if s_per_step <= 1.0 else f"{s_per_step:5.2f}s/it"
        remaining = format_interval(max(total - step, 0) * s_per_step)
    tail = f", {postfix}" if postfix else ""
    return (f"{desc}: {fraction * 100:3.0f}%|{_bar(fraction)}| {step}/{total} "
            f"[{format_interval(elapsed_s)}<{remaining}, {rate}{tail}]")


def loss_postfix(lr: float, loss: float) -> str:
    """ai-toolkit's postfix: ``lr: 1.0e-04 loss: 4.211e-01``."""
    return f"lr: {lr:.1e} loss: {loss:.3e}"
