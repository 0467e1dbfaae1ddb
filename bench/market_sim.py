"""A simulated Vast.ai market with a hidden truth the planner never sees (for ``bench_planner.py``).

Each *draw* makes a fresh market from a seed: offers with the real payload's fields (built by
``make_market_snapshot.make_offer`` from the reference offers), and, for every offer, a truth
drawn independently of what it advertises:

* **true seconds per step.** Per GPU model and draw, log-uniform over the range users publish
  (``PUBLISHED_S_PER_STEP``: the sources listed in ``controller/planning/gpu_priors.py`` and
  ``shared/reference/ai-toolkit/README.md`` "Throughput priors"); models without a published
  figure get a wide range around the interpolated prior and are marked so. Per host, times a
  log-normal factor (sigma ``HOST_SPEED_SIGMA``: CPU, PCIe, power limits, thermals).
* **true download speed.** ``inet_down`` is a speed test; what a 33 GB download really gets is
  a fraction of it with a large spread: a Vast user saw ~3 MB/s (~25 Mb/s) on a host
  advertising 758 (vast-ai/vast-sdk issue 13), and Hugging Face serves one connection at about
  40 MB/s (~320 Mb/s; korshunov.ai, "Hugging Face blocks multi-threaded downloads"). So:
  ``advertised x efficiency`` with log-normal efficiency (median ``DOWN_EFF_MEDIAN``, sigma
  ``DOWN_EFF_SIGMA``, clipped to 3-100 %), capped by a per-draw hub cap (``HUB_CAP_MBPS``).
* **true overheads**: provision and boot, install, quantize, fixed stages, each drawn around the
  planner's constant (``OVERHEAD_SPREAD``): an instance "can sit in loading for many minutes"
  (shared/reference/vast/README.md).
* **host failure**: the host dies during the run with probability ``(1 - reliability) x U(0, 3)``
  (advertised reliability is a history, not a promise); it dies at a uniform point and the run
  starts over on an identical host, paying for both.

The realised cost of a run on an offer is ``dph_total x true hours + bandwidth``; the run
finishes only if that is within ``budget.max_usd`` (the meter stops it at the cap otherwise, and
the cap is what was spent). Resolution and batch scaling of a step is the planner's own
(``step_s_effective / s_per_step`` of its breakdown): it is physics, not a belief being tested.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from make_market_snapshot import _templates, make_offer

from controller.planning.planner import INSTALL_CPU_S, OfferEstimate, estimate

# (low, high) s/step for a Flux-dev LoRA, batch 1, ~1024 px, and whether a source publishes it.
PUBLISHED_S_PER_STEP: dict[str, tuple[float, float, bool]] = {
    "H100 SXM": (1.3, 1.8, True),  # SimpleTuner docs; HF flux-qlora blog
    "H100 PCIE": (1.3, 1.8, True),  # same H100 range
    "A100 SXM4": (1.5, 2.5, False),  # no primary figure (reference README)
    "A100 PCIE": (1.5, 2.5, False),
    "L40S": (1.4, 2.1, True),  # SimpleTuner docs (Chroma)
    "RTX 6000Ada": (1.6, 3.0, False),  # same die as L40S, lower clocks
    "RTX PRO 6000 WS": (1.5, 3.2, False),  # no figure; larger Blackwell die than the 5090
    "RTX 5090": (1.8, 3.4, False),  # "~2.5, interpolated from 4090"
    "RTX 4090": (1.5, 3.5, True),  # SimpleTuner (NF4), HF blog, ComfyUI-FluxTrainer #81
    "RTX A6000": (6.5, 8.0, True),  # kohya_ss #2701
    "A40": (6.5, 8.0, True),  # ai-toolkit #145
    "RTX 3090": (4.5, 10.0, True),  # fluxgym #57, ai-toolkit #225
    "Tesla V100": (8.0, 30.0, False),  # no bf16; nothing published for Flux
    "RTX 4080": (3.0, 6.0, False),  # filtered out by VRAM (16 GB) anyway
    "RTX 3080": (6.0, 14.0, False),  # filtered out by VRAM (10 GB) anyway
}
HOST_SPEED_SIGMA = 0.10
DOWN_EFF_MEDIAN = 0.45
DOWN_EFF_SIGMA = 0.8
HUB_CAP_MBPS = (300.0, 2500.0)  # one HF connection ~320 Mb/s; hf_transfer/xet several times that
OVERHEAD_SPREAD = (0.6, 2.5)  # true overhead = planner's constant x log-uniform in this range
FAILURE_SCALE = (0.0, 3.0)
OFFERS_PER_DRAW = 200

# Vast's default order is ``score`` descending (vast-cli ``vast.py`` ``search__offers``:
# ``--order`` default ``'score-'``; ``vastai/api/offers.py``: ``q["order"] = [["score",
# "desc"]]``), with the default query verified=true, external=false, rentable=true,
# rented=false. The score is computed by the server and not documented: this is a
# least-squares fit of log(score) on log(dlperf) and log(dph_total) over the five real offers
# in shared/reference/vast/search_offers_*.json (within 30 % of each of them).
SCORE_FIT = (-1.5876, 1.3581, -0.9881)


def vast_score(offer: dict[str, Any]) -> float:
    a, b, c = SCORE_FIT
    return math.exp(a + b * math.log(max(float(offer["dlperf"]), 1e-3))
                    + c * math.log(max(float(offer["dph_total"]), 1e-4)))


def _loguniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


@dataclass
class Truth:
    """What an offer really does in one draw (hidden from the planner)."""

    s_per_step: float
    down_mbps: float
    overhead_factor: float
    fails_at: float | None  # fraction of the run at which the host dies, or None


@dataclass
class Market:
    offers: list[dict[str, Any]]
    truth: dict[int, Truth]


def draw_truth(rng: random.Random, offer: dict[str, Any], model_s: float | None = None,
               hub_cap: float | None = None) -> Truth:
    """The truth of one offer; ``model_s`` / ``hub_cap`` are shared by a market's offers."""
    lo, hi, _ = PUBLISHED_S_PER_STEP[offer["gpu_name"]]
    model_s = model_s if model_s is not None else _loguniform(rng, lo, hi)
    hub_cap = hub_cap if hub_cap is not None else _loguniform(rng, *HUB_CAP_MBPS)
    eff = min(1.0, max(0.03, DOWN_EFF_MEDIAN * math.exp(rng.gauss(0.0, DOWN_EFF_SIGMA))))
    p_fail = (1.0 - float(offer["reliability2"])) * rng.uniform(*FAILURE_SCALE)
    return Truth(
        s_per_step=model_s * math.exp(rng.gauss(0.0, HOST_SPEED_SIGMA)),
        down_mbps=min(float(offer["inet_down"]) * eff, hub_cap),
        overhead_factor=_loguniform(rng, *OVERHEAD_SPREAD),
        fails_at=rng.random() if rng.random() < p_fail else None,
    )


def draw_market(rng: random.Random, templates: list[dict[str, Any]] | None = None,
                count: int = OFFERS_PER_DRAW) -> Market:
    """One market: ``count`` offers and the truth of each, independent of what they advertise."""
    templates = templates or _templates()
    model_s = {name: _loguniform(rng, lo, hi) for name, (lo, hi, _) in
               PUBLISHED_S_PER_STEP.items()}
    hub_cap = _loguniform(rng, *HUB_CAP_MBPS)
    offers, truth = [], {}
    for n in range(count):
        offer = make_offer(rng, templates[n % len(templates)], 70000000 + n * 131)
        offer["score"] = round(vast_score(offer), 3)
        truth[offer["id"]] = draw_truth(rng, offer, model_s[offer["gpu_name"]], hub_cap)
        offers.append(offer)
    return Market(offers=offers, truth=truth)


def true_seconds(est: OfferEstimate, truth: Truth) -> float:
    """Billed seconds of the run on this offer: the planner's breakdown re-timed by the truth."""
    b = est.breakdown
    speed = truth.s_per_step / b["s_per_step"]  # the prior (or fallback) vs the truth
    down = max(b["download_mbps_effective"], 1.0) / max(truth.down_mbps, 1.0)
    install_transfer = b["install_s"] - INSTALL_CPU_S
    seconds = (
        b["provision_s"] * truth.overhead_factor
        + b["image_pull_s"] * down
        + INSTALL_CPU_S * truth.overhead_factor + max(install_transfer, 0.0) * down
        + b["weights_s"] * down
        + b["quantize_latents_s"] * speed * truth.overhead_factor
        + (b["train_s"] + b["sampling_s"]) * speed
        + b["dataset_upload_s"] + b["bundle_download_s"]
        + b["fixed_stages_s"] * truth.overhead_factor
    )
    if truth.fails_at is not None:
        seconds *= 1.0 + truth.fails_at  # the part done before the host died, then all again
    return seconds


def realised_usd(est: OfferEstimate, truth: Truth) -> float:
    """What the run on this offer really costs: compute over the true hours, plus bandwidth."""
    return est.dph_total * true_seconds(est, truth) / 3600 + est.breakdown["bandwidth_usd"]


def true_costs(spec: Any, market: Market, eligible: list[dict[str, Any]]) -> dict[int, float]:
    """Realised $ of the run on every eligible offer (uncapped)."""
    return {o["id"]: realised_usd(estimate(spec, o), market.truth[o["id"]]) for o in eligible}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
