"""``plan.json``: what the controller tells the agent. Plain JSON, no secrets.

The controller builds it with :func:`make_plan` (from a validated spec dumped to JSON-able data);
the agent reads it with :func:`load_plan`. Both sides use this module so the contract is written
down once.

Keys:
    version            contract version (1)
    run_id             unique id; the instance label is ``flux-remote:<run_id>``
    name               the spec's name (safe for paths)
    spec               the resolved run spec as a plain dict (``RunSpec.model_dump(mode="json")``)
    run_dir            absolute path of the run directory on the machine that runs the agent
    dataset_dir        absolute path of the shipped dataset (read only: the agent copies it)
    secrets_file       path of the 0600 env file written over SSH stdin, or null
    price_per_hour     $/h of the instance (dph_total), 0 for free hardware
    budget_usd         hard cap for this run (the agent's cost guard)
    max_hours          or null
    billing_started_at epoch seconds when billing started (create succeeded)
    heartbeat_grace_s  the watchdog acts after the controller has been silent this long
    provider           "vast" | "ssh" | "local"
    instance           {"gpu_name", "num_gpus", "offer_id", "instance_id"} (what the controller knows);
                       on Vast also "python" (the image's interpreter found on the instance) and
                       "env_file" (the 0600 file onstart wrote with CONTAINER_ID/_API_KEY);
                       on a machine shared by several runs also "seat" (the 0-based GPU this run
                       owns) and "seats" (how many runs share it; absent or 1 = the whole
                       machine), see :mod:`remote.seats`; price_per_hour is then the seat's share
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from remote.seats import seat_problem

PLAN_VERSION = 1
REQUIRED = ("version", "run_id", "name", "spec", "run_dir", "dataset_dir")


class PlanError(Exception):
    """plan.json is missing, unreadable or lacks a required key."""


def make_plan(
    *,
    run_id: str,
    spec: dict[str, Any],
    run_dir: str,
    dataset_dir: str,
    provider: str,
    price_per_hour: float = 0.0,
    billing_started_at: float | None = None,
    secrets_file: str | None = None,
    instance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    budget = spec.get("budget") or {}
    prov = spec.get("provider") or {}
    return {
        "version": PLAN_VERSION,
        "run_id": run_id,
        "name": spec["name"],
        "spec": spec,
        "run_dir": run_dir,
        "dataset_dir": dataset_dir,
        "secrets_file": secrets_file,
        "price_per_hour": float(price_per_hour),
        "budget_usd": float(budget.get("max_usd", 0.0)),
        "max_hours": budget.get("max_hours"),
        "billing_started_at": billing_started_at if billing_started_at is not None else time.time(),
        "heartbeat_grace_s": int(prov.get("heartbeat_grace_s", 900)),
        "bandwidth_url": (spec.get("gpu") or {}).get("bandwidth_check_url"),
        "provider": provider,
        "instance": instance or {},
    }


def load_plan(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PlanError(f"{path}: no such plan file") from exc
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: cannot read plan: {exc}") from exc
    missing = [key for key in REQUIRED if key not in plan]
    if missing:
        raise PlanError(f"{path}: plan lacks {', '.join(missing)}")
    if plan["version"] != PLAN_VERSION:
        raise PlanError(f"{path}: plan version {plan['version']} is not {PLAN_VERSION}")
    problem = seat_problem(plan)
    if problem:
        raise PlanError(f"{path}: {problem}")
    return plan


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON so a reader never sees a half-written file (temp file + fsync + os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a half-written copy
        raise
