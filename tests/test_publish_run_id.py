"""``flux-remote publish RUN``: a run id (or unique prefix) from the journal instead of a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.journal import open_journal
from tests.fakehub import FakeHub
from tests.test_hf_publish import TOKEN, _cli, write_bundle


def _run(run_id: str, out_dir: Path, *, bundle_path: Path | None = None,
         hf_repo: str | None = None) -> None:
    # The repo comes from the spec the user launched (the journal's copy), never from the
    # bundle's run.yaml, which the instance wrote.
    journal = open_journal()
    spec = {"publish": {"hf_repo": hf_repo}} if hf_repo else {}
    journal.create_run(run_id=run_id, name="demo", provider="local", state="succeeded", spec=spec,
                       out_dir=str(out_dir), budget_usd=1.0)
    if bundle_path is not None:
        journal.update_run(run_id, bundle_path=str(bundle_path))
    journal.close()


def test_publish_by_run_prefix_uses_the_recorded_bundle(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)  # no folder named like the run id here
    bundle = write_bundle(tmp_path / "runs" / "demo" / "publish")
    _run("demo-20261129-184000-3fa2", tmp_path / "runs" / "demo", bundle_path=bundle,
         hf_repo="alice/demo-lora")

    result = CliRunner().invoke(_cli(), ["publish", "demo-2026", "--json"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["bundle"] == str(bundle) and data["repo"] == "alice/demo-lora"
    assert fake_hub.repos["alice/demo-lora"].private is True
    journal = open_journal()
    [event] = journal.events("demo-20261129-184000-3fa2", kind="published")
    assert event["detail"]["url"] == data["url"]


def test_publish_by_run_id_falls_back_to_the_out_dir(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    write_bundle(tmp_path / "out" / "publish")
    _run("demo-20261129-190000-aaaa", tmp_path / "out")

    result = CliRunner().invoke(_cli(), ["publish", "demo-20261129-190000-aaaa", "--repo",
                                         "alice/other", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bundle"] == str(tmp_path / "out" / "publish")
    assert "alice/other" in fake_hub.repos


def test_publish_run_errors_name_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _run("demo-20261129-184000-3fa2", tmp_path / "a")
    _run("demo-20261129-185000-4bb3", tmp_path / "b")

    unknown = CliRunner().invoke(_cli(), ["publish", "nope", "--json"])
    assert unknown.exit_code == 2 and "no run with that id" in json.loads(unknown.stdout)["message"]

    ambiguous = CliRunner().invoke(_cli(), ["publish", "demo-2026", "--json"])
    assert ambiguous.exit_code == 2 and "matches 2 runs" in json.loads(ambiguous.stdout)["message"]

    unfetched = CliRunner().invoke(_cli(), ["publish", "demo-20261129-184000", "--json"])
    message = json.loads(unfetched.stdout)["message"]
    assert unfetched.exit_code == 2 and "no fetched bundle" in message
    assert "flux-remote fetch demo-20261129-184000-3fa2" in CliRunner().invoke(
        _cli(), ["publish", "demo-20261129-184000"]).stderr
