"""The fault tally counts what it observes and reports failed, skipped and non-zero outcomes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from tests.faults import bundle_verifies, kept_in, observe, orphans_in

ROOT = Path(__file__).resolve().parents[1]


def _tally_module():
    spec = importlib.util.spec_from_file_location("fault_tally", ROOT / "bench" / "fault_tally.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bundle(folder: Path, content: bytes = b"lora") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x.safetensors").write_bytes(content)
    (folder / "SHA256SUMS").write_text(f"{hashlib.sha256(content).hexdigest()}  x.safetensors\n")
    return folder


def test_observations_come_from_the_fake_the_disk_and_the_receipt(tmp_path: Path) -> None:
    fake = SimpleNamespace(instances={
        1: {"label": "flux-remote:a", "actual_status": "running", "intended_status": "running"},
        2: {"label": "flux-remote:b", "actual_status": "stopped", "intended_status": "stopped"},
        3: {"label": "flux-remote:c", "actual_status": "exited", "intended_status": "stopped"},
        4: {"label": "someone-else", "actual_status": "running", "intended_status": "running"},
        5: {"label": None, "actual_status": "running", "intended_status": "running"},
    })
    assert orphans_in(fake) == 2 and kept_in(fake) == 2  # an unlabelled one is ours too
    assert orphans_in(fake, exclude=[5]) == 1
    good = _bundle(tmp_path / "good")
    bad = _bundle(tmp_path / "bad")
    (bad / "x.safetensors").write_bytes(b"tampered")
    assert bundle_verifies(good) and not bundle_verifies(bad)
    assert not bundle_verifies(tmp_path / "missing")
    seen = observe(fake=fake, bundles=[good, bad], kept=False,
                   receipt={"metered_usd": 5.01}, budget=5.0)
    assert seen == {"orphans": 2, "lost": 2, "overruns": 1}
    assert observe(receipt=tmp_path / "no-receipt.json", budget=1.0) == {}


def test_a_failed_or_skipped_fault_test_is_recorded_and_the_tally_says_so(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.faults"]\n')
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        import pytest
        from types import SimpleNamespace
        from tests.faults import record

        def test_clean():
            record("x:clean", faults=2)

        def test_fails_before_recording():
            assert False

        def test_fails_after_recording_with_an_orphan():
            fake = SimpleNamespace(instances={1: {"label": "flux-remote:r",
                                                  "intended_status": "running"}})
            record("x:orphan", fake=fake, orphans=0)
            assert False

        def test_skipped():
            pytest.skip("no tmpfs here")

        def test_hostile():
            record("x:hostile", category="hostile", faults=3)
    """))
    sink = tmp_path / "tally.jsonl"
    env = {**os.environ, "FLUX_REMOTE_FAULT_TALLY": str(sink), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_x.py")],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in sink.read_text().splitlines()]
    by = {line["nodeid"].rsplit("::", 1)[1]: line for line in lines}
    assert by["test_clean"]["outcome"] == "passed" and by["test_clean"]["faults"] == 2
    assert by["test_fails_before_recording"]["outcome"] == "failed"
    orphan = by["test_fails_after_recording_with_an_orphan"]
    assert orphan["outcome"] == "failed" and orphan["orphans"] == 1  # observed, not the typed 0
    assert by["test_skipped"]["outcome"] == "skipped"
    assert by["test_hostile"]["category"] == "hostile"

    tally = _tally_module()
    totals = tally.tally(lines)
    assert totals["fault"]["tests"] == 4 and totals["fault"]["orphans"] == 1
    assert totals["fault"]["outcomes"]["skipped"] == 1
    assert totals["hostile"]["tests"] == 1 and totals["hostile"]["faults"] == 3
    text = tally.render(totals, proc.returncode)
    assert "NOT ALL PASSED" in text and "all fault tests ran and passed" not in text
    assert "**hostile instance**" in text and "x:orphan: failed, orphans 1" in text


def test_all_passed_needs_every_test_run_and_passed() -> None:
    tally = _tally_module()
    ok = [{"test": "a", "nodeid": "t::a", "faults": 1, "outcome": "passed"}]
    assert "all fault tests ran and passed" in tally.render(tally.tally(ok), 0)
    skipped = ok + [{"test": "b", "nodeid": "t::b", "faults": 1, "outcome": "skipped"}]
    assert not tally.all_passed(tally.tally(skipped), 0)
    assert not tally.all_passed(tally.tally(ok), 1)  # pytest itself failed
    assert not tally.all_passed({}, 0)  # nothing reported is not a pass
    # a teardown error after a passing body makes that test an error
    torn = ok + [{"test": "t::a", "nodeid": "t::a", "outcome": "error", "recorded": False}]
    assert tally.tally(torn)["fault"]["outcomes"]["error"] == 1
    assert "tests/test_faults_vast.py" in tally.fault_tests()
