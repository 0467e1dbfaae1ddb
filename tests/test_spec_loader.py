"""Loading good specs: the shipped configs, defaults, paths, and what the secret scan lets through."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from controller.spec.secrets_scan import looks_secret, mask, scan
from controller.spec.model import AI_TOOLKIT_COMMIT, RunSpec, json_schema
from controller.spec.loader import load_file, load_spec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "data" / "img.PNG")
    return tmp_path


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    loaded = load_file(path)
    assert loaded.runs
    for spec in loaded.runs:
        assert spec.dataset.path.is_absolute() and spec.dataset.path.is_dir()


def test_all_four_configs_are_shipped() -> None:
    names = {path.name for path in CONFIGS.glob("*.yaml")}
    assert {"demo-local.yaml", "flux-dev-vast.yaml", "flux-schnell-vast.yaml", "batch-sweep.yaml"} <= names


def test_demo_config_is_local_tiny_and_small() -> None:
    spec = load_spec(CONFIGS / "demo-local.yaml")
    assert (spec.provider.type, spec.training.trainer) == ("local", "tiny")
    assert 60 <= spec.training.steps <= 120 and spec.training.rank == 4
    assert spec.training.resolutions == [64] and len(spec.training.sample.prompts) == 2
    assert spec.budget.max_usd == 1
    assert spec.dataset.path == (CONFIGS / "demo-data").resolve()


def test_demo_data_is_small_and_varied() -> None:
    files = sorted((CONFIGS / "demo-data").iterdir())
    images = [f for f in files if f.suffix in (".png", ".jpg")]
    assert 10 <= len(images) <= 16
    assert {f.suffix for f in images} == {".png", ".jpg"}
    assert any(f.suffix == ".txt" for f in files)
    assert sum(f.stat().st_size for f in files) < 300_000
    sizes = {Image.open(f).size for f in images}
    assert len(sizes) >= 5 and all(64 <= min(s) and max(s) <= 160 for s in sizes)


def test_minimal_spec_gets_the_realistic_defaults(spec_dir: Path) -> None:
    path = spec_dir / "run.yaml"
    path.write_text("name: mine\ndataset:\n  path: data\nbudget:\n  max_usd: 5\n")
    spec = load_spec(path)
    assert spec.dataset.path == spec_dir / "data"  # relative to the YAML file, not the cwd
    assert spec.base_model_path == "black-forest-labs/FLUX.1-dev"
    assert spec.training.ai_toolkit.commit == AI_TOOLKIT_COMMIT
    assert spec.provider.type == "vast" and spec.gpu.min_vram_gb == 24
    assert spec.out_dir == Path("runs") / "mine"


def test_absolute_and_home_dataset_paths(spec_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(spec_dir))
    path = spec_dir / "sub" / "run.yaml"
    path.parent.mkdir()
    path.write_text("name: mine\ndataset: {path: ~/data}\nbudget: {max_usd: 5}\nprovider: local\n")
    assert load_spec(path).dataset.path == spec_dir / "data"


def test_pinned_ai_toolkit_commit_is_a_full_sha() -> None:
    assert len(AI_TOOLKIT_COMMIT) == 40 and int(AI_TOOLKIT_COMMIT, 16) >= 0


def test_things_that_only_look_like_secrets_pass(spec_dir: Path) -> None:
    path = spec_dir / "run.yaml"
    path.write_text(f"""\
name: mine
dataset: {{path: data, shuffle_tokens: true}}
training:
  ai_toolkit:
    commit: {"ab" * 20}
gpu:
  image: pytorch/pytorch@sha256:{"cd" * 32}
  verified_only: true
provider: {{type: ssh, host: box.lan, key_path: ~/.ssh/id_ed25519}}
budget: {{max_usd: 5}}
""")
    assert load_spec(path).training.ai_toolkit.commit == "ab" * 20


def test_secret_scan_finds_keys_and_values_with_their_env_var() -> None:
    root = yaml.compose("wandb:\n  api_key: x\nvast_api_key: y\npublish:\n  note: ghp_" + "a" * 30 + "\n"
                        "extra: " + "f" * 64 + "\nempty_token:\n")
    findings = {f.path: f for f in scan(root)}
    assert set(findings) == {"wandb.api_key", "vast_api_key", "publish.note", "extra"}
    assert "WANDB_API_KEY" in findings["wandb.api_key"].message
    assert "VAST_API_KEY" in findings["vast_api_key"].message
    assert "GITHUB_TOKEN" in findings["publish.note"].message
    assert (findings["extra"].line, findings["extra"].column) == (6, 8)
    assert "ffff…" in findings["extra"].message and "f" * 10 not in findings["extra"].message


@pytest.mark.parametrize("key", ["hf_token", "api_key", "apiKey", "HF-TOKEN", "password", "wandb_key",
                                 "client_secret", "vastKey"])
def test_secret_key_names(key: str) -> None:
    assert [f.path for f in scan(yaml.compose(f"{key}: x"))] == [key]


@pytest.mark.parametrize("key", ["key_path", "shuffle_tokens", "author", "hf_repo", "hf_private",
                                 "max_step_saves_to_keep", "auto_mount_paths"])
def test_ordinary_key_names(key: str) -> None:
    assert scan(yaml.compose(f"{key}: x")) == []


def test_mask_and_looks_secret() -> None:
    assert mask("hf_abcdefghijklmnopqrstu") == "hf_a…"
    assert mask("short") == "s…"
    assert looks_secret("hf_" + "x" * 30) and looks_secret("0" * 32)
    assert not looks_secret("p3r5on") and not looks_secret("0" * 33)


def test_json_schema_covers_the_spec_and_the_batch_section() -> None:
    schema = json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"name", "dataset", "budget", "batch", "training"} <= set(schema["properties"])
    assert schema["$defs"]["BatchSpec"]["properties"]["sweep"]
    assert schema["additionalProperties"] is False
    assert RunSpec.model_json_schema()["required"] == ["name", "dataset", "budget"]
