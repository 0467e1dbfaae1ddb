"""Which runs may share a machine, and what a run costs on a machine that is already set up.

A batch (``controller.batch.scheduler``) hands a finished run's machine to its next run when
their :func:`machine_key` matches: same provider, same ``gpu:`` section (offer filters, image,
disk), same base model and trainer (so ai-toolkit at its pinned commit and the ~33 GB of weights
in the instance's cache serve both). The next run then skips the machine's setup: renting and
booting, the image pull, the ai-toolkit install and the weights download
(:data:`MACHINE_SETUP_KEYS` of the planner's breakdown). It still pays its own dataset upload,
latent caching, training and bundle download.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.providers.base import Estimate
    from controller.spec.model import RunSpec

# The planner's setup times (``controller.planning.planner.estimate``) a machine pays once.
MACHINE_SETUP_KEYS = ("provision_s", "image_pull_s", "install_s", "weights_s")


def machine_key(spec: "RunSpec") -> str:
    """Runs with equal keys may run one after another on one machine."""
    data = spec.model_dump(mode="json")
    training = data.get("training") or {}
    return json.dumps({"provider": data.get("provider"), "gpu": data.get("gpu"),
                       "base_model": data.get("base_model"),
                       "trainer": training.get("trainer"),
                       "ai_toolkit": training.get("ai_toolkit")}, sort_keys=True)


def setup_seconds(breakdown: dict[str, Any]) -> float:
    """Seconds of a cold run's estimate that a machine spends on its setup."""
    return float(sum(float(breakdown.get(key) or 0.0) for key in MACHINE_SETUP_KEYS))


def setup_part(estimate: "Estimate") -> tuple[float, float]:
    """``(seconds, dollars)`` of ``estimate`` that are the machine's setup; ``(0, 0)`` when the
    estimate has no planner breakdown (own hardware: nothing to rent or install)."""
    chosen = getattr(getattr(estimate, "plan", None), "chosen", None)
    if chosen is None or estimate.est_usd is None:
        return 0.0, 0.0
    breakdown = chosen.breakdown
    seconds = setup_seconds(breakdown)
    boot_gb = float(breakdown.get("boot_gb") or 0.0)
    usd = float(chosen.dph_total) * seconds / 3600.0 + \
        float(chosen.offer.get("inet_down_cost") or 0.0) * boot_gb
    return seconds, min(usd, float(estimate.est_usd))


def warm_estimate(estimate: "Estimate") -> "Estimate":
    """The estimate for the same run on a machine already set up: the setup taken out."""
    seconds, usd = setup_part(estimate)
    if seconds <= 0 and usd <= 0:
        return estimate
    hours = None if estimate.est_hours is None else max(0.0, estimate.est_hours - seconds / 3600)
    return replace(estimate, est_usd=max(0.0, float(estimate.est_usd or 0.0) - usd),
                   est_hours=hours,
                   notes=[*estimate.notes, f"on a machine already set up: its setup "
                                           f"({seconds / 60:.0f} min, ${usd:.2f}) is not paid "
                                           f"again"])


def estimate_on_offer(spec: "RunSpec", offer: dict[str, Any], *,
                      measured: dict[str, float] | None = None) -> "Estimate":
    """The cold estimate of ``spec`` on one offer (the machine a batch run would take over),
    shaped as the Vast provider's ``estimate`` returns it."""
    from controller.planning.planner import PlanResult, estimate
    from controller.providers.base import Estimate

    chosen = estimate(spec, offer, measured_s_per_step=measured)
    result = PlanResult(chosen=chosen, offers=[chosen], excluded={},
                        budget_usd=spec.budget.max_usd, safety_margin=spec.budget.safety_margin,
                        max_hours=spec.budget.max_hours, considered=1)
    return Estimate.from_plan(result)
