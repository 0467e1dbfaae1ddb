"""``publish.hf_repo`` set: after the verified fetch, launch uploads the bundle to the Hub."""

from __future__ import annotations

from pathlib import Path

from tests.fakehub import FAKE_TOKEN
from tests.test_launch_local import invoke, write_spec


def test_launch_publishes_the_verified_bundle(tmp_path: Path, fake_hub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    spec = write_spec(tmp_path, publish={"hf_repo": "alice/t1-lora"})
    out = tmp_path / "bundle"
    result = invoke("launch", spec, "--yes", "--out", out, "--poll-interval", "0.1")
    assert result.exit_code == 0, result.output
    assert f"published: {fake_hub.url}/alice/t1-lora" in result.output
    repo = fake_hub.repos["alice/t1-lora"]
    assert repo.private is True
    assert fake_hub.commits[0].paths == ["README.md"]  # the card first, so the repo renders
    assert "t1.safetensors" in repo.files
    assert repo.files["t1.safetensors"] == (out / "t1.safetensors").read_bytes()
    assert FAKE_TOKEN not in result.output


def test_a_failed_publish_keeps_the_run_done(tmp_path: Path, fake_hub) -> None:
    spec = write_spec(tmp_path, publish={"hf_repo": "alice/t1-lora"})  # no HF_TOKEN set
    out = tmp_path / "bundle"
    result = invoke("launch", spec, "--yes", "--out", out, "--poll-interval", "0.1")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    assert "publishing failed" in text and "HF_TOKEN" in text
    assert "retry: flux-remote publish" in text
    assert (out / "t1.safetensors").exists() and not fake_hub.repos
