"""Publishing a fetched bundle to a fake Hugging Face Hub on 127.0.0.1 (no network)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from controller.cli import export_cmds
from controller.errors import CredentialsError, ProviderError, RunError
from controller.hf_publish import publish_bundle, publish_target, read_sums, verify_bundle
from tests.fakehub import FAKE_TOKEN, FakeHub

TOKEN = FAKE_TOKEN
CARD = "---\nlicense: other\nbase_model: black-forest-labs/FLUX.1-dev\ntags: [flux, lora]\n---\n# demo\n"


def write_bundle(folder: Path, *, name: str = "demo", hf_repo: str | None = "alice/demo-lora") -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "samples").mkdir()
    save_file({"lora_A": np.ones((4, 8), dtype=np.float32)}, str(folder / f"{name}.safetensors"))
    (folder / "samples" / "step_000010_0.png").write_bytes(b"\x89PNG fake sample")
    (folder / "README.md").write_text(CARD)
    (folder / "config.yaml").write_text("job: extension\n")
    publish = f"publish:\n  hf_repo: {hf_repo}\n" if hf_repo else ""
    (folder / "run.yaml").write_text(f"name: {name}\n{publish}")
    (folder / "quality_report.json").write_text('{"passed": true}\n')
    (folder / "receipt.json").write_text(json.dumps({"gpu": "RTX 4090", "usd": 0.42}))
    (folder / "report.html").write_text("<html></html>\n")
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}\n")
    (folder / "SHA256SUMS").write_text("".join(lines))
    return folder


def test_publish_uploads_card_first_then_the_bundle(fake_hub: FakeHub, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    url = publish_bundle(bundle, "alice/demo-lora", token=TOKEN)

    assert url == f"{fake_hub.url}/alice/demo-lora"
    repo = fake_hub.repos["alice/demo-lora"]
    assert repo.private is True
    assert [c.paths for c in fake_hub.commits][0] == ["README.md"]
    second = fake_hub.commits[1].paths
    assert "demo.safetensors" in second and "samples/step_000010_0.png" in second
    assert second[-1] == "SHA256SUMS"
    assert "README.md" not in second
    for rel in ("README.md", "demo.safetensors", "config.yaml", "run.yaml", "quality_report.json",
                "receipt.json", "report.html", "SHA256SUMS", "samples/step_000010_0.png"):
        assert repo.files[rel] == (bundle / rel).read_bytes(), rel
    assert json.loads(repo.files["receipt.json"])["hf_repo_url"] == url
    verify_bundle(bundle)  # SHA256SUMS was kept true to the updated receipt
    create = [r for r in fake_hub.requests if r.path == "/api/repos/create"][0]
    body = json.loads(create.body)
    assert body.get("visibility") == "private" or body.get("private") is True


def test_rerun_is_idempotent(fake_hub: FakeHub, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    first = publish_bundle(bundle, "alice/demo-lora", token=TOKEN)
    commits = len(fake_hub.commits)
    second = publish_bundle(bundle, "alice/demo-lora", token=TOKEN)

    assert second == first
    assert fake_hub.repo_creates == 1 and list(fake_hub.repos) == ["alice/demo-lora"]
    assert len(fake_hub.commits) == commits == 2  # identical files: nothing committed again


def test_public_when_asked(fake_hub: FakeHub, tmp_path: Path) -> None:
    publish_bundle(write_bundle(tmp_path / "bundle"), "alice/demo-lora", token=TOKEN, private=False)
    assert fake_hub.repos["alice/demo-lora"].private is False


def test_token_from_environment(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    publish_bundle(write_bundle(tmp_path / "bundle"), "alice/demo-lora")
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.requests)


def test_missing_token_names_hf_token(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="HF_TOKEN"):
        publish_bundle(write_bundle(tmp_path / "bundle"), "alice/demo-lora")
    assert fake_hub.requests == []


def test_rejected_token_is_credentials_error_without_the_token(fake_hub: FakeHub, tmp_path: Path) -> None:
    wrong = "hf_wrong_secret_value_987"
    with pytest.raises(CredentialsError) as info:
        publish_bundle(write_bundle(tmp_path / "bundle"), "alice/demo-lora", token=wrong)
    assert "401" in str(info.value)
    assert wrong not in str(info.value) and wrong not in repr(info.value.args)


def test_foreign_namespace_is_credentials_error(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="403"):
        publish_bundle(write_bundle(tmp_path / "bundle"), "someone-else/demo-lora", token=TOKEN)


def test_hub_failure_is_provider_error(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.fail_next("POST", "/api/models/alice/demo-lora/commit", 500, {"error": f"boom {TOKEN}"})
    with pytest.raises(ProviderError) as info:
        publish_bundle(write_bundle(tmp_path / "bundle"), "alice/demo-lora", token=TOKEN)
    assert "500" in str(info.value) and TOKEN not in str(info.value)


def test_tampered_bundle_is_refused_before_any_request(fake_hub: FakeHub, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    (bundle / "demo.safetensors").write_bytes(b"truncated")
    with pytest.raises(RunError, match="demo.safetensors"):
        publish_bundle(bundle, "alice/demo-lora", token=TOKEN)
    assert fake_hub.requests == []


def test_bundle_without_card_is_refused(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    (bundle / "README.md").unlink()
    sums = "".join(line for line in (bundle / "SHA256SUMS").read_text().splitlines(True)
                   if not line.endswith("  README.md\n"))
    (bundle / "SHA256SUMS").write_text(sums)
    with pytest.raises(RunError, match="model card"):
        verify_bundle(bundle)


def test_sums_paths_must_stay_inside_the_bundle(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    (bundle / "SHA256SUMS").write_text(f"{'0' * 64}  ../escape.txt\n")
    with pytest.raises(RunError, match="entry 1 names a path outside the bundle"):
        read_sums(bundle)


def journal_run(run_dir: Path, *, hf_repo: str | None = "alice/demo-lora",
                private: bool = True) -> str:
    """A run in the journal whose launched spec names ``hf_repo``; its out dir is ``run_dir``."""
    from controller.journal import open_journal

    publish = {"hf_repo": hf_repo, "hf_private": private} if hf_repo else {}
    open_journal().create_run(run_id="demo-1", name="demo", provider="local", state="done",
                              spec={"name": "demo", "publish": publish}, out_dir=str(run_dir),
                              budget_usd=1.0)
    return "demo-1"


def test_publish_target_comes_from_the_journal_not_the_bundle(tmp_path: Path) -> None:
    write_bundle(tmp_path / "bundle", hf_repo="mallory/stolen")  # the instance's run.yaml
    spec = {"publish": {"hf_repo": "alice/demo-lora", "hf_private": True}}
    assert publish_target({"spec_json": json.dumps(spec)}) == {"hf_repo": "alice/demo-lora",
                                                               "hf_private": True}
    assert publish_target(None) == {}
    assert publish_target({"spec_json": "{}"}) == {}


def test_an_unlisted_or_linked_card_is_never_uploaded(fake_hub: FakeHub, tmp_path: Path) -> None:
    secret = tmp_path / "environ"
    secret.write_text("VAST_API_KEY=laptop-secret\n")
    bundle = write_bundle(tmp_path / "bundle")
    sums = [line for line in (bundle / "SHA256SUMS").read_text().splitlines(True)
            if not line.endswith("  README.md\n")]
    (bundle / "SHA256SUMS").write_text("".join(sums))
    (bundle / "README.md").unlink()
    (bundle / "README.md").symlink_to(secret)
    with pytest.raises(RunError, match="not listed"):
        publish_bundle(bundle, "alice/demo-lora", token=TOKEN)
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    (bundle / "SHA256SUMS").write_text("".join(sums) + f"{digest}  README.md\n")
    with pytest.raises(RunError, match="README.md: missing, or not a regular file"):
        publish_bundle(bundle, "alice/demo-lora", token=TOKEN)
    assert fake_hub.requests == [] and not fake_hub.commits


def _cli() -> typer.Typer:
    app = typer.Typer()
    export_cmds.register(app)
    return app


def test_cli_publish_uses_the_launched_specs_repo(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run_dir = tmp_path / "runs" / "demo"
    write_bundle(run_dir / "publish", hf_repo="mallory/public-dump")  # what the instance wrote
    journal_run(run_dir)
    for ref in (str(run_dir), "demo-1"):
        result = CliRunner().invoke(_cli(), ["publish", ref, "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["ok"] and data["repo"] == "alice/demo-lora" and data["private"] is True
        assert data["url"] == f"{fake_hub.url}/alice/demo-lora"
        assert TOKEN not in result.output
    assert set(fake_hub.repos) == {"alice/demo-lora"}


def test_cli_publish_ignores_the_bundles_run_yaml(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    bundle = write_bundle(tmp_path / "bundle", hf_repo="mallory/public-dump")  # no journal run
    result = CliRunner().invoke(_cli(), ["publish", str(bundle), "--json"])
    assert result.exit_code == 2 and "--repo" in json.loads(result.stdout)["message"]
    assert fake_hub.repos == {}


def test_cli_publish_repo_and_public_flags(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    bundle = write_bundle(tmp_path / "bundle", hf_repo=None)
    result = CliRunner().invoke(_cli(), ["publish", str(bundle), "--repo", "alice/other", "--public"])

    assert result.exit_code == 0, result.output
    assert fake_hub.repos["alice/other"].private is False
    assert "published" in result.stdout


def test_cli_publish_errors(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", hf_repo=None)
    no_repo = CliRunner().invoke(_cli(), ["publish", str(bundle), "--json"])
    assert no_repo.exit_code == 2 and "--repo" in json.loads(no_repo.stdout)["message"]

    no_token = CliRunner().invoke(_cli(), ["publish", str(bundle), "--repo", "alice/x", "--json"])
    assert no_token.exit_code == 2 and json.loads(no_token.stdout)["error"] == "CredentialsError"

    no_bundle = CliRunner().invoke(_cli(), ["publish", str(tmp_path / "nothing")])
    assert no_bundle.exit_code == 2
