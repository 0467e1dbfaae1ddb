"""The secrets env file and log redaction.

The controller writes secrets (``HF_TOKEN``, ``WANDB_API_KEY``) over SSH stdin into a 0600 env file
outside the run dir and names it in ``plan["secrets_file"]``. The agent reads it once, hands the
values to the trainer through its environment (never its arguments), and redacts every known
secret value from anything it logs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable, Mapping

REDACTED = "***"
# Values shorter than this are not redacted: replacing "1" or "on" everywhere would garble logs.
MIN_SECRET_LEN = 6
# Environment variables whose values are secrets even when they did not come from the file.
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "CONTAINER_API_KEY")


def parse_env_file(text: str) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (``export`` prefix, quotes and ``#`` comments allowed)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key:
            values[key] = value
    return values


def load_secrets(path: str | os.PathLike[str] | None) -> tuple[dict[str, str], list[str]]:
    """Read the secrets file; returns (values, warnings). A missing path or file gives no values."""
    if not path:
        return {}, []
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        mode = stat.S_IMODE(file.stat().st_mode)
    except FileNotFoundError:
        return {}, [f"secrets file {file} does not exist; continuing without secrets"]
    except OSError as exc:
        return {}, [f"cannot read secrets file {file}: {exc}"]
    warnings = []
    if mode & 0o077:
        warnings.append(f"secrets file {file} has mode {mode:o}; it should be 600")
    return parse_env_file(text), warnings


class Redactor:
    """Replaces every known secret value in a string with ``***``."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: list[str] = []
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        known = set(self._values)
        known.update(v for v in values if v and len(v) >= MIN_SECRET_LEN)
        # Longest first, so a secret that contains another is replaced whole.
        self._values = sorted(known, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


def redactor_for(secrets: Mapping[str, str], env: Mapping[str, str]) -> Redactor:
    """A redactor for the secrets file's values plus known secret variables in ``env``."""
    values = list(secrets.values())
    values.extend(env[name] for name in SECRET_ENV_VARS if env.get(name))
    return Redactor(values)
