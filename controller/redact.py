"""Replace known secret values in text before it is logged, raised or written anywhere."""

from __future__ import annotations

from typing import Iterable

MASK = "***"
# Shorter values are too likely to occur by chance in ordinary text ("1", "true"): masking
# them would garble messages without protecting anything.
MIN_SECRET_LEN = 6


def redact(text: str, secrets: Iterable[str]) -> str:
    """Return ``text`` with every occurrence of each secret value replaced by ``***``.

    Longer secrets are replaced first so that a secret containing another is masked whole.
    Empty, ``None`` and very short values are ignored.
    """
    values = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
    for value in values:
        text = text.replace(value, MASK)
    return text
