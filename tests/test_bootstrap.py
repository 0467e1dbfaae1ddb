"""Bootstrap: a local git repository stands in for ai-toolkit (file:// URL, a requirements.txt,
a stdlib-only run.py that behaves like ai-toolkit's), the venv is built once and skipped the
second time; tiny checks imports; the Hugging Face access check against a local server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from remote.bootstrap import DONE_MARKER, bootstrap, check_hf_access, torch_cuda_tag
from remote.status import StageFailed

# ai-toolkit's behaviour in 80 lines of stdlib: reads the job YAML, resumes from the newest
# checkpoint, prints tqdm-style progress and "Saved checkpoint to", writes PEFT-named LoRA
# safetensors with training_info metadata and PNG samples named like ai-toolkit's.
FAKE_RUN_PY = r'''
import json, os, re, struct, sys, time, zlib
from pathlib import Path

cfg_path = sys.argv[1]
text = Path(cfg_path).read_text()
def get(key, default=None):
    m = re.search(rf"^\s*{key}:\s*['\"]?([^'\"\n]+)['\"]?\s*$", text, re.M)
    return m.group(1).strip() if m else default
name, folder = get("name"), Path(get("training_folder"))
steps, save_every, rank = int(get("steps")), int(get("save_every")), int(get("linear"))
out = folder / name
(out / "samples").mkdir(parents=True, exist_ok=True)
Path(os.environ["FAKE_AITK_RECORD"]).write_text(json.dumps(
    {"argv": sys.argv, "cwd": os.getcwd(), "python": sys.executable}))

def save(path, step):
    names = ["transformer.single_transformer_blocks.0.attn.to_q"]
    header, blobs, offset = {"__metadata__": {"training_info": json.dumps({"step": step}),
                                              "format": "pt", "name": name}}, [], 0
    for base in names:
        for part, shape in (("lora_A", [rank, 8]), ("lora_B", [8, rank])):
            data = struct.pack(f"<{shape[0] * shape[1]}f", *([0.01] * (shape[0] * shape[1])))
            header[f"{base}.{part}.weight"] = {"dtype": "F32", "shape": shape,
                                               "data_offsets": [offset, offset + len(data)]}
            blobs.append(data)
            offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    os.replace(tmp, path)

def png(path):
    raw = b"".join(b"\x00" + b"\x80\x40\x20" * 8 for _ in range(8))
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

done = [int(m.group(1)) for p in out.glob(f"{name}_*.safetensors")
        if (m := re.search(r"_(\d{9})\.safetensors$", p.name))]
start = max(done, default=0)
print("Loading Flux model", flush=True)
for step in range(start + 1, steps + 1):
    loss = 1.0 / step
    sys.stdout.write(f"\r{name}:  {100 * step // steps}%|#         | {step}/{steps} "
                     f"[00:01<00:02,  0.01s/it, lr: 1.0e-04 loss: {loss:.3e}]")
    sys.stdout.flush()
    if step % save_every == 0 or step == steps:
        print(f"\nSaving at step {step}", flush=True)
        save(out / f"{name}_{step:09d}.safetensors", step)
        print(f"Saved checkpoint to {out}/{name}_{step:09d}.safetensors", flush=True)
        png(out / "samples" / f"{int(time.time() * 1000)}__{step:09d}_0.png")
save(out / f"{name}.safetensors", steps)
print("\nDone", flush=True)
'''


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                        "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def make_fake_aitk(root: Path) -> tuple[str, str]:
    """A git repository standing in for ai-toolkit; returns (file:// URL, commit)."""
    repo = root / "fake-ai-toolkit"
    repo.mkdir(parents=True)
    (repo / "run.py").write_text(FAKE_RUN_PY)
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
    assert torch_cuda_tag("580.65.06") == "cu130"
    assert torch_cuda_tag("570.133.07") == "cu128"
    assert torch_cuda_tag(None) == "cu128"


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
