"""Pick the Vast.ai offer that finishes the run for the fewest dollars within the budget.

Two steps:
    1. :func:`search_query` turns the spec's ``gpu`` / ``budget`` sections into the filters
       the search API applies itself (units as in the offers: ``gpu_ram``/``cpu_ram`` MB,
       ``disk_space`` GB, ``inet_down`` Mb/s, ``dph_total`` $/h including the disk we ask for).
    2. :func:`plan_offers` re-checks every filter locally (counting exclusions by reason) and
       ranks what is left by the estimated dollars of the whole run, not by $/h:

           hours = (provision + image pull + install + weights + quantize/latents + steps x
                    s/step + sampling + transfers + fixed stages) / 3600, then
                   + expected restarts (interruptible: each pays the setup again and the
                     steps since the last checkpoint home) + (1 - reliability) x hours
           est $ = dph_total x hours + inet_down_cost x GB in + inet_up_cost x GB out

       An offer is chosen only when ``est $ x (1 + safety_margin) <= budget.max_usd`` and,
       when set, ``hours <= budget.max_hours``.

Every constant of the cost model is here with the reason for its value; the per-offer
``breakdown`` shows the arithmetic.
"""

from __future__ import annotations

import time

from dataclasses import dataclass
from typing import Any, Callable

from controller.errors import BudgetError
from controller.planning.gpu_priors import seconds_per_step
from controller.spec.model import RunSpec
from remote.aitk_config import scaled_every

SEARCH_LIMIT = 64
MB_PER_GB = 1000  # Vast reports a 24 GB card as gpu_ram 24564 (MB): 1 GB = 1000 MB keeps it in

# -- cost model constants -------------------------------------------------------------------
PROVISION_S = 90.0  # contract accepted -> container starting (Vast, typical)
BOOT_S = 60.0  # container start, sshd, our key attached
IMAGE_GB_DEVEL = 10.0  # pytorch/pytorch *-devel images, compressed
IMAGE_GB_RUNTIME = 4.0  # *-runtime images
IMAGE_GB_OTHER = 8.0  # anything else (custom images are usually CUDA devel based)
INSTALL_GB = 6.0  # ai-toolkit's wheels: torch + CUDA libs dominate
INSTALL_CPU_S = 180.0  # unpacking and installing them
WEIGHTS_GB = 33.0  # FLUX.1 transformer + text encoders + VAE, as downloaded from the hub
QUANTIZE_S = 240.0  # loading and quantizing the transformer at start
LATENT_S_PER_IMAGE = 0.6  # caching latents, per image and resolution bucket
DEFAULT_IMAGES = 30  # when the dataset size is not known
FIXED_STAGES_S = 120.0  # checks, ingest, gate, validate, publish
# Advertised inet_down is a speed test; hub and registry downloads get a fraction of it and
# rarely more than a few Gb/s per host.
DOWN_EFFICIENCY = 0.6
DOWN_CAP_MBPS = 3000.0
# The laptop's own link bounds the dataset upload and the bundle download (same for all offers).
LAPTOP_UP_MBPS = 40.0
LAPTOP_DOWN_MBPS = 200.0
DEFAULT_DATASET_GB = 0.2
BUNDLE_GB = 0.3  # LoRA + samples + report
# A denoising step at inference is roughly a third of a training step (no backward pass).
SAMPLE_STEP_FRACTION = 0.35
DEFAULT_RESOLUTIONS = (512, 768, 1024)  # what the s/step priors were measured on, roughly
# Interruptible (bid) instances: expected outbids per hour, and what each one costs us. A lost
# machine is replaced by a new one (controller.run.relaunch), so a restart pays the whole setup
# again (provision, image, install, weights, quantize, dataset upload) plus the steps trained
# since the last checkpoint that came home: on average half a save interval.
INTERRUPTS_PER_HOUR = 0.15
# save_every for bid offers (when the spec leaves it open): a restart should lose about this much
# training on average (half an interval). Saves then come every 10 minutes: each writes the LoRA
# and brings it home (tens of MB), small against that.
BID_LOSS_TARGET_S = 300.0
SETUP_KEYS = ("provision_s", "image_pull_s", "install_s", "weights_s", "quantize_latents_s",
              "dataset_upload_s")


@dataclass
class OfferEstimate:
    """One offer with its estimated hours and dollars for the whole run."""

    offer_id: int
    gpu_name: str
    num_gpus: int
    dph_total: float
    est_hours: float
    est_usd: float
    breakdown: dict[str, Any]
    offer: dict[str, Any]
    interruptible: bool = False
    fits: bool = True
    refused: str | None = None  # "budget" | "max_hours" when it does not fit
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "offer_id": self.offer_id,
            "gpu_name": self.gpu_name,
            "num_gpus": self.num_gpus,
            "dph_total": round(self.dph_total, 4),
            "est_hours": round(self.est_hours, 3),
            "est_usd": round(self.est_usd, 3),
            "inet_down": self.offer.get("inet_down"),
            "reliability": _reliability(self.offer),
            "location": self.offer.get("geolocation"),
            "interruptible": self.interruptible,
            "fits": self.fits,
            "refused": self.refused,
            "why": self.why,
            "breakdown": self.breakdown,
        }


@dataclass
class PlanResult:
    chosen: OfferEstimate | None
    offers: list[OfferEstimate]  # passed the filters, cheapest estimate first
    excluded: dict[str, int]  # reason -> offers dropped for it (first failing reason)
    budget_usd: float
    safety_margin: float
    max_hours: float | None = None
    considered: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "offers": [o.to_dict() for o in self.offers],
            "excluded": dict(self.excluded),
            "budget_usd": self.budget_usd,
            "safety_margin": self.safety_margin,
            "max_hours": self.max_hours,
            "considered": self.considered,
        }

    def refusal(self) -> str:
        """Why nothing was chosen, naming the cheapest estimate and the limits that bit."""
        filtered = ", ".join(f"{k} {v}" for k, v in sorted(self.excluded.items(),
                                                            key=lambda kv: -kv[1]))
        if not self.offers:
            return (f"no offer passes the filters ({self.considered} offers looked at"
                    + (f"; excluded: {filtered}" if filtered else "") + ")")
        cheapest = self.offers[0]
        if cheapest.refused == "max_hours":
            over = f"{cheapest.est_hours:.2f} h is over max_hours {self.max_hours}"
        else:
            with_margin = cheapest.est_usd * (1 + self.safety_margin)
            over = (f"${with_margin:.2f} with the {self.safety_margin:.0%} safety margin is "
                    f"over the budget ${self.budget_usd:.2f}")
        return (f"no offer fits: the cheapest estimate is ${cheapest.est_usd:.2f} "
                f"({cheapest.gpu_name}, offer {cheapest.offer_id}, {cheapest.est_hours:.2f} h); "
                f"{over}; excluded: {filtered}")

    def require_chosen(self) -> OfferEstimate:
        """The chosen offer, or BudgetError (exit 3) saying why there is none."""
        if self.chosen is None:
            raise BudgetError(
                self.refusal(),
                hint="raise budget.max_usd / max_hours, or relax the gpu filters in the spec",
            )
        return self.chosen


# -- search ---------------------------------------------------------------------------------


def search_query(spec: RunSpec, *, interruptible: bool = False) -> dict[str, Any]:
    """The ``POST /api/v0/bundles/`` body for this spec (``type`` bid when ``interruptible``)."""
    gpu = spec.gpu
    query: dict[str, Any] = {
        "gpu_ram": {"gte": gpu.min_vram_gb * MB_PER_GB},
        "cpu_ram": {"gte": gpu.min_ram_gb * MB_PER_GB},
        "disk_space": {"gte": gpu.disk_gb},
        "inet_down": {"gte": gpu.min_inet_down_mbps},
        "reliability2": {"gte": gpu.min_reliability},
        "direct_port_count": {"gte": 1},
        "num_gpus": {"eq": gpu.num_gpus},
        "rentable": {"eq": True},
        "rented": {"eq": False},
    }
    if gpu.verified_only:
        query["verified"] = {"eq": True}
    if gpu.datacenter_only:
        query["datacenter"] = {"eq": True}
    if gpu.names:
        query["gpu_name"] = {"in": list(gpu.names)}
    cuda: dict[str, float] = {}
    if gpu.min_cuda is not None:
        cuda["gte"] = gpu.min_cuda
    if gpu.max_cuda is not None:
        cuda["lte"] = gpu.max_cuda
    if cuda:
        query["cuda_max_good"] = cuda
    if gpu.min_driver:
        query["driver_vers"] = {"gte": _driver_number(gpu.min_driver)}
    if spec.budget.max_usd_per_hour is not None:
        query["dph_total"] = {"lte": spec.budget.max_usd_per_hour}
    query["order"] = [["dph_total", "asc"]]
    query["type"] = "bid" if interruptible else "on-demand"
    query["limit"] = SEARCH_LIMIT
    query["allocated_storage"] = gpu.disk_gb
    return query


def search_queries(spec: RunSpec) -> list[dict[str, Any]]:
    """On-demand always; interruptible too when the spec allows it."""
    queries = [search_query(spec)]
    if spec.gpu.interruptible:
        queries.append(search_query(spec, interruptible=True))
    return queries


def mark_interruptible(offers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tag offers from a ``type: bid`` search (the offer itself does not say so)."""
    return [{**o, "_interruptible": True} for o in offers]


# -- local filters --------------------------------------------------------------------------


def _driver_number(version: str) -> int:
    """'575.57.08' -> 575057008, the encoding of the offers' ``driver_vers``."""
    parts = [int(p) for p in (str(version).split(".") + ["0", "0"])[:3] if p.isdigit()]
    parts += [0] * (3 - len(parts))
    return parts[0] * 1_000_000 + parts[1] * 1_000 + parts[2]


def _reliability(offer: dict[str, Any]) -> float:
    value = offer.get("reliability2", offer.get("reliability"))
    return float(value) if value is not None else 0.0


def _num(offer: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = offer.get(key)
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _checks(spec: RunSpec) -> list[tuple[str, Callable[[dict[str, Any]], bool]]]:
    """(reason, passes) in the order reasons are reported: hard floors first."""
    gpu, budget = spec.gpu, spec.budget
    names = {n.strip().upper() for n in gpu.names}
    checks: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
        ("not_rentable", lambda o: o.get("rentable", True) is not False and not o.get("rented")),
        ("interruptible_not_allowed", lambda o: gpu.interruptible or not o.get("_interruptible")),
        ("gpu_name", lambda o: not names or str(o.get("gpu_name", "")).upper() in names),
        ("num_gpus", lambda o: int(_num(o, "num_gpus", 1)) == gpu.num_gpus),
        ("vram", lambda o: _num(o, "gpu_ram") >= gpu.min_vram_gb * MB_PER_GB),
        ("ram", lambda o: _num(o, "cpu_ram") >= gpu.min_ram_gb * MB_PER_GB),
        ("disk", lambda o: _num(o, "disk_space") >= gpu.disk_gb),
        ("cuda", lambda o: (gpu.min_cuda is None or _num(o, "cuda_max_good") >= gpu.min_cuda)
         and (gpu.max_cuda is None or _num(o, "cuda_max_good") <= gpu.max_cuda)),
        ("driver", lambda o: not gpu.min_driver or _driver_number(
            str(o.get("driver_version") or "0")) >= _driver_number(gpu.min_driver)),
        ("reliability", lambda o: _reliability(o) >= gpu.min_reliability),
        ("inet_down", lambda o: _num(o, "inet_down") >= gpu.min_inet_down_mbps),
        ("direct_ssh", lambda o: _num(o, "direct_port_count") >= 1),
        ("unverified", lambda o: not gpu.verified_only or o.get("verification") == "verified"
         or o.get("verified") is True),
        ("not_datacenter", lambda o: not gpu.datacenter_only or _num(o, "hosting_type") >= 1
         or o.get("datacenter") is True),
        ("price_per_hour", lambda o: budget.max_usd_per_hour is None
         or _num(o, "dph_total") <= budget.max_usd_per_hour),
    ]
    return checks


def exclusion_reason(spec: RunSpec, offer: dict[str, Any]) -> str | None:
    """The first filter this offer fails, or None when it passes them all."""
    for reason, passes in _checks(spec):
        if not passes(offer):
            return reason
    return None


# -- the estimate ---------------------------------------------------------------------------


def _image_gb(image: str) -> float:
    if "devel" in image:
        return IMAGE_GB_DEVEL
    if "runtime" in image:
        return IMAGE_GB_RUNTIME
    return IMAGE_GB_OTHER


def boot_download_gb(spec: RunSpec) -> float:
    """GB an instance downloads for a run besides the dataset: the image, the installs and the
    weights (what the estimate counts at ``inet_down_cost``)."""
    return _image_gb(spec.gpu.image) + INSTALL_GB + WEIGHTS_GB


def _transfer_s(gb: float, mbps: float) -> float:
    return gb * 8000.0 / max(mbps, 1.0)


def sample_every(spec: RunSpec) -> int:
    """Steps between sample events: the spec's, else what the generated config will use."""
    return spec.training.sample.every or scaled_every(spec.training.steps)


def bid_save_every(steps: int, step_s: float) -> int:
    """Steps between checkpoints on a bid machine: about ``2 x BID_LOSS_TARGET_S`` of training
    (so an outbid loses ``BID_LOSS_TARGET_S`` on average), and never fewer saves than an
    on-demand run of ``steps`` makes."""
    every = round(2 * BID_LOSS_TARGET_S / max(step_s, 1e-6))
    return int(max(1, min(every, scaled_every(steps))))


def estimate(spec: RunSpec, offer: dict[str, Any], *,
             measured_s_per_step: dict[str, float] | None = None,
             dataset_gb: float = DEFAULT_DATASET_GB,
             num_images: int = DEFAULT_IMAGES) -> OfferEstimate:
    """The whole-run estimate for one offer (no filtering, no budget check)."""
    training = spec.training
    s_step, source = seconds_per_step(offer, measured_s_per_step)
    res = training.resolutions
    res_factor = (sum(r * r for r in res) / len(res)) / (
        sum(r * r for r in DEFAULT_RESOLUTIONS) / len(DEFAULT_RESOLUTIONS))
    batch_factor = training.batch_size * training.gradient_accumulation_steps
    step_s = s_step * max(res_factor, 0.25) * batch_factor

    inet_down = _num(offer, "inet_down", 1.0)
    inet_up = _num(offer, "inet_up", inet_down)
    down_mbps = min(inet_down * DOWN_EFFICIENCY, DOWN_CAP_MBPS)
    image_gb = _image_gb(spec.gpu.image)
    times = {
        "provision_s": PROVISION_S + BOOT_S,
        "image_pull_s": _transfer_s(image_gb, down_mbps),
        "install_s": INSTALL_CPU_S + _transfer_s(INSTALL_GB, down_mbps),
        "weights_s": _transfer_s(WEIGHTS_GB, down_mbps),
        "quantize_latents_s": (QUANTIZE_S if training.quantize else 0.0)
        + LATENT_S_PER_IMAGE * num_images * len(res),
        "train_s": training.steps * step_s,
        "sampling_s": 0.0,
        "dataset_upload_s": _transfer_s(dataset_gb, min(LAPTOP_UP_MBPS, down_mbps)),
        "bundle_download_s": _transfer_s(BUNDLE_GB, min(LAPTOP_DOWN_MBPS, inet_up)),
        "fixed_stages_s": FIXED_STAGES_S,
    }
    sample = training.sample
    events = 0
    if sample.enabled and sample.prompts:
        events = training.steps // sample_every(spec) + 1  # +1: the baseline before training
        sample_steps = sample.steps or (4 if spec.is_schnell else 20)
        pixels = sample.width * sample.height / (1024 * 1024)
        per_image = sample_steps * s_step * SAMPLE_STEP_FRACTION * pixels
        times["sampling_s"] = len(sample.prompts) * events * per_image
    base_s = sum(times.values())

    interruptible = bool(offer.get("_interruptible"))
    restart_s = 0.0
    save_every = training.save_every or scaled_every(training.steps)
    restarts = setup_again_s = lost_s = 0.0
    if interruptible:
        save_every = training.save_every or bid_save_every(training.steps, step_s)
        lost_s = save_every / 2 * step_s  # on average half a save interval is redone
        setup_again_s = sum(times[k] for k in SETUP_KEYS)
        restarts = INTERRUPTS_PER_HOUR * base_s / 3600
        restart_s = restarts * (setup_again_s + lost_s)
    risk_s = (1.0 - min(_reliability(offer), 1.0)) * base_s  # a failed host means starting over
    total_s = base_s + restart_s + risk_s
    hours = total_s / 3600

    dph = _num(offer, "dph_total")
    down_gb = boot_download_gb(spec) + dataset_gb
    up_gb = BUNDLE_GB
    compute_usd = dph * hours
    bandwidth_usd = _num(offer, "inet_down_cost") * down_gb + _num(offer, "inet_up_cost") * up_gb
    est_usd = compute_usd + bandwidth_usd
    breakdown: dict[str, Any] = {
        "s_per_step": round(s_step, 3),
        "s_per_step_source": source,
        "step_s_effective": round(step_s, 3),
        "steps": training.steps,
        "sample_events": events,
        "download_mbps_effective": round(down_mbps, 1),
        **{k: round(v, 1) for k, v in times.items()},
        "restart_s": round(restart_s, 1),
        "host_failure_risk_s": round(risk_s, 1),
        "total_s": round(total_s, 1),
        "hours": round(hours, 4),
        "dph_total": dph,
        "compute_usd": round(compute_usd, 4),
        "down_gb": round(down_gb, 2),
        "boot_gb": round(boot_download_gb(spec), 2),
        "up_gb": round(up_gb, 2),
        "bandwidth_usd": round(bandwidth_usd, 4),
        "est_usd": round(est_usd, 4),
        "formula": "dph_total x total_s / 3600 + inet_down_cost x down_gb + inet_up_cost x up_gb",
    }
    if interruptible:
        breakdown["bid_price"] = _num(offer, "min_bid", _num(offer, "dph_base"))
        breakdown.update({"save_every": save_every, "expected_restarts": round(restarts, 3),
                          "restart_setup_s": round(setup_again_s, 1),
                          "restart_lost_steps": round(save_every / 2, 1),
                          "restart_lost_s": round(lost_s, 1)})
    return OfferEstimate(
        offer_id=int(offer.get("id") or offer.get("ask_contract_id") or 0),
        gpu_name=str(offer.get("gpu_name") or "?"),
        num_gpus=int(_num(offer, "num_gpus", 1)),
        dph_total=dph,
        est_hours=hours,
        est_usd=est_usd,
        breakdown=breakdown,
        offer=offer,
        interruptible=interruptible,
    )


def _why(est: OfferEstimate, best: OfferEstimate | None) -> str:
    b = est.breakdown
    if best is None or est is best:
        return f"cheapest run: {b['s_per_step']} s/step, weights in {b['weights_s'] / 60:.0f} min"
    dph = est.dph_total
    diffs = {
        f"slower GPU ({b['s_per_step']} s/step)":
            (b["train_s"] + b["sampling_s"]) * dph / 3600
            - (best.breakdown["train_s"] + best.breakdown["sampling_s"]) * best.dph_total / 3600,
        f"slow download ({est.offer.get('inet_down', 0):.0f} Mb/s)":
            (b["image_pull_s"] + b["install_s"] + b["weights_s"]) * dph / 3600
            - (best.breakdown["image_pull_s"] + best.breakdown["install_s"]
               + best.breakdown["weights_s"]) * best.dph_total / 3600,
        "higher $/h": (dph - best.dph_total) * best.est_hours,
        "bandwidth charges": b["bandwidth_usd"] - best.breakdown["bandwidth_usd"],
        "restart/failure risk": (b["restart_s"] + b["host_failure_risk_s"]) * dph / 3600
            - (best.breakdown["restart_s"] + best.breakdown["host_failure_risk_s"])
            * best.dph_total / 3600,
    }
    reason = max(diffs, key=lambda k: diffs[k])
    return f"+${est.est_usd - best.est_usd:.2f}: {reason}"


# After the estimate (with the safety margin): time to fetch the bundle before the host's
# contract ends (an instance whose contract ends is stopped and cannot be started again).
CONTRACT_MARGIN_S = 3600.0
ENDS_TOO_SOON = "offer ends too soon"


def seconds_left(offer: dict[str, Any], now: float) -> float | None:
    """How long the offer's machine stays rentable: ``duration`` (seconds left as of the search;
    vast-cli query.py ``offers_mult`` turns the CLI's days into these seconds), else
    ``end_date`` (epoch seconds) minus ``now``; None when the offer says neither."""
    for key, base in (("duration", 0.0), ("end_date", now)):
        try:
            return float(offer[key]) - base
        except (KeyError, TypeError, ValueError):
            continue
    return None


def plan_offers(
    spec: RunSpec,
    offers: list[dict[str, Any]],
    *,
    measured_s_per_step: dict[str, float] | None = None,
    dataset_gb: float = DEFAULT_DATASET_GB,
    num_images: int = DEFAULT_IMAGES,
    now: float | None = None,
) -> PlanResult:
    """Filter ``offers`` locally and rank them by estimated dollars for the whole run.

    ``measured_s_per_step`` maps gpu_name -> seconds per step measured on the user's own runs;
    it overrides the priors. Nothing is raised when nothing fits: ``chosen`` is None and
    :meth:`PlanResult.require_chosen` raises BudgetError with the reason.
    """
    excluded: dict[str, int] = {}
    estimates: list[OfferEstimate] = []
    seen: set[tuple[int, bool]] = set()  # one machine can be offered on-demand and as a bid
    for offer in offers:
        key = (int(offer.get("id") or 0), bool(offer.get("_interruptible")))
        reason = exclusion_reason(spec, offer)
        if reason is None and key in seen:
            reason = "duplicate"
        if reason is not None:
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        seen.add(key)
        estimates.append(estimate(spec, offer, measured_s_per_step=measured_s_per_step,
                                  dataset_gb=dataset_gb, num_images=num_images))
    estimates.sort(key=lambda e: (e.est_usd, -_reliability(e.offer), e.offer_id))

    budget = spec.budget
    now = time.time() if now is None else now
    for est in estimates:
        left = seconds_left(est.offer, now)
        needed = est.est_hours * 3600 * (1 + budget.safety_margin) + CONTRACT_MARGIN_S
        if left is not None and left < needed:
            est.fits, est.refused = False, ENDS_TOO_SOON
        elif est.est_usd * (1 + budget.safety_margin) > budget.max_usd:
            est.fits, est.refused = False, "budget"
        elif budget.max_hours is not None and est.est_hours > budget.max_hours:
            est.fits, est.refused = False, "max_hours"
        if est.refused:
            excluded[est.refused] = excluded.get(est.refused, 0) + 1
    chosen = next((e for e in estimates if e.fits), None)
    for est in estimates:
        est.why = _why(est, chosen or (estimates[0] if estimates else None))
    return PlanResult(
        chosen=chosen,
        offers=estimates,
        excluded=excluded,
        budget_usd=budget.max_usd,
        safety_margin=budget.safety_margin,
        max_hours=budget.max_hours,
        considered=len(offers),
    )
