"""Fixtures every test gets: an isolated state dir, no real credentials, no network by accident."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures_sshd", "tests.fixtures_vast", "tests.fixtures_data", "tests.fakehub",
                  "tests.faults"]


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point the state dir at a temp folder and hide the user's real keys and endpoints."""
    home = tmp_path_factory.mktemp("flux-remote-home")
    monkeypatch.setenv("FLUX_REMOTE_HOME", str(home))
    for var in ("VAST_API_KEY", "HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VAST_URL", "http://127.0.0.1:9")  # nothing listens: a stray call fails fast
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(autouse=True, scope="session")
def _no_lingering_watchdogs(tmp_path_factory: pytest.TempPathFactory):
    """End the watchers the agents hand over to (``python -m remote.watchdog``) once the session
    is over. On Vast, destroying an instance ends every process in its container; the test
    "instances" share this machine, so the session ends them itself, by PID."""
    yield
    import os
    import signal

    base = str(tmp_path_factory.getbasetemp())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if b"remote.watchdog" in argv and any(arg.decode(errors="replace").startswith(base)
                                              for arg in argv):
            try:
                os.kill(int(entry), signal.SIGTERM)
            except OSError:
                pass
