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
    from controller.spec.model import RunSpec
    from controller.hosts.rsync import TransferStats

SECRET_VARS = ("HF_TOKEN", "WANDB_API_KEY")  # the names the agent reads (remote/secrets.py)
READ_TOKEN_ENV = "HF_READ_TOKEN"  # a read-only Hub token for the instance; HF_TOKEN stays home
# The captioner a spec gets by default: a public repo, no token needed to download it.
PUBLIC_CAPTIONERS = ("Salesforce/blip-image-captioning-large",)
# Controller environment variables handed to the agent (test and tuning knobs, never secrets).
FORWARDED_PREFIXES = ("FLUX_REMOTE_TINY_", "FLUX_REMOTE_AGENT_", "FLUX_REMOTE_SKIP_",
                      "FLUX_REMOTE_VENV_")
REMOTE_EXCLUDES = ("__pycache__", "*.pyc")


def remote_package_dir() -> Path:
    """The agent package as installed here: what is shipped as ``<run_dir>/remote/``."""
    import remote

    return Path(remote.__file__).resolve().parent


def needs_hub_token(spec: "RunSpec") -> bool:
    """Whether the instance downloads from a repo that may be gated: FLUX.1-dev (gated), a custom
    base model on the Hub, or a captioning model other than the public default."""
    if spec.base_model == "flux-dev":
        return True
    if spec.base_model != "flux-schnell" and not spec.base_model_path.startswith(("/", ".", "~")):
        return True  # a custom model on the Hub: it may be gated
    return spec.captioning.mode == "model" and spec.captioning.model not in PUBLIC_CAPTIONERS


def secrets_for(spec: "RunSpec", env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The fewest secrets the instance needs, and warnings to show.

    ``HF_TOKEN`` on the instance is ``HF_READ_TOKEN`` when set (publishing happens from this
    machine, so a write token never needs to leave it), else ``HF_TOKEN`` with a warning that it
    is sent; only when :func:`needs_hub_token`. ``WANDB_API_KEY`` only when W&B is on."""
    values: dict[str, str] = {}
    warnings = []
    if needs_hub_token(spec):
        if env.get(READ_TOKEN_ENV):
            values["HF_TOKEN"] = env[READ_TOKEN_ENV]
        elif env.get("HF_TOKEN"):
            values["HF_TOKEN"] = env["HF_TOKEN"]
            warnings.append(f"HF_TOKEN is sent to the instance to download the model; set "
                            f"{READ_TOKEN_ENV} to a read-only token so that a write token "
                            "never leaves this machine")
    if spec.wandb.enabled and env.get("WANDB_API_KEY"):
        values["WANDB_API_KEY"] = env["WANDB_API_KEY"]
    return values, warnings


def secrets_payload(values: Mapping[str, str]) -> bytes:
    """The 0600 env file's content (``KEY=value`` lines); empty when there are no secrets."""
    return "".join(f"{name}={values[name]}\n" for name in SECRET_VARS
                   if values.get(name)).encode()


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


def upload_run(host: "Host", paths: RunPaths, dataset: Path, *, caption_ext: str = "txt",
               max_files: int = 10000) -> list["TransferStats"]:
    """rsync the agent package and the dataset into the run dir (``--delete`` inside it only).

    Of the dataset only images and their ``.<caption_ext>`` sidecars are sent (no dotfiles, no
    other file); a folder that must not be uploaded (home, ``/``, one holding ``.ssh``...) is
    refused with SpecError first (``controller.spec.dataset_guard``)."""
    from controller.errors import SpecError
    from controller.spec.dataset_guard import refusal, upload_filters

    problem = refusal(dataset, max_files=max_files)
    if problem:
        raise SpecError(f"dataset.path: {problem}")
    return [
        host.upload(remote_package_dir(), f"{paths.run_dir}/remote", delete=True,
                    excludes=REMOTE_EXCLUDES),
        host.upload(dataset, f"{paths.run_dir}/dataset", delete=True,
                    filters=upload_filters(caption_ext)),
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
