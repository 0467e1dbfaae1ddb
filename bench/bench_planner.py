"""Planner value: estimated $ per finished run of the planner's pick vs two naive picks.

On the saved market (``bench/market_snapshot.json``, see ``make_market_snapshot.py``) and for a
few run shapes, three choices are made among the offers that pass the spec's filters:

* planner     ``controller.planning.planner.plan_offers`` (whole-run dollars)
* lowest $/h  the cheapest ``dph_total``
* API score   the first by Vast's default order (``score`` descending)

Each choice is priced with the same whole-run estimate, and the ratios planner / baseline are
printed (below 1.0: the planner's pick is cheaper). Results go to ``bench/results/planner.json``.

Run: ``python bench/bench_planner.py``
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from controller.planning.planner import estimate, exclusion_reason, plan_offers  # noqa: E402
from controller.spec.model import RunSpec  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "flux-dev 2000 steps (defaults)": {},
    "flux-dev 500 steps": {"training": {"steps": 500}},
    "flux-dev 4000 steps, 1024 px": {"training": {"steps": 4000, "resolutions": [1024]}},
    "flux-schnell 1000 steps": {"base_model": "flux-schnell", "training": {"steps": 1000}},
}


def make_spec(overrides: dict[str, Any]) -> RunSpec:
    data: dict[str, Any] = {"name": "bench", "dataset": {"path": "/nonexistent"},
                            "budget": {"max_usd": 1000.0}}
    data.update(overrides)
    return RunSpec.model_validate(data)


def compare(spec: RunSpec, offers: list[dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    plan = plan_offers(spec, offers)
    plan_ms = (time.perf_counter() - started) * 1000
    chosen = plan.require_chosen()
    eligible = [o for o in offers if exclusion_reason(spec, o) is None]
    by_price = min(eligible, key=lambda o: o["dph_total"])
    by_score = max(eligible, key=lambda o: o.get("score") or 0)
    price_est = estimate(spec, by_price)
    score_est = estimate(spec, by_score)

    def pick(est: Any) -> dict[str, Any]:
        return {"offer_id": est.offer_id, "gpu_name": est.gpu_name,
                "dph_total": round(est.dph_total, 4), "inet_down": est.offer.get("inet_down"),
                "est_hours": round(est.est_hours, 3), "est_usd": round(est.est_usd, 3)}

    return {
        "eligible": len(eligible),
        "plan_ms": round(plan_ms, 2),
        "planner": pick(chosen),
        "lowest_dph": pick(price_est),
        "api_score": pick(score_est),
        "ratio_vs_lowest_dph": round(chosen.est_usd / price_est.est_usd, 3),
        "ratio_vs_api_score": round(chosen.est_usd / score_est.est_usd, 3),
    }


def main() -> int:
    snapshot = json.loads((HERE / "market_snapshot.json").read_text(encoding="utf-8"))
    offers = snapshot["offers"]
    results = {name: compare(make_spec(over), offers) for name, over in SHAPES.items()}
    print(f"planner value on {len(offers)} offers (ratio = planner est $ / baseline est $)")
    print(f"{'run shape':34} {'planner':>20} {'lowest $/h':>20} {'API score':>20} "
          f"{'vs $/h':>7} {'vs score':>8}")
    for name, r in results.items():
        cell = lambda p: f"{p['gpu_name'][:11]} ${p['est_usd']:.2f}"  # noqa: E731
        print(f"{name:34} {cell(r['planner']):>20} {cell(r['lowest_dph']):>20} "
              f"{cell(r['api_score']):>20} {r['ratio_vs_lowest_dph']:>7.3f} "
              f"{r['ratio_vs_api_score']:>8.3f}")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    summary = {
        "offers": len(offers),
        "shapes": results,
        "mean_ratio_vs_lowest_dph": round(sum(r["ratio_vs_lowest_dph"] for r in results.values())
                                          / len(results), 3),
        "mean_ratio_vs_api_score": round(sum(r["ratio_vs_api_score"] for r in results.values())
                                         / len(results), 3),
    }
    (out_dir / "planner.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"mean ratio vs lowest $/h {summary['mean_ratio_vs_lowest_dph']}, "
          f"vs API score {summary['mean_ratio_vs_api_score']}; "
          f"wrote {out_dir / 'planner.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
