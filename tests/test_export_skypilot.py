"""``flux-remote export skypilot``: the task YAML, its plan.json, and the run script on a fake cluster.

The task is checked against a schema written from SkyPilot's documented task YAML keys
(https://docs.skypilot.co/en/latest/reference/yaml-spec.html); when SkyPilot is importable here
(or ``FLUX_REMOTE_SKYPILOT_PYTHON`` names an interpreter that has it) its own loader parses it too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from controller.cli import export_cmds
from controller.errors import SpecError
from controller.export_skypilot import (
    accelerator_candidates,
    export_skypilot,
    skypilot_task,
    sky_accelerator_name,
)
from controller.spec.model import RunSpec
from remote.plan import load_plan
from tests.fakehub import FAKE_TOKEN, FakeHub

CANARIES = {"HF_TOKEN": "hf_canary_secret_0123456789", "WANDB_API_KEY": "wandb_canary_secret_0123456789"}

# Documented SkyPilot task keys and the resources keys we may emit, with their YAML types.
TASK_KEYS = {"name": str, "workdir": (str, dict), "num_nodes": int, "resources": dict,
             "file_mounts": dict, "setup": str, "run": str, "envs": dict, "secrets": dict}
RESOURCE_KEYS = {"accelerators": (str, dict, list), "use_spot": bool, "disk_size": int,
                 "image_id": str, "memory": (str, int, float), "cpus": (str, int, float),
                 "cloud": str, "infra": str, "max_hourly_cost": (int, float)}


def validate_task(task: dict) -> None:
    """The subset of SkyPilot's task schema that matters here, strict about unknown keys."""
    for key, value in task.items():
        assert key in TASK_KEYS, f"not a SkyPilot task key: {key}"
        assert isinstance(value, TASK_KEYS[key]), f"{key}: {type(value).__name__}"
    for key, value in task["resources"].items():
        assert key in RESOURCE_KEYS, f"not a SkyPilot resources key: {key}"
        assert isinstance(value, RESOURCE_KEYS[key]), f"resources.{key}: {type(value).__name__}"
    accelerators = task["resources"]["accelerators"]
    if isinstance(accelerators, dict):
        assert len(accelerators) == 1 and all(isinstance(n, int) for n in accelerators.values())
    elif isinstance(accelerators, list):
        assert all(isinstance(a, str) and ":" in a for a in accelerators)
    assert str(task["resources"]["image_id"]).startswith("docker:")
    for name, value in task.get("envs", {}).items():
        assert name.isidentifier() and (value is None or isinstance(value, str))
    for name, value in task.get("secrets", {}).items():
        assert value is None, f"secret {name} carries a value"
    for dst, src in task["file_mounts"].items():
        assert isinstance(dst, str) and isinstance(src, str) and Path(src).is_absolute()


def write_spec(folder: Path, dataset: Path, **sections: object) -> Path:
    data = {"name": "demo", "trigger_word": "p3r5on", "dataset": {"path": os.path.relpath(dataset, folder)},
            "budget": {"max_usd": 5}}
    data.update(sections)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def spec_of(**sections: object) -> RunSpec:
    return RunSpec.model_validate({"name": "demo", "dataset": {"path": "/data"}, "budget": {"max_usd": 5},
                                   **sections})


@pytest.mark.parametrize("vast, sky", [
    ("RTX 4090", "RTX4090"), ("RTX 3090 Ti", "RTX3090"), ("H100 SXM", "H100"), ("H100 NVL", "H100"),
    ("A100 SXM4", "A100"), ("A100 PCIE", "A100"), ("L40S", "L40S"), ("RTX 6000Ada", "RTX6000-Ada"),
    ("Tesla V100", "V100"), ("RTX 5090", "RTX5090"), ("H200", "H200"),
])
def test_vast_gpu_names_map_to_skypilot(vast: str, sky: str) -> None:
    assert sky_accelerator_name(vast) == sky


def test_accelerators_follow_the_gpu_section() -> None:
    one = skypilot_task(spec_of(gpu={"names": ["RTX 4090"]}), spec_path=Path("/x/run.yaml"))
    assert one["resources"]["accelerators"] == {"RTX4090": 1}

    big = spec_of(gpu={"names": ["A100 SXM4", "H100 SXM", "RTX 4090"], "min_vram_gb": 48, "num_gpus": 2})
    assert accelerator_candidates(big) == ["A100-80GB", "H100"]
    assert skypilot_task(big, spec_path=Path("/x/run.yaml"))["resources"]["accelerators"] == [
        "A100-80GB:2", "H100:2"]

    anything = accelerator_candidates(spec_of(gpu={"min_vram_gb": 80}))
    assert set(anything) == {"A100-80GB", "H100", "H200", "B200", "RTXPRO6000"}

    with pytest.raises(SpecError, match="min_vram_gb"):
        skypilot_task(spec_of(gpu={"names": ["RTX 4090"], "min_vram_gb": 40}), spec_path=Path("/x/run.yaml"))


def test_resources_from_the_spec() -> None:
    spec = spec_of(gpu={"names": ["H100 SXM"], "interruptible": True, "disk_gb": 150.5,
                        "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel"},
                   budget={"max_usd": 20, "max_usd_per_hour": 3.0})
    task = skypilot_task(spec, spec_path=Path("/x/run.yaml"))
    validate_task(task)
    assert task["resources"] == {
        "accelerators": {"H100": 1}, "memory": "48+", "disk_size": 151, "use_spot": True,
        "image_id": "docker:pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel", "max_hourly_cost": 3.0}


def test_secrets_are_names_only() -> None:
    dev = skypilot_task(spec_of(wandb={"enabled": True}), spec_path=Path("/x/run.yaml"))
    assert dev["secrets"] == {"HF_TOKEN": None, "WANDB_API_KEY": None}
    schnell = skypilot_task(spec_of(base_model="flux-schnell"), spec_path=Path("/x/run.yaml"))
    assert "secrets" not in schnell


def test_export_writes_task_and_plan_without_secret_values(
    small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    spec_path = write_spec(tmp_path, small_dataset, wandb={"enabled": True})
    result = export_skypilot(spec_path, tmp_path / "out" / "demo.sky.yaml")

    text = result.task_path.read_text()
    plan_text = result.plan_path.read_text()
    for value in CANARIES.values():
        assert value not in text and value not in plan_text
    task = yaml.safe_load(text)
    assert task == result.task
    validate_task(task)
    assert result.plan_path == tmp_path / "out" / "demo.sky.plan.json"
    mounts = task["file_mounts"]
    assert mounts["~/flux-remote/datasets/demo"] == str(small_dataset.resolve())
    assert mounts["~/flux-remote/plans/demo.json"] == str(result.plan_path.resolve())
    assert (Path(mounts["~/flux-remote/agent/remote"]) / "__main__.py").is_file()
    assert "-m remote run" in task["run"] and "pip install" in task["setup"]

    plan = load_plan(result.plan_path)
    assert plan["run_dir"] == "~/flux-remote/demo" and plan["secrets_file"] is None
    assert plan["spec"]["name"] == "demo" and plan["provider"] == "ssh"


def _fake_cluster(home: Path, task: dict, stub_agent: str) -> None:
    """Do what SkyPilot's file_mounts do, with a stub agent that records how it was started."""
    for dst, src in task["file_mounts"].items():
        target = home / dst.removeprefix("~/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if dst.endswith("/remote"):
            target.mkdir()
            (target / "__init__.py").write_text("")
            (target / "__main__.py").write_text(stub_agent)
        elif Path(src).is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy(src, target)


STUB_AGENT = """import json, os, sys
plan = json.load(open(sys.argv[2]))
out = os.path.join(os.environ["HOME"], "started.json")
json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "plan": plan}, open(out, "w"))
"""


def test_run_script_starts_the_agent_with_an_expanded_plan(small_dataset: Path, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, small_dataset, provider={"remote_python": sys.executable})
    task = export_skypilot(spec_path, tmp_path / "demo.sky.yaml").task
    home = tmp_path / "home"
    _fake_cluster(home, task, STUB_AGENT)
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}

    def run() -> dict:
        subprocess.run(["bash", "-c", task["run"]], env=env, check=True, timeout=30)
        return json.loads((home / "started.json").read_text())

    started = run()
    run_dir = home / "flux-remote" / "demo"
    assert started["argv"] == ["run", str(run_dir / "plan.json")]
    assert Path(started["cwd"]) == home / "flux-remote" / "agent"
    plan = load_plan(run_dir / "plan.json")
    assert plan["run_dir"] == str(run_dir) and plan["dataset_dir"] == str(home / "flux-remote/datasets/demo")
    assert sorted(p.name for p in Path(plan["dataset_dir"]).iterdir()) == sorted(
        p.name for p in small_dataset.iterdir())
    first_start = plan["billing_started_at"]
    assert first_start > 0

    run()  # a second launch resumes: the meter keeps its start
    assert load_plan(run_dir / "plan.json")["billing_started_at"] == first_start


def _skypilot_python() -> str | None:
    explicit = os.environ.get("FLUX_REMOTE_SKYPILOT_PYTHON")
    if explicit:
        return explicit
    try:
        import sky  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def test_skypilot_own_loader_accepts_the_task(small_dataset: Path, tmp_path: Path) -> None:
    python = _skypilot_python()
    if python is None:
        pytest.skip("SkyPilot is not installed (set FLUX_REMOTE_SKYPILOT_PYTHON to use another venv)")
    spec_path = write_spec(tmp_path, small_dataset, gpu={"names": ["RTX 4090", "H100 SXM"]},
                           wandb={"enabled": True})
    result = export_skypilot(spec_path, tmp_path / "demo.sky.yaml")
    probe = ("import json, sys, sky\n"
             "task = sky.Task.from_yaml(sys.argv[1])\n"
             "refs = task._managed_secret_refs\n"
             "print(json.dumps({'accelerators': sorted(str(r.accelerators) for r in task.resources),"
             " 'mounts': sorted(task.file_mounts), 'secrets': sorted(r.name for r in refs)}))")
    out = subprocess.run([python, "-c", probe, str(result.task_path)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert parsed["accelerators"] == ["{'H100': 1}", "{'RTX4090': 1}"]
    assert parsed["secrets"] == ["HF_TOKEN", "WANDB_API_KEY"]
    assert "~/flux-remote/agent/remote" in parsed["mounts"]


def test_cli_export(small_dataset: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    export_cmds.register(app)
    spec_path = write_spec(tmp_path, small_dataset)
    out = tmp_path / "sky" / "task.yaml"
    result = CliRunner().invoke(app, ["export", "skypilot", str(spec_path), "-o", str(out), "--json"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task"] == str(out) and Path(data["plan"]).is_file()
    assert data["launch"] == f"sky launch -c demo --secret HF_TOKEN {out}"

    bad = CliRunner().invoke(app, ["export", "skypilot", str(tmp_path / "missing.yaml")])
    assert bad.exit_code == 2


@pytest.mark.slow
def test_exported_task_runs_the_real_agent_and_the_bundle_publishes(
    tmp_path: Path, fake_hub: FakeHub
) -> None:
    """End to end on a fake cluster: the real agent with the tiny trainer, then the fake Hub."""
    from controller.hf_publish import publish_bundle

    demo = Path(__file__).resolve().parents[1] / "configs"
    data = yaml.safe_load((demo / "demo-local.yaml").read_text())
    data["dataset"]["path"] = str(demo / "demo-data")
    data["training"].update(steps=2, save_every=2)
    data["training"]["sample"]["enabled"] = False
    data["provider"] = {"type": "local", "remote_python": sys.executable}
    spec_path = tmp_path / "run.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    task = export_skypilot(spec_path, tmp_path / "demo.sky.yaml").task
    home = tmp_path / "home"
    for dst, src in task["file_mounts"].items():
        target = home / dst.removeprefix("~/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, target)

    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    done = subprocess.run(["bash", "-c", task["run"]], env=env, capture_output=True, text=True, timeout=180)
    run_dir = home / "flux-remote" / "demo-local"
    assert done.returncode == 0, (run_dir / "agent.log").read_text()[-3000:]
    bundle = run_dir / "publish"
    assert (bundle / "demo-local.safetensors").is_file()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"

    url = publish_bundle(bundle, "alice/demo-local", token=FAKE_TOKEN)
    assert url.endswith("/alice/demo-local")
    assert fake_hub.commits[0].paths == ["README.md"]
    assert "demo-local.safetensors" in fake_hub.commits[1].paths
    repo = fake_hub.repos["alice/demo-local"]
    assert repo.files["demo-local.safetensors"] == (bundle / "demo-local.safetensors").read_bytes()
