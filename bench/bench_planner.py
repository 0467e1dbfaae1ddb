"""Planner value, measured against a market whose truth the planner does not see.

For each of ``--draws`` seeded draws, ``market_sim.draw_market`` makes 200 offers (real payload
fields) and, hidden from the planner, each offer's true seconds per step, true download speed,
true overheads and whether its host dies (see ``market_sim``'s docstring for the distributions
and their sources). For each run shape, the budget is drawn between 0.8x and 2.5x the cheapest
true finish among the offers that pass the spec's filters, and three choices are made:

* planner     ``controller.planning.planner.plan_offers`` (estimate x (1 + safety_margin) must
              fit the budget, or nothing is rented)
* lowest $/h  the cheapest ``dph_total`` that passes the filters (rented whatever the budget)
* default     Vast's default order: the highest ``score`` (``market_sim.vast_score``)

Each pick's cost comes from the truth; the meter stops a run at the budget (spent = budget, no
LoRA). Reported: realised $ per finished run (all dollars spent / runs finished) for each
strategy, the spread over draws of planner / baseline, how often the planner refused or ran out
of budget when some offer would have finished within it, and the planner's estimate error
(realised / estimate - 1: mean and 90th percentile; compare with ``budget.safety_margin``).
Results go to ``bench/results/planner.json``.

Any of these can come out badly: priors that are too optimistic (true s/step above the prior)
push the error and its p90 up and make planned runs hit the cap; an efficiency of downloads
below what the planner assumes (``DOWN_EFFICIENCY``) favours slow-network offers wrongly; a
planner that ranks worse than $/h shows a ratio above 1.

Run: ``python bench/bench_planner.py [--draws 300] [--seed 18]``
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from market_sim import _templates, draw_market, percentile, true_costs  # noqa: E402

from controller.planning.planner import exclusion_reason, plan_offers  # noqa: E402
from controller.spec.model import RunSpec  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "flux-dev 2000 steps (defaults)": {},
    "flux-dev 500 steps": {"training": {"steps": 500}},
    "flux-dev 4000 steps, 1024 px": {"training": {"steps": 4000, "resolutions": [1024]}},
    "flux-schnell 1000 steps": {"base_model": "flux-schnell", "training": {"steps": 1000}},
}
STRATEGIES = ("planner", "lowest_dph", "default_order")
BUDGET_RANGE = (0.8, 2.5)  # x the cheapest true finish (below 1: nothing can finish)
DEFAULT_DRAWS = 300
SEED = 18


def make_spec(overrides: dict[str, Any], max_usd: float = 1000.0) -> RunSpec:
    data: dict[str, Any] = {"name": "bench", "dataset": {"path": "/nonexistent"},
                            "budget": {"max_usd": round(max_usd, 4)}}
    data.update(overrides)
    return RunSpec.model_validate(data)


def one_run(overrides: dict[str, Any], offers: list[dict[str, Any]], market: Any,
            rng: random.Random) -> dict[str, Any] | None:
    """The three picks on one market for one shape, priced by the truth (None: nothing fits)."""
    base = make_spec(overrides)
    eligible = [o for o in offers if exclusion_reason(base, o) is None]
    if not eligible:
        return None
    costs = true_costs(base, market, eligible)
    best = min(costs.values())
    budget = best * math.exp(rng.uniform(math.log(BUDGET_RANGE[0]), math.log(BUDGET_RANGE[1])))
    spec = make_spec(overrides, budget)
    started = time.perf_counter()
    plan = plan_offers(spec, offers)
    plan_ms = (time.perf_counter() - started) * 1000
    picks: dict[str, int | None] = {
        "planner": plan.chosen.offer_id if plan.chosen else None,
        "lowest_dph": min(eligible, key=lambda o: o["dph_total"])["id"],
        "default_order": max(eligible, key=lambda o: o["score"])["id"],
    }
    out: dict[str, Any] = {"budget": budget, "best": best, "plan_ms": plan_ms,
                           "finish_possible": best <= spec.budget.max_usd}
    for name, offer_id in picks.items():
        cost = costs[offer_id] if offer_id is not None else None
        finished = cost is not None and cost <= spec.budget.max_usd
        out[name] = {"offer_id": offer_id, "realised": cost, "finished": finished,
                     "spent": 0.0 if cost is None else min(cost, spec.budget.max_usd)}
    if plan.chosen is not None:
        out["planner"]["estimate"] = plan.chosen.est_usd
    top = plan.offers[0] if plan.offers else None  # its first choice, budget or not
    if top is not None:
        out["estimate_error"] = costs[top.offer_id] / top.est_usd - 1.0
    return out


def summarise(runs: list[dict[str, Any]], safety_margin: float) -> dict[str, Any]:
    """Per-strategy $ per finished run, spread of the ratios, refusals, estimate error."""
    result: dict[str, Any] = {"runs": len(runs)}
    for name in STRATEGIES:
        spent = sum(r[name]["spent"] for r in runs)
        finished = sum(1 for r in runs if r[name]["finished"])
        result[name] = {"spent_usd": round(spent, 2), "finished": finished,
                        "usd_per_finished_run": round(spent / finished, 3) if finished else None}
    for name in ("lowest_dph", "default_order"):
        ratios = [r["planner"]["realised"] / r[name]["realised"] for r in runs
                  if r["planner"]["realised"] is not None]
        per = result["planner"]["usd_per_finished_run"], result[name]["usd_per_finished_run"]
        result[f"vs_{name}"] = {
            "ratio_usd_per_finished_run": round(per[0] / per[1], 3) if all(per) else None,
            "per_draw_ratio_p10": round(percentile(ratios, 10), 3) if ratios else None,
            "per_draw_ratio_median": round(percentile(ratios, 50), 3) if ratios else None,
            "per_draw_ratio_p90": round(percentile(ratios, 90), 3) if ratios else None,
            "planner_dearer_share": round(sum(x > 1 for x in ratios) / len(ratios), 3)
            if ratios else None,
        }
    refused = [r for r in runs if r["planner"]["offer_id"] is None]
    capped = [r for r in runs if r["planner"]["offer_id"] is not None
              and not r["planner"]["finished"]]
    result["refused_before_renting"] = len(refused)
    result["refused_though_a_finish_existed"] = sum(r["finish_possible"] for r in refused)
    result["stopped_at_cap"] = len(capped)
    result["stopped_at_cap_though_a_finish_existed"] = sum(r["finish_possible"] for r in capped)
    missed = result["refused_though_a_finish_existed"] + \
        result["stopped_at_cap_though_a_finish_existed"]
    result["missed_finish_share"] = round(missed / len(runs), 3) if runs else None
    errors = [r["estimate_error"] for r in runs if "estimate_error" in r]
    picked = [r["planner"]["realised"] / r["planner"]["estimate"] for r in runs
              if r["planner"]["offer_id"] is not None]
    result["estimate_error"] = {
        "mean": round(sum(errors) / len(errors), 3) if errors else None,
        "p10": round(percentile(errors, 10), 3) if errors else None,
        "p90": round(percentile(errors, 90), 3) if errors else None,
        "over_safety_margin_share": round(sum(e > safety_margin for e in errors) / len(errors), 3)
        if errors else None,
        "of_planner_picks_mean": round(sum(picked) / len(picked) - 1, 3) if picked else None,
    }
    oracle = [r["planner"]["realised"] / r["best"] for r in runs
              if r["planner"]["realised"] is not None]
    result["planner_vs_best_true_median"] = round(percentile(oracle, 50), 3) if oracle else None
    result["plan_ms_median"] = round(percentile([r["plan_ms"] for r in runs], 50), 2)
    return result


def simulate(draws: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    templates = _templates()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SHAPES}
    for _ in range(draws):
        market = draw_market(rng, templates)
        for name, overrides in SHAPES.items():
            run = one_run(overrides, market.offers, market, rng)
            if run is not None:
                runs[name].append(run)
    margin = make_spec({}).budget.safety_margin
    shapes = {name: summarise(r, margin) for name, r in runs.items()}
    every = [r for rs in runs.values() for r in rs]
    return {"draws": draws, "seed": seed, "safety_margin": margin,
            "budget_range_x_best": list(BUDGET_RANGE), "shapes": shapes,
            "all": summarise(every, margin)}


def _cell(value: Any, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=DEFAULT_DRAWS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    summary = simulate(args.draws, args.seed)
    print(f"planner value on {args.draws} simulated markets (seed {args.seed}); "
          "realised $ per finished run")
    print(f"{'run shape':32} {'planner':>9} {'low $/h':>9} {'default':>9} {'vs $/h':>7} "
          f"{'vs def':>7} {'missed':>7} {'err mean':>8} {'err p90':>8}")
    for name, s in [*summary["shapes"].items(), ("ALL", summary["all"])]:
        print(f"{name:32} {_cell(s['planner']['usd_per_finished_run'], '${:.2f}'):>9} "
              f"{_cell(s['lowest_dph']['usd_per_finished_run'], '${:.2f}'):>9} "
              f"{_cell(s['default_order']['usd_per_finished_run'], '${:.2f}'):>9} "
              f"{_cell(s['vs_lowest_dph']['ratio_usd_per_finished_run']):>7} "
              f"{_cell(s['vs_default_order']['ratio_usd_per_finished_run']):>7} "
              f"{_cell(s['missed_finish_share']):>7} "
              f"{_cell(s['estimate_error']['mean'], '{:+.3f}'):>8} "
              f"{_cell(s['estimate_error']['p90'], '{:+.3f}'):>8}")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "planner.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out_dir / 'planner.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
