"""Build ``bench/market_snapshot.json``: a saved Vast.ai search of 72 offers for the planner bench.

Every offer is a copy of a real offer from ``shared/reference/vast/search_offers_*.json`` (so it
has every field of the real shape) with these fields re-drawn, from a fixed seed, to give a
market with a realistic spread:

* ``gpu_name`` and its hardware (``gpu_ram`` MB, ``dlperf``, ``total_flops``, ``compute_cap``)
  from the models in ``GPUS``, in rough proportion to how often each is listed on Vast;
  their $/h ranges are typical on-demand prices seen on the Vast.ai console in 2025;
* ``dph_base`` within that range; ``dph_total = dph_base + storage_cost x 120 / 720`` (the
  snapshot is "searched" with ``allocated_storage = 120`` GB, the spec default);
* ``inet_down`` / ``inet_up`` log-uniform from 60 to 12000 Mb/s (home hosts to datacenters);
  ``inet_down_cost`` / ``inet_up_cost`` mostly small (0 - 0.005 $/GB) with some dear hosts
  (up to 0.02 $/GB, like the real 0.01 $/GB host in the reference);
* ``reliability`` / ``reliability2`` 0.90 - 0.999, ``verification`` ~70 % verified,
  ``cpu_ram`` 32 - 512 GB, ``disk_space`` 60 - 2000 GB, ``cuda_max_good`` 12.2 - 13.0,
  ``direct_port_count`` 0 for ~10 %, ``num_gpus`` 1 for most, some 2/4/8 (priced per GPU),
  ``geolocation`` from a list of real Vast locations, ``hosting_type`` 1 for ~30 %;
* ``score`` (Vast's own ranking, undocumented): synthesised as deep-learning performance per
  dollar weighted by reliability, which is roughly what the reference offers' scores follow;
  the API's default order is ``score`` descending.

Run: ``python bench/make_market_snapshot.py`` (writes the file next to this script).
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE_DIRS = [HERE.parent / "tests" / "data" / "reference" / "vast",
                  HERE.parent / "shared" / "reference" / "vast",
                  HERE.parent.parent / "shared" / "reference" / "vast"]
SEED = 20251129
ALLOCATED_GB = 120.0

# name: (gpu_ram MB, dlperf per GPU, total_flops per GPU, compute_cap, $/h low, $/h high, weight)
GPUS = {
    "RTX 3090": (24576, 35.0, 35.6, 860, 0.13, 0.25, 10),
    "RTX 4090": (24564, 80.0, 82.6, 890, 0.28, 0.55, 14),
    "RTX 5090": (32607, 197.0, 107.6, 1200, 0.45, 0.80, 9),
    "RTX A6000": (49140, 45.0, 38.7, 860, 0.35, 0.55, 5),
    "A40": (46068, 40.0, 37.4, 860, 0.30, 0.45, 3),
    "L40S": (46068, 110.0, 91.6, 890, 0.55, 0.95, 4),
    "RTX 6000Ada": (49140, 120.0, 91.1, 890, 0.60, 0.90, 3),
    "A100 PCIE": (81920, 127.0, 19.5, 800, 0.65, 1.20, 4),
    "A100 SXM4": (81920, 150.0, 19.5, 800, 0.80, 1.40, 4),
    "H100 SXM": (81559, 300.0, 67.0, 900, 1.60, 2.60, 5),
    "H100 PCIE": (81559, 230.0, 51.0, 900, 1.40, 2.20, 2),
    "RTX PRO 6000 WS": (97887, 282.0, 119.0, 1200, 0.80, 1.30, 3),
    "Tesla V100": (32768, 25.7, 12.5, 700, 0.08, 0.20, 3),
    "RTX 4080": (16376, 55.0, 48.7, 890, 0.15, 0.25, 2),
    "RTX 3080": (10240, 28.0, 29.8, 860, 0.06, 0.12, 1),
}
LOCATIONS = ["Washington, US", "California, US", "Texas, US", "Kansas, US", "Quebec, CA",
             "Sweden, SE", "United Kingdom, GB", "Germany, DE", "Netherlands, NL", "Poland, PL",
             "Japan, JP", "Taiwan, TW", "Australia, AU", "Czechia, CZ", "Spain, ES"]
COUNT = 72


def _templates() -> list[dict]:
    base = next(d for d in REFERENCE_DIRS if d.is_dir())
    offers = []
    for name in ("search_offers_ondemand.json", "search_offers_bid.json"):
        offers += json.loads((base / name).read_text(encoding="utf-8"))["offers"]
    return offers


def make_offer(rng: random.Random, template: dict, offer_id: int) -> dict:
    names = list(GPUS)
    name = rng.choices(names, weights=[GPUS[n][6] for n in names])[0]
    ram, dlperf, flops, cap, low, high, _ = GPUS[name]
    num = rng.choices([1, 2, 4, 8], weights=[85, 8, 5, 2])[0]
    o = copy.deepcopy(template)
    dph_base = round(rng.uniform(low, high) * num, 4)
    storage_cost = round(rng.uniform(0.1, 0.3), 4)
    dph_total = dph_base + storage_cost * ALLOCATED_GB / 720
    inet_down = round(math.exp(rng.uniform(math.log(60), math.log(12000))), 1)
    inet_up = round(inet_down * rng.uniform(0.3, 1.0), 1)
    dear = rng.random() < 0.15
    down_cost = round(rng.uniform(0.008, 0.02) if dear else rng.uniform(0.0, 0.005), 6)
    reliability = round(rng.uniform(0.90, 0.999), 5)
    o.update(
        id=offer_id, ask_contract_id=offer_id, bundle_id=offer_id * 10, machine_id=offer_id % 9973,
        host_id=100000 + offer_id % 7919, gpu_name=name, num_gpus=num, gpu_ram=ram,
        gpu_total_ram=ram, compute_cap=cap, dlperf=round(dlperf * num, 3),
        total_flops=round(flops * num, 3), dph_base=dph_base, dph_total=dph_total,
        discounted_dph_total=dph_total, min_bid=round(dph_base * rng.uniform(0.45, 0.8), 4),
        storage_cost=storage_cost, storage_total_cost=storage_cost * ALLOCATED_GB / 720,
        inet_down=inet_down, inet_up=inet_up, inet_down_cost=down_cost,
        inet_up_cost=down_cost, internet_down_cost_per_tb=down_cost * 1024,
        internet_up_cost_per_tb=down_cost * 1024,
        reliability=reliability, reliability2=reliability,
        verification="verified" if rng.random() < 0.7 else "deverified",
        cpu_ram=rng.choice([32000, 64000, 128000, 128893, 256000, 515000]),
        disk_space=round(rng.uniform(60, 2000), 2),
        cuda_max_good=rng.choice([12.2, 12.4, 12.6, 12.8, 12.9, 13.0]),
        direct_port_count=0 if rng.random() < 0.1 else rng.randint(8, 400),
        geolocation=rng.choice(LOCATIONS), hosting_type=1 if rng.random() < 0.3 else 0,
        rentable=True, rented=False, is_bid=False,
        dlperf_per_dphtotal=dlperf * num / dph_total, flops_per_dphtotal=flops * num / dph_total,
    )
    o["score"] = round((dlperf * num / dph_total) ** 0.8 * reliability ** 20, 3)
    o["search"] = {**o["search"], "gpuCostPerHour": dph_base, "totalHour": dph_total,
                   "diskHour": o["storage_total_cost"], "discountedTotalPerHour": dph_total}
    return o


def make_snapshot(seed: int = SEED, count: int = COUNT) -> dict:
    rng = random.Random(seed)
    templates = _templates()
    offers = [make_offer(rng, templates[n % len(templates)], 60000000 + n * 137)
              for n in range(count)]
    offers.sort(key=lambda o: o["dph_total"])
    return {"offers": offers}


def main() -> None:
    out = HERE / "market_snapshot.json"
    out.write_text(json.dumps(make_snapshot(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} ({COUNT} offers)")


if __name__ == "__main__":
    main()
