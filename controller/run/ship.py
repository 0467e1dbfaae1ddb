"""Putting a run on its machine: the agent package, the dataset, the secrets, the plan, the start.

Everything here is safe to repeat: rsync sends only what changed, the plan and the secrets file
are replaced atomically, and the agent is not started while it runs or after it has ended (its
pid and exit-code files tell). The orchestrator journals around these calls.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from controller.errors import TransportError
from controller.run.follow import RunPaths, read_int

if TYPE_CHECKING:
    from controller.hosts.base import Host
    from controller.hosts.rsync import TransferStats

SECRET_VARS = ("HF_TOKEN", "WANDB_API_KEY")
# Controller environment variables handed to the agent (test and tuning knobs, never secrets).
FORWARDED_PREFIXES = ("FLUX_REMOTE_TINY_", "FLUX_REMOTE_AGENT_", "FLUX_REMOTE_SKIP_",
                      "FLUX_REMOTE_VENV_")
REMOTE_EXCLUDES = ("__pycache__", "*.pyc")


def remote_package_dir() -> Path:
    """The agent package as installed here: what is shipped as ``<run_dir>/remote/``."""
    import remote

    return Path(remote.__file__).resolve().parent


def secrets_payload(env: Mapping[str, str]) -> bytes:
    """The 0600 env file's content (``KEY=value`` lines); empty when there are no secrets."""
    return "".join(f"{name}={env[name]}\n" for name in SECRET_VARS if env.get(name)).encode()


def secrets_path(root: str, run_id: str) -> str:
    """Outside the run dir, so that nothing that ships or fetches the run dir can carry it."""
    return f"{root}/.secrets/{run_id}.env"


def remove_secrets(host: "Host", root: str, run_id: str) -> bool:
    """Delete the run's secrets file (best effort: on Vast the instance goes anyway)."""
    try:
        host.run(f"rm -f -- {shlex.quote(secrets_path(root, run_id))}", timeout=60, check=False)
    except TransportError:
        return False
    return True


def upload_run(host: "Host", paths: RunPaths, dataset: Path) -> list["TransferStats"]:
    """rsync the agent package and the dataset into the run dir (``--delete`` inside it only)."""
    return [
        host.upload(remote_package_dir(), f"{paths.run_dir}/remote", delete=True,
                    excludes=REMOTE_EXCLUDES),
        host.upload(dataset, f"{paths.run_dir}/dataset", delete=True),
    ]


def write_plan(host: "Host", paths: RunPaths, plan: dict[str, Any]) -> None:
    host.write_bytes(paths.plan, json.dumps(plan, indent=2).encode("utf-8"))


def start_agent(host: "Host", paths: RunPaths, python: str,
                env: Mapping[str, str]) -> int | None:
    """Start ``python -m remote run plan.json`` detached; None when it already runs or ran."""
    pid = read_int(host, paths.pid)
    if read_int(host, paths.rc) is not None or (pid is not None and host.is_alive(pid)):
        return None
    agent_env = {"PYTHONPATH": paths.run_dir, "PYTHONUNBUFFERED": "1"}
    agent_env.update({k: v for k, v in env.items() if k.startswith(FORWARDED_PREFIXES)})
    return host.start_detached([python, "-m", "remote", "run", paths.plan], cwd=paths.run_dir,
                               log_path=paths.out, env=agent_env, pid_path=paths.pid,
                               rc_path=paths.rc)
