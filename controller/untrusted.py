"""What comes back from an instance is data from a stranger: check it before use.

A rented machine's files, status fields and log lines may be forged. This module is the one place
that turns them into values the controller can use, below the UI (no rich here):

- :func:`clean_text` makes text safe for a terminal: terminal control sequences (ESC/CSI/OSC,
  e.g. OSC 52 that writes the clipboard, clear-screen) and other control characters (BEL, C1)
  are removed. Rich markup needs no escaping here: the UI shows instance text as ``Text``, which
  prints ``[bold]`` literally.
- :func:`decode` reads bytes as UTF-8 or raises :class:`UntrustedInput` naming the file.
- :func:`number` / :func:`integer` accept a JSON number (or a numeric string) and nothing else.
- :func:`bundle_name` and :func:`inside_run_dir` check paths the instance names.

``UntrustedInput`` is a ``RunError``: the follow loop ends such a run in its release path (fetch
what verifies, then destroy or stop), never with a traceback.
"""

from __future__ import annotations

import math
import posixpath
import re
from typing import Any

from controller.errors import RunError

# ECMA-48: CSI (ESC [ ... final), OSC/DCS/SOS/PM/APC strings (ended by BEL or ESC \), two-byte
# escapes (ESC + one char); then the C1 controls (0x80-0x9f, 8-bit CSI among them) and every C0
# control but tab and newline (BEL, backspace, carriage return, form feed ...), and DEL.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[ -~]?"
    r"|[\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x9c|\x1b\\)?"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
MAX_FIELD_CHARS = 2000  # a status field longer than this is cut (a forged megabyte line)


class UntrustedInput(RunError):
    """A file or value from the instance is malformed or dangerous (bad number, not UTF-8, a path
    that leaves its folder). The message names the file and field."""


def clean_text(text: Any, *, limit: int | None = None, keep_newlines: bool = True) -> str:
    """``text`` as a string safe to show on a terminal; cut to ``limit`` characters if given."""
    value = text if isinstance(text, str) else str(text)
    value = _CONTROLS.sub("", _ESCAPES.sub("", value))
    if not keep_newlines:
        value = value.replace("\n", " ").replace("\t", " ")
    if limit is not None and len(value) > limit:
        value = value[:limit] + "…"
    return value


def decode(data: bytes, *, where: str) -> str:
    """UTF-8 text of a file from the instance, else UntrustedInput naming ``where``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedInput(f"{where} from the instance is not UTF-8 text "
                             f"(byte {exc.start}: {data[exc.start:exc.start + 1]!r})") from exc


def number(value: Any, *, field: str, where: str) -> float | None:
    """A finite number from a status field (None stays None); anything else is UntrustedInput."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UntrustedInput(f"{where}: field {field!r} is not a number: {clean_text(value)!r}")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            result = math.nan
        if math.isnan(result):
            raise UntrustedInput(f"{where}: field {field!r} is not a number: "
                                 f"{clean_text(value, limit=80)!r}") from None
    else:
        raise UntrustedInput(f"{where}: field {field!r} is not a number: "
                             f"{clean_text(value, limit=80)!r}")
    if not math.isfinite(result):
        raise UntrustedInput(f"{where}: field {field!r} is not a finite number: {result!r}")
    return result


def integer(value: Any, *, field: str, where: str) -> int | None:
    """A whole number from a status field (None stays None); anything else is UntrustedInput."""
    result = number(value, field=field, where=where)
    if result is None:
        return None
    if result != int(result):
        raise UntrustedInput(f"{where}: field {field!r} is not a whole number: {result!r}")
    return int(result)


def text_field(value: Any, *, limit: int = MAX_FIELD_CHARS) -> str | None:
    """A status text field made safe to show (None stays None)."""
    return None if value is None else clean_text(value, limit=limit)


def bundle_name(name: str, *, where: str) -> str:
    """A relative POSIX path that stays inside its folder: no ``/`` at the start, no ``..``, no
    empty or ``.`` parts, no backslash or control characters. Returns it; else UntrustedInput."""
    parts = name.split("/")
    bad = (not name or name.startswith("/") or "\\" in name or _CONTROLS.search(name)
           or any(part in ("", ".", "..") for part in parts))
    if bad:
        raise UntrustedInput(f"{where} names a path outside its folder: {clean_text(name)!r}")
    return name


def inside_run_dir(path: Any, run_dir: str, *, field: str, where: str) -> str:
    """A path the agent reports (``last_checkpoint``), checked to lie inside ``run_dir`` on the
    instance: absolute or relative to it, no ``..``; returns the absolute path."""
    if not isinstance(path, str) or not path.strip():
        raise UntrustedInput(f"{where}: field {field!r} is not a path: {clean_text(path)!r}")
    full = path if path.startswith("/") else f"{run_dir.rstrip('/')}/{path}"
    root = posixpath.normpath(run_dir)
    if ".." in full.split("/") or _CONTROLS.search(full) or "\\" in full \
            or not posixpath.normpath(full).startswith(root + "/"):
        raise UntrustedInput(f"{where}: field {field!r} points outside the run dir {run_dir}: "
                             f"{clean_text(path)!r}")
    return posixpath.normpath(full)
