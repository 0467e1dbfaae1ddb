"""``receipt.json``: what the run used and cost, for the user and for later cost estimates."""

from __future__ import annotations

import platform
from typing import Any

from remote import __version__


def stage_durations(status: dict[str, Any]) -> dict[str, float | None]:
    """Seconds each stage took in its last attempt (None when it did not run to an end)."""
    durations: dict[str, float | None] = {}
    for name, entry in (status.get("stages") or {}).items():
        begun, ended = entry.get("started_at"), entry.get("ended_at")
        durations[name] = round(ended - begun, 3) if begun is not None and ended else None
    return durations


def build_receipt(*, plan: dict[str, Any], status: dict[str, Any], hardware: dict[str, Any],
                  train: dict[str, Any], validation: dict[str, Any], spend_usd: float,
                  hours: float, started_at: float, ended_at: float, state: str) -> dict[str, Any]:
    """The receipt as a plain dict; ``train`` is the train stage's detail (steps, s/step)."""
    spec = plan.get("spec") or {}
    training = spec.get("training") or {}
    instance = plan.get("instance") or {}
    return {
        "run_id": plan.get("run_id"),
        "name": plan.get("name"),
        "state": state,
        "provider": plan.get("provider"),
        "instance": instance,
        "hardware": {
            "gpu": hardware.get("name") or instance.get("gpu_name") or "none (CPU)",
            "num_gpus": hardware.get("count") or 0,
            "vram_gb": [round(d.get("total_gb", 0), 1) for d in hardware.get("devices") or []],
            "driver": hardware.get("driver"),
            "cuda": hardware.get("cuda"),
            "cpu": hardware.get("cpu"),
            "cpu_count": hardware.get("cpu_count"),
            "ram_gb": hardware.get("ram_gb"),
            "platform": platform.platform(),
        },
        "trainer": training.get("trainer"),
        "base_model": spec.get("base_model"),
        "steps": {"planned": training.get("steps"), "done": train.get("step")},
        "s_per_step": train.get("s_per_step"),
        "durations_s": stage_durations(status),
        "hours": round(hours, 4),
        "price_per_hour": plan.get("price_per_hour"),
        "spend_usd": round(spend_usd, 4),
        "budget_usd": plan.get("budget_usd"),
        "started_at": started_at,
        "ended_at": ended_at,
        "validation": {"ok": validation.get("ok"), "lora": validation.get("lora"),
                       "samples": validation.get("samples")},
        "agent_version": __version__,
    }
