"""``flux-remote export skypilot``: the same pipeline as a SkyPilot task, for any cloud or cluster.

The task runs the unchanged agent (``python -m remote run plan.json``) on whatever machine
SkyPilot provisions. Layout on the cluster (``~`` is the cluster user's home):

    ~/flux-remote/agent/remote/          the agent package        (file mount of ``remote/``)
    ~/flux-remote/datasets/<name>/       the dataset, read only   (file mount)
    ~/flux-remote/plans/<name>.json      the exported plan.json   (file mount)
    ~/flux-remote/<name>/                the run dir: plan.json, status.json, agent.log, publish/

The exported plan names the run dir and dataset with ``~``; ``run`` expands them with the real home
and writes the run dir's ``plan.json`` (keeping ``billing_started_at`` of an earlier launch, so a
re-run resumes instead of restarting the meter). Secrets are declared under ``secrets:`` with null
values: SkyPilot resolves them at launch from ``--secret HF_TOKEN`` and redacts them in its UI,
so no value is ever written into the task or the plan. The budget has no price feed on another
cloud: ``budget.max_usd_per_hour`` becomes SkyPilot's ``max_hourly_cost`` and the agent's meter
price, so the on-instance cost guard stops at ``max_usd`` assuming that worst-case price.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.spec.model import RunSpec
from controller.state import write_text_atomic

CLUSTER_ROOT = "~/flux-remote"
AGENT_DEPS = ("pyyaml", "pillow", "numpy", "safetensors")

# GPU memory (GB) of SkyPilot's accelerator names: picks candidates for ``gpu.min_vram_gb`` when
# ``gpu.names`` is empty, and splits Vast's A100 / V100 names into their memory variants.
SKY_VRAM_GB: dict[str, float] = {
    "A10": 24, "A10G": 24, "L4": 24, "RTX3090": 24, "RTX4090": 24, "RTX5090": 32,
    "V100": 16, "V100-32GB": 32, "A100": 40, "A100-80GB": 80, "L40": 48, "L40S": 48,
    "A40": 48, "RTXPRO6000": 96, "H100": 80, "H200": 141, "B200": 180,
}
# Names SkyPilot's own Vast catalog fetcher maps specially (sky/catalog/data_fetchers/fetch_vast.py).
_SKY_RENAMES = {"TeslaV100": "V100", "TeslaT4": "T4", "TeslaP100": "P100", "QRTX6000": "RTX6000",
                "QRTX8000": "RTX8000", "RTXPRO6000WS": "RTXPRO6000", "RTXPRO6000S": "RTXPRO6000"}
_MEMORY_VARIANTS = {"A100": ("A100", "A100-80GB"), "V100": ("V100", "V100-32GB")}


@dataclass(frozen=True)
class ExportResult:
    task_path: Path
    plan_path: Path
    task: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"task": str(self.task_path), "plan": str(self.plan_path),
                "launch": launch_hint(self.task, self.task_path)}


def sky_accelerator_name(vast_name: str) -> str:
    """Vast's ``gpu_name`` ("RTX 4090", "H100 SXM", "RTX 6000Ada") -> SkyPilot's ("RTX4090", ...).

    Follows the normalisation of SkyPilot's own Vast catalog: drop spaces, ``Ada`` -> ``-Ada``, drop
    a form-factor suffix (Ti, PCIE, SXM4, SXM, NVL) and a trailing S/D after RTX model numbers.
    """
    gpu = re.sub("Ada", "-Ada", re.sub(r"\s", "", vast_name))
    gpu = re.sub(r"(Ti|PCIE|SXM4|SXM|NVL)$", "", gpu)
    gpu = re.sub(r"(RTX\d0\d0)(S|D)$", r"\1", gpu)
    return _SKY_RENAMES.get(gpu, gpu)


def accelerator_candidates(spec: RunSpec) -> list[str]:
    """SkyPilot accelerator names that satisfy the spec's ``gpu`` section, in preference order."""
    min_vram = spec.gpu.min_vram_gb
    if not spec.gpu.names:
        return [name for name, vram in SKY_VRAM_GB.items() if vram >= min_vram]
    names: list[str] = []
    for vast_name in spec.gpu.names:
        sky_name = sky_accelerator_name(vast_name)
        for variant in _MEMORY_VARIANTS.get(sky_name, (sky_name,)):
            if SKY_VRAM_GB.get(variant, min_vram) >= min_vram and variant not in names:
                names.append(variant)
    return names


def _accelerators(spec: RunSpec) -> dict[str, int] | list[str]:
    from controller.errors import SpecError

    candidates = accelerator_candidates(spec)
    if not candidates:
        raise SpecError(
            f"no SkyPilot accelerator among gpu.names {spec.gpu.names} has "
            f"{spec.gpu.min_vram_gb:g} GB of GPU memory (gpu.min_vram_gb)"
        )
    count = spec.gpu.num_gpus
    if len(candidates) == 1:
        return {candidates[0]: count}
    return [f"{name}:{count}" for name in candidates]


def _resources(spec: RunSpec) -> dict[str, Any]:
    resources: dict[str, Any] = {
        "accelerators": _accelerators(spec),
        "memory": f"{spec.gpu.min_ram_gb:g}+",
        "disk_size": int(math.ceil(spec.gpu.disk_gb)),
        "use_spot": spec.gpu.interruptible,
        "image_id": f"docker:{spec.gpu.image}",
    }
    if spec.budget.max_usd_per_hour is not None:
        resources["max_hourly_cost"] = spec.budget.max_usd_per_hour
    return resources


def dataset_source(spec: RunSpec, spec_path: Path) -> Path:
    """The dataset folder as an absolute local path (relative paths are relative to the spec file)."""
    path = Path(spec.dataset.path).expanduser()
    if not path.is_absolute():
        path = Path(spec_path).resolve().parent / path
    return path.resolve()


def agent_source() -> Path:
    """The local ``remote/`` package that the cluster runs."""
    import remote

    return Path(remote.__file__).resolve().parent


def cluster_paths(name: str) -> dict[str, str]:
    return {
        "agent": f"{CLUSTER_ROOT}/agent",
        "dataset": f"{CLUSTER_ROOT}/datasets/{name}",
        "plan": f"{CLUSTER_ROOT}/plans/{name}.json",
        "run_dir": f"{CLUSTER_ROOT}/{name}",
    }


def secret_names(spec: RunSpec) -> list[str]:
    """The secrets this run needs on the cluster: gated Flux dev weights need HF_TOKEN."""
    names = []
    if not spec.is_schnell:
        names.append("HF_TOKEN")
    if spec.wandb.enabled:
        names.append("WANDB_API_KEY")
    return names


def build_plan(spec: RunSpec) -> dict[str, Any]:
    """plan.json for the cluster, with ``~`` paths that ``run`` expands there."""
    from remote.plan import make_plan

    paths = cluster_paths(spec.name)
    return make_plan(
        run_id=f"{spec.name}-skypilot",
        spec=spec.model_dump(mode="json"),
        run_dir=paths["run_dir"],
        dataset_dir=paths["dataset"],
        provider="ssh",
        price_per_hour=spec.budget.max_usd_per_hour or 0.0,
        billing_started_at=0.0,
        secrets_file=None,
        instance={"gpu_name": None, "num_gpus": spec.gpu.num_gpus, "offer_id": None,
                  "instance_id": None},
    )


_PREPARE_PLAN = '''import json, os, sys, time
src, dst = sys.argv[1], sys.argv[2]
with open(src, encoding="utf-8") as fh:
    plan = json.load(fh)
for key in ("run_dir", "dataset_dir"):
    plan[key] = os.path.expanduser(plan[key])
started = None
if os.path.exists(dst):
    with open(dst, encoding="utf-8") as fh:
        started = json.load(fh).get("billing_started_at")
plan["billing_started_at"] = started or time.time()
with open(dst + ".tmp", "w", encoding="utf-8") as fh:
    json.dump(plan, fh, indent=2)
os.replace(dst + ".tmp", dst)'''


def _setup(spec: RunSpec) -> str:
    python = spec.provider.remote_python
    deps = " ".join(shlex.quote(dep) for dep in AGENT_DEPS)
    return f"set -euo pipefail\n{shlex.quote(python)} -m pip install --quiet {deps}\n"


def _in_home(path: str) -> str:
    """A ``~/...`` cluster path as shell text that expands the home even inside quotes."""
    return '"$HOME"/' + shlex.quote(path.removeprefix("~/"))


def _run(spec: RunSpec) -> str:
    paths = cluster_paths(spec.name)
    python = shlex.quote(spec.provider.remote_python)
    return (
        "set -euo pipefail\n"
        f"RUN_DIR={_in_home(paths['run_dir'])}\n"
        f"AGENT_DIR={_in_home(paths['agent'])}\n"
        'mkdir -p "$RUN_DIR"\n'
        f"{python} - {_in_home(paths['plan'])} \"$RUN_DIR/plan.json\" <<'PY'\n"
        f"{_PREPARE_PLAN}\n"
        "PY\n"
        'cd "$AGENT_DIR"\n'
        f'PYTHONPATH="$AGENT_DIR" {python} -m remote run "$RUN_DIR/plan.json"\n'
    )


def skypilot_task(spec: RunSpec, *, spec_path: Path, plan_path: Path | None = None) -> dict[str, Any]:
    """The SkyPilot task for ``spec`` as a dict (keys of SkyPilot's documented task YAML only).

    ``plan_path`` is where the exported plan.json lies locally (default: next to the spec file as
    ``<name>.plan.json``). Holds no secret value: secrets are names with null values.
    """
    paths = cluster_paths(spec.name)
    plan_local = Path(plan_path) if plan_path else Path(spec_path).resolve().parent / f"{spec.name}.plan.json"
    task: dict[str, Any] = {
        "name": spec.name,
        "num_nodes": 1,
        "resources": _resources(spec),
        "file_mounts": {
            f"{paths['agent']}/remote": str(agent_source()),
            paths["dataset"]: str(dataset_source(spec, spec_path)),
            paths["plan"]: str(plan_local.resolve()),
        },
        "envs": {"PYTHONUNBUFFERED": "1"},
        "setup": _setup(spec),
        "run": _run(spec),
    }
    secrets = secret_names(spec)
    if secrets:
        task["secrets"] = {name: None for name in secrets}
    return task


def dump_task(task: dict[str, Any]) -> str:
    """YAML text of a task, multi-line scripts as ``|`` blocks, keys in SkyPilot's usual order."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(task, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def launch_hint(task: dict[str, Any], task_path: Path) -> str:
    flags = " ".join(f"--secret {name}" for name in task.get("secrets", {}))
    return " ".join(part for part in ("sky launch -c", task["name"], flags, str(task_path)) if part)


def export_skypilot(spec_path: Path, out_path: Path | None = None) -> ExportResult:
    """Load ``spec_path``, write the task YAML (default ``./<name>.sky.yaml``) and its plan.json.

    The plan lies next to the task as ``<task stem>.plan.json``. Both are written atomically.
    """
    from controller.spec.loader import load_spec
    from remote.plan import write_json_atomic

    spec = load_spec(Path(spec_path))
    task_path = Path(out_path) if out_path else Path(f"{spec.name}.sky.yaml")
    stem = task_path.name.removesuffix(".yaml").removesuffix(".yml")
    plan_path = task_path.with_name(f"{stem}.plan.json")
    task_path.parent.mkdir(parents=True, exist_ok=True)
    task = skypilot_task(spec, spec_path=Path(spec_path), plan_path=plan_path)
    write_json_atomic(plan_path, build_plan(spec))
    write_text_atomic(task_path, dump_task(task), mode=0o644)
    return ExportResult(task_path=task_path, plan_path=plan_path, task=task)
