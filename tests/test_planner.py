"""The planner: what it asks the API for, what it re-checks, and how it ranks."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.errors import BudgetError
from controller.planning.gpu_priors import seconds_per_step
from controller.planning.planner import (
    exclusion_reason,
    mark_interruptible,
    plan_offers,
    search_queries,
    search_query,
)
from controller.spec.model import RunSpec
from tests.fakevast import offer_matches, reference, reference_offers

TEMPLATE = reference("search_offers_ondemand.json")["offers"][2]  # verified RTX 5090


def make_spec(**sections: Any) -> RunSpec:
    data: dict[str, Any] = {"name": "t", "dataset": {"path": "/nonexistent"},
                            "budget": {"max_usd": 50.0}}
    for key, value in sections.items():
        data[key] = value
    return RunSpec.model_validate(data)


def offer(offer_id: int, **fields: Any) -> dict[str, Any]:
    o = copy.deepcopy(TEMPLATE)
    # The template's host contract ends 3.3 h after the capture (its ``duration``); these made-up
    # offers stay rentable for a month unless a test says otherwise.
    o.update(id=offer_id, ask_contract_id=offer_id, duration=30 * 86400.0, **fields)
    return o


def test_search_query_units_and_filters() -> None:
    q = search_query(make_spec())
    assert q["gpu_ram"] == {"gte": 24000.0}  # MB, like the offers' gpu_ram (a 4090: 24564)
    assert q["cpu_ram"] == {"gte": 48000.0}
    assert q["disk_space"] == {"gte": 120.0}
    assert q["inet_down"] == {"gte": 200.0}
    assert q["reliability2"] == {"gte": 0.98}
    assert q["direct_port_count"] == {"gte": 1}
    assert q["verified"] == {"eq": True}
    assert q["cuda_max_good"] == {"gte": 12.4}
    assert q["rentable"] == {"eq": True} and q["num_gpus"] == {"eq": 1}
    assert q["order"] == [["dph_total", "asc"]] and q["limit"] == 64
    assert q["type"] == "on-demand" and q["allocated_storage"] == 120.0
    assert "gpu_name" not in q and "dph_total" not in q and "datacenter" not in q


def test_search_query_optional_filters() -> None:
    spec = make_spec(gpu={"names": ["RTX 4090", "RTX 5090"], "datacenter_only": True,
                          "min_driver": "580.65.06", "max_cuda": 13.0, "interruptible": True},
                     budget={"max_usd": 10, "max_usd_per_hour": 0.8})
    q = search_query(spec)
    assert q["gpu_name"] == {"in": ["RTX 4090", "RTX 5090"]}
    assert q["datacenter"] == {"eq": True}
    assert q["driver_vers"] == {"gte": 580065006}
    assert q["cuda_max_good"] == {"gte": 12.4, "lte": 13.0}
    assert q["dph_total"] == {"lte": 0.8}
    assert [x["type"] for x in search_queries(spec)] == ["on-demand", "bid"]
    assert [x["type"] for x in search_queries(make_spec())] == ["on-demand"]


@pytest.mark.parametrize("gpu", [{}, {"verified_only": False, "min_ram_gb": 30}])
def test_api_filters_and_local_checks_agree(gpu: dict) -> None:
    spec = make_spec(gpu=gpu)
    q = search_query(spec)
    for o in reference_offers():
        assert offer_matches(o, q) == (exclusion_reason(spec, o) is None), o["id"]


def test_fast_download_beats_slightly_cheaper_slow_host() -> None:
    spec = make_spec(gpu={"min_inet_down_mbps": 100})
    slow = offer(1, dph_total=0.40, inet_down=120.0, inet_down_cost=0.0, inet_up_cost=0.0)
    fast = offer(2, dph_total=0.42, inet_down=5000.0, inet_down_cost=0.0, inet_up_cost=0.0)
    result = plan_offers(spec, [slow, fast])
    assert result.chosen is not None and result.chosen.offer_id == 2
    by_id = {e.offer_id: e for e in result.offers}
    assert by_id[1].breakdown["weights_s"] > 10 * by_id[2].breakdown["weights_s"]
    assert by_id[1].est_usd > by_id[2].est_usd
    assert "slow download" in by_id[1].why


def test_bandwidth_charges_count() -> None:
    spec = make_spec()
    free = offer(1, dph_total=0.50, inet_down_cost=0.0, inet_up_cost=0.0)
    dear = offer(2, dph_total=0.49, inet_down_cost=0.05, inet_up_cost=0.05)
    result = plan_offers(spec, [dear, free])
    assert result.chosen.offer_id == 1
    assert result.offers[1].breakdown["bandwidth_usd"] == pytest.approx(
        0.05 * (result.offers[1].breakdown["down_gb"] + result.offers[1].breakdown["up_gb"]),
        rel=1e-3)


@pytest.mark.parametrize("field,value,reason", [
    ("gpu_ram", 16000, "vram"), ("cpu_ram", 32000, "ram"), ("disk_space", 60.0, "disk"),
    ("reliability2", 0.90, "reliability"), ("inet_down", 50.0, "inet_down"),
    ("direct_port_count", 0, "direct_ssh"), ("verification", "deverified", "unverified"),
    ("cuda_max_good", 12.0, "cuda"), ("num_gpus", 2, "num_gpus"), ("rentable", False,
                                                                   "not_rentable"),
])
def test_never_below_the_floors(field: str, value: Any, reason: str) -> None:
    cheap_but_bad = offer(1, dph_total=0.01, **{field: value})
    ok = offer(2, dph_total=0.90)
    result = plan_offers(make_spec(), [cheap_but_bad, ok])
    assert result.chosen.offer_id == 2
    assert [e.offer_id for e in result.offers] == [2]
    assert result.excluded == {reason: 1}


def test_name_list_datacenter_driver_and_price_cap() -> None:
    spec = make_spec(gpu={"names": ["rtx 4090"], "datacenter_only": True, "min_driver": "575"},
                     budget={"max_usd": 50, "max_usd_per_hour": 0.5})
    offers = [
        offer(1, gpu_name="RTX 5090"),
        offer(2, gpu_name="RTX 4090", hosting_type=0),
        offer(3, gpu_name="RTX 4090", hosting_type=1, driver_version="535.1.1"),
        offer(4, gpu_name="RTX 4090", hosting_type=1, dph_total=0.9),
        offer(5, gpu_name="RTX 4090", hosting_type=1, dph_total=0.4),
    ]
    result = plan_offers(spec, offers)
    assert result.chosen.offer_id == 5
    assert result.excluded == {"gpu_name": 1, "not_datacenter": 1, "driver": 1,
                               "price_per_hour": 1}


def test_measured_seconds_per_step_override_priors() -> None:
    spec = make_spec()
    a = offer(1, gpu_name="RTX 4090", dph_total=0.35)
    b = offer(2, gpu_name="RTX 5090", dph_total=0.45)
    assert plan_offers(spec, [a, b]).chosen.offer_id == 1
    measured = {"RTX 5090": 1.2}
    result = plan_offers(spec, [a, b], measured_s_per_step=measured)
    assert result.chosen.offer_id == 2
    assert result.chosen.breakdown["s_per_step_source"] == "measured on your runs"


def test_unknown_gpu_is_estimated_conservatively() -> None:
    known = offer(1)  # RTX 5090, dlperf ~199
    unknown = offer(2, gpu_name="Future GPU 9000", dlperf=known["dlperf"])
    s_known, _ = seconds_per_step(known)
    s_unknown, source = seconds_per_step(unknown)
    assert source == "estimated from dlperf" and s_unknown > s_known
    s_flops, source = seconds_per_step({"gpu_name": "X", "total_flops": 50.0})
    assert source == "estimated from total_flops" and s_flops > 2.5
    assert seconds_per_step({"gpu_name": "X"})[0] >= 10


def test_more_gpus_do_not_speed_up_one_lora() -> None:
    spec = make_spec(gpu={"num_gpus": 2})
    one = plan_offers(make_spec(), [offer(1, gpu_name="RTX 4090")]).chosen
    two = plan_offers(spec, [offer(2, gpu_name="RTX 4090", num_gpus=2)]).chosen
    assert two.breakdown["train_s"] == one.breakdown["train_s"]


def test_interruptible_only_when_allowed_and_costs_restarts() -> None:
    bid = mark_interruptible([offer(1, dph_total=0.30)])
    assert plan_offers(make_spec(), bid).excluded == {"interruptible_not_allowed": 1}
    spec = make_spec(gpu={"interruptible": True})
    result = plan_offers(spec, bid + [offer(2, dph_total=0.30)])
    by_id = {e.offer_id: e for e in result.offers}
    assert by_id[1].interruptible and by_id[1].breakdown["restart_s"] > 0
    assert by_id[1].est_usd > by_id[2].est_usd
    assert "bid_price" in by_id[1].breakdown


def test_a_bid_restart_pays_the_setup_again_and_the_steps_since_the_last_save() -> None:
    from controller.planning.planner import SETUP_KEYS

    spec = make_spec(gpu={"interruptible": True}, training={"steps": 3000})
    [est] = plan_offers(spec, mark_interruptible([offer(1)])).offers
    b = est.breakdown
    assert b["restart_setup_s"] == pytest.approx(sum(b[k] for k in SETUP_KEYS), abs=1.0)
    assert b["restart_setup_s"] > b["weights_s"] > 0  # a new machine downloads the weights again
    assert b["restart_lost_steps"] == b["save_every"] / 2
    assert b["restart_s"] == pytest.approx(
        b["expected_restarts"] * (b["restart_setup_s"] + b["restart_lost_s"]), rel=0.01)


def test_bid_offers_save_often_enough_that_a_restart_loses_little() -> None:
    from controller.planning.planner import BID_LOSS_TARGET_S, bid_save_every
    from remote.aitk_config import scaled_every

    spec = make_spec(gpu={"interruptible": True}, training={"steps": 3000})
    bid, = plan_offers(spec, mark_interruptible([offer(1)])).offers
    step_s = bid.breakdown["step_s_effective"]
    every = bid.breakdown["save_every"]
    assert every < scaled_every(3000)  # more often than an on-demand run
    assert every / 2 * step_s <= BID_LOSS_TARGET_S + step_s  # half an interval: ~5 min at most
    assert bid_save_every(3000, 1e-3) == scaled_every(3000)  # never fewer saves than on-demand
    assert bid_save_every(1000, 100.0) == 6  # 10 minutes of 100 s steps
    assert bid_save_every(1000, 5000.0) == 1
    # the spec's own save_every wins
    own = make_spec(gpu={"interruptible": True}, training={"steps": 3000, "save_every": 7})
    assert plan_offers(own, mark_interruptible([offer(1)])).offers[0].breakdown["save_every"] == 7


def test_budget_and_margin_refuse_with_the_cheapest_estimate() -> None:
    offers = [offer(1, dph_total=0.5), offer(2, dph_total=0.6)]
    est = plan_offers(make_spec(), offers).chosen.est_usd
    tight = make_spec(budget={"max_usd": est * 1.1, "safety_margin": 0.15})
    result = plan_offers(tight, offers)
    assert result.chosen is None and result.excluded == {"budget": 2}
    with pytest.raises(BudgetError) as info:
        result.require_chosen()
    assert info.value.exit_code == 3
    assert f"${est:.2f}" in str(info.value) and "offer 1" in str(info.value)
    assert "budget" in str(info.value)
    roomy = make_spec(budget={"max_usd": est * 1.2, "safety_margin": 0.15})
    assert plan_offers(roomy, offers).chosen.offer_id == 1


def test_max_hours_refuses() -> None:
    spec = make_spec(budget={"max_usd": 100, "max_hours": 0.5})
    result = plan_offers(spec, [offer(1)])
    assert result.chosen is None and result.excluded == {"max_hours": 1}
    assert "max_hours" in result.refusal()


def test_nothing_passes_the_filters() -> None:
    result = plan_offers(make_spec(), [offer(1, gpu_ram=8000)])
    assert result.chosen is None
    assert "no offer passes the filters" in result.refusal() and "vram 1" in result.refusal()


def test_breakdown_arithmetic_adds_up() -> None:
    est = plan_offers(make_spec(), [offer(1)]).chosen
    b = est.breakdown
    parts = ["provision_s", "image_pull_s", "install_s", "weights_s", "quantize_latents_s",
             "train_s", "sampling_s", "dataset_upload_s", "bundle_download_s", "fixed_stages_s",
             "restart_s", "host_failure_risk_s"]
    assert sum(b[p] for p in parts) == pytest.approx(b["total_s"], abs=1.0)
    assert b["compute_usd"] == pytest.approx(b["dph_total"] * b["total_s"] / 3600, rel=1e-3)
    assert est.est_usd == pytest.approx(b["compute_usd"] + b["bandwidth_usd"], rel=1e-3)
    assert b["train_s"] == pytest.approx(2000 * b["s_per_step"])
    d = est.to_dict()
    for key in ("offer_id", "gpu_name", "num_gpus", "dph_total", "est_hours", "est_usd",
                "inet_down", "reliability", "location", "why", "breakdown"):
        assert key in d


def test_sampling_scales_with_prompts_and_can_be_off() -> None:
    base = plan_offers(make_spec(), [offer(1)]).chosen.breakdown["sampling_s"]
    more = make_spec(training={"sample": {"prompts": ["a", "b", "c", "d", "e", "f"]}})
    off = make_spec(training={"sample": {"enabled": False}})
    assert plan_offers(more, [offer(1)]).chosen.breakdown["sampling_s"] == pytest.approx(2 * base)
    assert plan_offers(off, [offer(1)]).chosen.breakdown["sampling_s"] == 0


def test_longer_runs_favour_faster_gpus() -> None:
    slow_cheap = offer(1, gpu_name="RTX 3090", dph_total=0.20)
    fast_dear = offer(2, gpu_name="RTX 4090", dph_total=0.45)
    short = make_spec(training={"steps": 100})
    long = make_spec(training={"steps": 4000})
    assert plan_offers(short, [slow_cheap, fast_dear]).chosen.offer_id == 1
    assert plan_offers(long, [slow_cheap, fast_dear]).chosen.offer_id == 2
