"""Is this machine's rsync safe to pull files from a stranger's machine?

In January 2025 six rsync vulnerabilities were published together (CVE-2024-12084 to 12088 and
CVE-2024-12747), some on the client side: a malicious server can write outside the destination
or read files of the client (CVE-2024-12086, 12087, 12088). Upstream fixed them in rsync 3.4.0
(2025-01-14; 3.4.1 followed for regressions). A later batch (May 2026, e.g. CVE-2026-43620: a
malicious sender crashes a pulling client) is fixed in 3.4.3.

Distributions backport such fixes without raising the upstream version, so a low version alone
proves nothing: where the package's changelog
is readable (``/usr/share/doc/rsync/changelog.Debian.gz``) it is asked whether the CVEs were
fixed; otherwise a low version is a warning with the version and what to upgrade. Only a build
known to be unfixed, one whose own changelog is there and names none of them, is refused.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

JANUARY_2025_FIXED = (3, 4, 0)  # upstream NEWS for 3.4.0: the six CVEs above
MAY_2026_FIXED = (3, 4, 3)
JANUARY_2025_CVES = ("CVE-2024-12084", "CVE-2024-12085", "CVE-2024-12086", "CVE-2024-12087",
                     "CVE-2024-12088", "CVE-2024-12747")
DEBIAN_CHANGELOG = Path("/usr/share/doc/rsync/changelog.Debian.gz")
_VERSION = re.compile(r"rsync\s+version\s+v?(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class RsyncVerdict:
    """``ok``: nothing to say; ``refuse``: a build known to be unfixed; else ``message`` warns."""

    version: str
    ok: bool
    refuse: bool = False
    message: str = ""


def version_text(rsync: str = "rsync") -> str:
    """``rsync --version``'s output ('' when it cannot be run)."""
    try:
        return subprocess.run([rsync, "--version"], capture_output=True, text=True, timeout=10,
                              check=False, errors="replace").stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def changelog_text(path: Path = DEBIAN_CHANGELOG) -> str | None:
    """The distribution's changelog of its rsync package, or None when there is none here."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def check_rsync(*, version: Callable[[], str] = version_text,
                changelog: Callable[[], str | None] = changelog_text,
                binary: Callable[[], str | None] = lambda: shutil.which("rsync")) -> RsyncVerdict:
    """The verdict on the local rsync (see the module docstring)."""
    text = version()
    found = _VERSION.search(text)
    if not found:
        first = text.strip().splitlines()[0] if text.strip() else "no output"
        return RsyncVerdict("unknown", ok=False, message=(
            f"cannot tell which rsync this is ({first}); it must be 3.4.0 or newer, or carry "
            "the fixes for the January 2025 CVEs"))
    numbers = tuple(int(part) for part in found.groups())
    shown = ".".join(found.groups())
    if numbers >= MAY_2026_FIXED:
        return RsyncVerdict(shown, ok=True)
    if numbers >= JANUARY_2025_FIXED:
        return RsyncVerdict(shown, ok=True, message=(
            f"rsync {shown}: upgrade to 3.4.3 or newer for the May 2026 fixes (a malicious "
            "sender can crash a pulling rsync, CVE-2026-43620)"))
    log = changelog() if binary() in ("/usr/bin/rsync", "/bin/rsync") else None
    if log is not None:
        if any(cve in log for cve in JANUARY_2025_CVES):
            return RsyncVerdict(shown, ok=True)  # the distribution backported the fixes
        return RsyncVerdict(shown, ok=False, refuse=True, message=(
            f"rsync {shown} lacks the fixes for the January 2025 CVEs "
            f"({', '.join(JANUARY_2025_CVES)}; its package changelog names none of them): an "
            "instance could write or read files on this machine. Upgrade rsync (3.4.0 or newer, "
            "or your distribution's security update)"))
    return RsyncVerdict(shown, ok=False, message=(
        f"rsync {shown} is older than 3.4.0, which fixed the January 2025 CVEs (an instance "
        "could write or read files on this machine); unless your distribution backported the "
        "fixes, upgrade rsync to 3.4.1 or newer"))
