"""Helpers shared by the fault tests (``tests/test_faults_*.py``) and the tally they feed.

The tally (``bench/fault_tally.py``) runs the fault tests with ``FLUX_REMOTE_FAULT_TALLY`` set to
a file and adds up one JSON line per test: its outcome (passed, failed, skipped, error) and what
was **observed** after the fault, not what the test believes:

* orphans: instances of the test's FakeVast (``fake_vast`` fixture) that carry a flux-remote
  label (or none) and are not stopped, read from the fake when the test body ends, pass or fail
  (:func:`pytest_runtest_makereport`, loaded as a plugin by ``tests/conftest.py``); bystanders
  a test made on purpose are named with ``exclude=``;
* artifacts lost: each bundle handed to :func:`record` (``bundles=``) whose ``SHA256SUMS`` do not
  verify on disk, plus one when ``kept=False`` (the machine holding the only copy was not kept);
* budget overruns: the receipt's ``metered_usd`` over ``budget`` (``receipt=``, ``budget=``).

A count typed into the call (``orphans=``, ``lost=``, ``overruns=``) is used only where nothing
was observed, and the line says it was declared. A test that fails or is skipped before it calls
:func:`record` is still written, with its outcome. ``category`` sorts the lines into the tally's
tables ("fault", "hostile"); a test module may set ``FAULT_CATEGORY`` for tests that never reach
their ``record``. Without the variable nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

TALLY_ENV = "FLUX_REMOTE_FAULT_TALLY"
FLUX_LABEL = "flux-remote:"
_PENDING: dict[str, dict[str, Any]] = {}  # nodeid -> what the running test recorded


def _current_test() -> str | None:
    """The running test's node id (pytest sets PYTEST_CURRENT_TEST as "<nodeid> (call)")."""
    current = os.environ.get("PYTEST_CURRENT_TEST")
    return current.rsplit(" ", 1)[0] if current else None


def _ours(fake: Any, exclude: Iterable[int] = ()) -> list[dict[str, Any]]:
    """Instances a flux-remote run made (its label, or none at all: a create that lost it),
    less the bystanders a test made on purpose (``exclude``)."""
    skip = set(exclude)
    return [inst for iid, inst in fake.instances.items() if iid not in skip
            and (not inst.get("label") or str(inst["label"]).startswith(FLUX_LABEL))]


def orphans_in(fake: Any, exclude: Iterable[int] = ()) -> int:
    """Our instances of a FakeVast that still exist and are not stopped (compute bills)."""
    return sum(1 for inst in _ours(fake, exclude)
               if inst.get("intended_status") != "stopped"
               and inst.get("actual_status") != "stopped")


def kept_in(fake: Any, exclude: Iterable[int] = ()) -> int:
    """Our instances kept stopped (storage bills, data kept for ``flux-remote fetch``)."""
    return len(_ours(fake, exclude)) - orphans_in(fake, exclude)


def bundle_verifies(folder: Path) -> bool:
    """True when ``folder/SHA256SUMS`` lists at least one file and every listed file matches."""
    sums = Path(folder) / "SHA256SUMS"
    if not sums.is_file():
        return False
    lines = [line.split(None, 1) for line in sums.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    for digest, name in lines:
        path = Path(folder) / name.strip().lstrip("*")
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return False
    return bool(lines)


def observe(*, fake: Any = None, exclude: Iterable[int] = (), bundles: Iterable[Path] = (),
            kept: bool | None = None, receipt: dict[str, Any] | Path | None = None,
            budget: float | None = None) -> dict[str, int]:
    """The counts that can be read off what the fault left behind."""
    seen: dict[str, int] = {}
    if fake is not None:
        seen["orphans"] = orphans_in(fake, exclude)
    bundles = list(bundles)
    if bundles or kept is not None:
        seen["lost"] = sum(not bundle_verifies(Path(b)) for b in bundles) + int(kept is False)
    if isinstance(receipt, Path):
        receipt = json.loads(receipt.read_text()) if receipt.is_file() else None
    if receipt is not None and budget is not None:
        data = receipt
        seen["overruns"] = int(float(data.get("metered_usd") or 0.0) > float(budget) + 1e-9)
    return seen


def record(name: str, *, faults: int = 1, orphans: int | None = None, lost: int | None = None,
           overruns: int | None = None, category: str = "fault", fake: Any = None,
           exclude: Iterable[int] = (), bundles: Iterable[Path] = (), kept: bool | None = None,
           receipt: dict[str, Any] | Path | None = None, budget: float | None = None,
           measured: dict[str, Any] | None = None) -> None:
    """Count one fault test's result: ``faults`` injected, the rest observed (see the module).

    ``measured`` carries what a test measured beyond the three counts (the hostile-instance
    tests: files leaked outside the out dir, tracebacks, escapes shown, spend against the cap).

    Under pytest the observation is made when the test body ends (pass or fail), so a test may
    call this before its assertions and still be counted when one of them fails. The old call
    shape (``record(name, faults=, orphans=, lost=, overruns=)``) still works; those numbers are
    marked as declared unless an observation replaces them.
    """
    entry: dict[str, Any] = {"test": name, "category": category, "faults": faults,
                             "declared": {k: int(v) for k, v in (("orphans", orphans),
                                          ("lost", lost), ("overruns", overruns))
                                          if v is not None}}
    if measured:
        entry["measured"] = measured
    watch = {"fake": fake, "exclude": list(exclude), "bundles": list(bundles), "kept": kept,
             "receipt": receipt, "budget": budget}
    nodeid = _current_test()
    if nodeid is not None:
        _PENDING[nodeid] = {"entry": entry, "watch": watch}
    else:
        _write(_settle(entry, watch))


def _settle(entry: dict[str, Any], watch: dict[str, Any]) -> dict[str, Any]:
    """The entry with every count observed where possible, else declared, else 0."""
    seen = observe(**watch)
    declared = entry.pop("declared", {})
    entry["observed"], entry["declared"] = sorted(seen), []
    for key in ("orphans", "lost", "overruns"):
        if key in seen:
            entry[key] = seen[key]
        else:
            entry[key] = declared.get(key, 0)
            if key in declared:
                entry["declared"].append(key)
    if watch.get("fake") is not None:
        entry["kept"] = kept_in(watch["fake"], watch.get("exclude", ()))
    return entry


def _write(entry: dict[str, Any]) -> None:
    path = os.environ.get(TALLY_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Write each test's line with its outcome, observing its FakeVast before fixtures end."""
    outcome = yield
    report = outcome.get_result()
    if not os.environ.get(TALLY_ENV):
        _PENDING.pop(item.nodeid, None)
        return
    if report.when == "setup" and report.passed:
        return
    if report.when == "teardown" and not report.failed:
        return
    pending = _PENDING.pop(item.nodeid, None)
    fake = getattr(item, "funcargs", {}).get("fake_vast")
    if pending is None:
        category = getattr(getattr(item, "module", None), "FAULT_CATEGORY", "fault")
        pending = {"entry": {"test": item.nodeid, "category": category, "faults": 0,
                             "recorded": False},
                   "watch": {"fake": fake if report.when == "call" else None}}
    elif pending["watch"]["fake"] is None and report.when == "call":
        pending["watch"]["fake"] = fake  # the test's FakeVast, observed even if not handed over
    entry = _settle(pending["entry"], pending["watch"])
    entry["nodeid"] = item.nodeid
    entry["outcome"] = report.outcome if report.when == "call" else (
        "skipped" if report.skipped else "error")
    _write(entry)


def live_instances(fake: Any) -> list[int]:
    """FakeVast instances that still exist and are not stopped (would bill for compute).

    Stopped through the API means intended_status "stopped"; Vast then reports actual_status
    "exited", never "stopped" (tests/fakevast.py)."""
    return [iid for iid, inst in fake.instances.items()
            if inst.get("intended_status") != "stopped"]


def use_sshd_key(sshd: Any) -> None:
    """Make the sshd fixture's client key the controller's own key (``<state>/ssh``)."""
    home = Path(os.environ["FLUX_REMOTE_HOME"])
    (home / "ssh").mkdir(mode=0o700, exist_ok=True)
    shutil.copy(sshd.key_path, home / "ssh" / "id_ed25519")
    shutil.copy(f"{sshd.key_path}.pub", home / "ssh" / "id_ed25519.pub")
    os.chmod(home / "ssh" / "id_ed25519", 0o600)


def controller(*args: str, env: dict[str, str] | None = None,
               timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a separate process (so that it can be SIGKILLed for real)."""
    return subprocess.run([sys.executable, "-m", "controller", *map(str, args)],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_for(predicate: Any, *, timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until true (real time: these wait on real processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class FakeClock:
    """A monotonic clock that only moves when something sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    @property
    def slept(self) -> float:
        return sum(self.sleeps)
