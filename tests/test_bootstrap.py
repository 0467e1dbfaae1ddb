"""Bootstrap: a local git repository stands in for ai-toolkit (file:// URL, a requirements.txt,
the stdlib-only ai-toolkit stand-in of tests/aitk_standin.py as run.py), the venv is built once and skipped the
second time; tiny checks imports; the Hugging Face access check against a local server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import remote.bootstrap as bootstrap_module
from remote.bootstrap import (DONE_MARKER, aitk_python, aitk_python_problem, bootstrap,
                              check_hf_access, torch_cuda_tag)
from remote.checks import Probes, software_checks
from remote.status import StageFailed
from tests.aitk_standin import SCRIPT as STANDIN

def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                        "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def make_fake_aitk(root: Path) -> tuple[str, str]:
    """A git repository standing in for ai-toolkit; returns (file:// URL, commit)."""
    repo = root / "fake-ai-toolkit"
    repo.mkdir(parents=True)
    shutil.copy(STANDIN, repo / "run.py")
    (repo / "requirements.txt").write_text("# ai-toolkit's pins would be here\n")
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "fake ai-toolkit", cwd=repo)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout.strip()
    return f"file://{repo}", commit


def aitk_env(**extra: str) -> dict[str, str]:
    """The knobs that keep bootstrap offline: a system-site venv and no torch install."""
    return {**os.environ, "FLUX_REMOTE_VENV_ARGS": "--system-site-packages --without-pip",
            "FLUX_REMOTE_SKIP_TORCH_INSTALL": "1", **extra}


def aitk_spec(url: str, commit: str, **aitk) -> dict:
    return {"name": "x", "base_model": "flux-dev",
            "training": {"trainer": "ai-toolkit", "ai_toolkit": {"repo": url, "commit": commit,
                                                                 "path": None, **aitk}},
            "wandb": {"enabled": False}}


def test_builds_once_then_skips(tmp_path: Path) -> None:
    url, commit = make_fake_aitk(tmp_path)
    logs: list[str] = []
    first = bootstrap(aitk_spec(url, commit), cache_root=tmp_path / "cache", env=aitk_env(),
                      log=logs.append, image_checkouts=())
    checkout = tmp_path / "cache" / "ai-toolkit" / commit
    assert first.source == "built" and first.aitk_dir == str(checkout)
    assert first.commit == commit
    assert first.steps == ["clone", "venv", "torch: present", "requirements"]
    assert (checkout / "run.py").is_file() and Path(first.python).is_file()
    assert (checkout / DONE_MARKER).is_file()
    assert first.hf_access.startswith("skipped")
    assert any(line.startswith("$ git clone") for line in logs)
    logs.clear()
    second = bootstrap(aitk_spec(url, commit), cache_root=tmp_path / "cache", env=aitk_env(),
                       log=logs.append, image_checkouts=())
    assert second.source == "cached" and second.steps == [] and not logs
    assert second.python == first.python


def test_branch_name_and_update_of_an_existing_clone(tmp_path: Path) -> None:
    url, commit = make_fake_aitk(tmp_path)
    cache = tmp_path / "cache"
    result = bootstrap(aitk_spec(url, "main"), cache_root=cache, env=aitk_env(),
                       log=lambda _: None, image_checkouts=())
    assert result.commit == commit
    (cache / "ai-toolkit" / "main" / DONE_MARKER).unlink()  # e.g. an install cut short
    again = bootstrap(aitk_spec(url, "main"), cache_root=cache, env=aitk_env(),
                      log=lambda _: None, image_checkouts=())
    assert again.steps[0] == "fetch" and "venv" not in again.steps


def test_a_bad_commit_fails_the_stage(tmp_path: Path) -> None:
    url, _ = make_fake_aitk(tmp_path)
    with pytest.raises(StageFailed, match="git -C"):
        bootstrap(aitk_spec(url, "0" * 40), cache_root=tmp_path / "cache", env=aitk_env(),
                  log=lambda _: None, image_checkouts=())


def test_an_existing_install_is_used_instead_of_building(tmp_path: Path) -> None:
    image = tmp_path / "app" / "ai-toolkit"
    (image / "venv" / "bin").mkdir(parents=True)
    (image / "run.py").write_text("")
    (image / "venv" / "bin" / "python").write_text("")
    result = bootstrap(aitk_spec("file:///nowhere", "main"), cache_root=tmp_path / "cache",
                       env=aitk_env(), log=lambda _: None, image_checkouts=(str(image),))
    assert result.source == "image" and result.aitk_dir == str(image)
    assert result.python == str(image / "venv" / "bin" / "python")
    assert not (tmp_path / "cache").exists()
    own = bootstrap(aitk_spec("file:///nowhere", "main", path=str(image)),
                    cache_root=tmp_path / "cache", env=aitk_env(), log=lambda _: None,
                    image_checkouts=())
    assert own.source == "spec path"
    with pytest.raises(StageFailed, match="holds no run.py"):
        bootstrap(aitk_spec("file:///nowhere", "main", path=str(tmp_path)),
                  cache_root=tmp_path / "cache", env=aitk_env(), log=lambda _: None)


def test_tiny_checks_imports_only(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = bootstrap({"training": {"trainer": "tiny"}}, cache_root=tmp_path, env=env,
                       log=lambda _: None)
    assert result.source == "tiny" and result.python == sys.executable
    assert not list(tmp_path.iterdir())


def test_torch_index_follows_the_driver() -> None:
    """manager/spec.py _cuda_flavor: cu130 from CUDA 13.0, cu126 from 12.6 (torch 2.13 has no
    cu128 wheels), unknown -> cu130; nvidia-smi's CUDA figure first, else the driver's."""
    assert torch_cuda_tag("580.65.06") == "cu130"
    assert torch_cuda_tag("570.133.07") == "cu126"
    assert torch_cuda_tag(None) == "cu130"
    assert torch_cuda_tag("570.133.07", "12.8") == "cu126"
    assert torch_cuda_tag(None, "13.0") == "cu130"
    with pytest.raises(StageFailed, match="too old for the torch ai-toolkit pins"):
        torch_cuda_tag("550.54.15", "12.4")
    with pytest.raises(StageFailed):
        torch_cuda_tag("535.104.05")


def test_the_install_follows_ai_toolkits_own(tmp_path: Path, monkeypatch) -> None:
    """README / manager/spec.py / docker/Dockerfile at the pin: pinned torch trio from the
    driver's index, then requirements.txt, then torchcodec -U over the requirements' pin."""
    url, commit = make_fake_aitk(tmp_path)
    pips: list[list[str]] = []
    real_run = bootstrap_module._run

    def run(argv: list[str], **kw) -> None:
        if argv[1:3] == ["-m", "pip"]:
            pips.append(argv[3:])
        else:
            real_run(argv, **kw)

    monkeypatch.setattr(bootstrap_module, "_run", run)
    env = {k: v for k, v in aitk_env().items() if k != "FLUX_REMOTE_SKIP_TORCH_INSTALL"}
    result = bootstrap(aitk_spec(url, commit), cache_root=tmp_path / "cache", env=env,
                       log=lambda _: None, driver="570.133.07", cuda="12.8", image_checkouts=())
    torch_install, requirements, codec = pips
    assert torch_install[:5] == ["install", "--quiet", "torch==2.13.0", "torchvision==0.28.0",
                                 "torchaudio==2.11.0"]
    assert torch_install[-2:] == ["--index-url", "https://download.pytorch.org/whl/cu126"]
    assert requirements[-2:] == ["-r", str(Path(result.aitk_dir) / "requirements.txt")]
    assert codec == ["install", "--quiet", "-U", "torchcodec==0.15.0"]
    assert result.steps[-3:] == ["torch: cu126", "requirements", "torchcodec"]


def test_a_python_ai_toolkit_has_wheels_for(tmp_path: Path, monkeypatch) -> None:
    found = {"python3.11": "/usr/bin/python3.11"}.get
    assert aitk_python(current=(3, 12), executable="/me") == "/me"
    assert aitk_python(current=(3, 13), which=found) == "/usr/bin/python3.11"
    assert aitk_python(current=(3, 13), which=lambda name: None) is None
    problem = aitk_python_problem(current=(3, 13), which=lambda name: None)
    assert "Python 3.13" in problem and "scipy==1.12.0" in problem
    assert aitk_python_problem(current=(3, 11)) is None
    # the checks stage says so before anything is paid for
    monkeypatch.setattr(bootstrap_module, "aitk_python_problem", lambda: problem)
    spec = aitk_spec("file:///nowhere", "main")
    (check,) = [c for c in software_checks(spec, Probes(package_version=lambda p: "1"))
                if c.name == "python_for_ai_toolkit"]
    assert check.status == "fail" and check.detail == problem
    # and the bootstrap refuses to build a venv with an unsupported one
    monkeypatch.setattr(bootstrap_module, "aitk_python", lambda: None)
    url, commit = make_fake_aitk(tmp_path)
    with pytest.raises(StageFailed, match="scipy==1.12.0") as failed:
        bootstrap(aitk_spec(url, commit), cache_root=tmp_path / "cache", env=aitk_env(),
                  log=lambda _: None, image_checkouts=())
    assert failed.value.cause == "python"


def test_a_checkout_at_another_commit_is_reported(tmp_path: Path) -> None:
    url, commit = make_fake_aitk(tmp_path)
    image = url.removeprefix("file://")
    pin = "27a03a91f23eb1b757d5ec2e80ee3e129cfcc350"
    logged: list[str] = []
    other = bootstrap(aitk_spec("file:///nowhere", pin), cache_root=tmp_path / "cache",
                      env=aitk_env(), log=logged.append, image_checkouts=(image,))
    assert other.source == "image" and other.commit == commit
    assert f"is at {commit}, not the pinned {pin}" in other.pin_mismatch
    assert any(line.startswith("warning: the ai-toolkit at") for line in logged)
    same = bootstrap(aitk_spec("file:///nowhere", commit[:12]), cache_root=tmp_path / "cache",
                     env=aitk_env(), log=logged.append, image_checkouts=(image,))
    assert same.pin_mismatch is None


class HubHandler(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        code = {"hf_good_token": 200, "hf_no_license": 403}.get(token, 401)
        if "missing" in self.path:
            code = 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub():
    HubHandler.seen = []
    server = HTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
    server.shutdown()
    server.server_close()


def test_hf_access_check(hub) -> None:
    model = "black-forest-labs/FLUX.1-dev"
    assert check_hf_access(model, token="hf_good_token", env=hub) == "ok"
    assert HubHandler.seen == [(f"/api/models/{model}/auth-check", "Bearer hf_good_token")]
    with pytest.raises(StageFailed, match="accept the license") as info:
        check_hf_access(model, token="hf_no_license", env=hub)
    assert info.value.cause == "hf_auth" and "hf_no_license" not in str(info.value)
    with pytest.raises(StageFailed, match="HTTP 401"):
        check_hf_access(model, token="hf_wrong", env=hub)
    with pytest.raises(StageFailed, match="no model"):
        check_hf_access("someone/missing", token="hf_good_token", env=hub)
    assert check_hf_access(model, token=None, env=hub).startswith("skipped: no HF_TOKEN")
    offline = {**hub, "HF_HUB_OFFLINE": "1"}
    assert check_hf_access(model, token="t", env=offline) == "skipped: offline"
    assert check_hf_access("/models/flux", token="t", env=hub).startswith("skipped: local")
    assert check_hf_access(model, token="t", env={"HF_ENDPOINT": "http://127.0.0.1:9"}
                           ).startswith("unverified")


def test_bootstrap_checks_hf_before_building(tmp_path: Path, hub) -> None:
    url, commit = make_fake_aitk(tmp_path)
    with pytest.raises(StageFailed, match="HTTP 403"):
        bootstrap(aitk_spec(url, commit), cache_root=tmp_path / "cache",
                  env=aitk_env(HF_TOKEN="hf_no_license", HF_HUB_OFFLINE="0", **hub),
                  log=lambda _: None, base_model="black-forest-labs/FLUX.1-dev",
                  image_checkouts=())
    assert not (tmp_path / "cache").exists()


def test_a_broken_checkout_is_cloned_again(tmp_path: Path) -> None:
    url, commit = make_fake_aitk(tmp_path)
    broken = tmp_path / "cache" / "ai-toolkit" / commit
    (broken / ".git").mkdir(parents=True)  # what a clone killed early leaves
    result = bootstrap(aitk_spec(url, commit), cache_root=tmp_path / "cache", env=aitk_env(),
                       log=lambda _: None, image_checkouts=())
    assert result.steps[0] == "clone" and (broken / "run.py").is_file()
