"""A lost machine is a pause: the run continues on the next machine from the checkpoint at home.

The orchestrator is driven over in-memory machines (``tests.test_resume_gc.ScriptedHost``): a
``Fleet`` provider rents a fresh host per acquire and journals it like a rental; an ``Agent``
plays the remote side (it trains a few steps per poll, saves a real LoRA every ``save_every``
steps, resumes from what the plan names, and publishes at the end). A machine is "outbid" at a
chosen step: its host stops answering and the provider reports it ``exited``, as Vast shows an
outbid instance (vast-cli ``vastai/SKILL.md``: "When outbid, the instance moves to stopped").
The clock is a counter that moves one minute per poll; nothing sleeps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from controller.errors import BudgetError, ProviderError, RunError, TransportError
from controller.journal import UNTRUSTED_MACHINE, open_journal
from controller.providers.base import Estimate, Machine
from controller.run import relaunch
from controller.run.follow import CHECKPOINT_FETCHED, MachineLost
from controller.run.orchestrator import Options, Orchestrator
from controller.spec.loader import load_spec
from tests.test_launch_local import write_spec
from tests.test_resume_gc import ScriptedHost, ScriptedProvider

RANK = 2
STEPS_PER_POLL = 3


def lora(step: int) -> bytes:
    """A LoRA of rank RANK that passes ``remote.validate.validate_lora``, saved at ``step``."""
    tensors = {"x.lora_A.weight": np.full((RANK, 4), 0.5, np.float32),
               "x.lora_B.weight": np.full((4, RANK), 0.25, np.float32)}
    return save(tensors, metadata={"training_info": json.dumps({"step": step, "epoch": 0})})


def lora_step(data: bytes, tmp: Path) -> int:
    tmp.write_bytes(data)
    from safetensors import safe_open

    with safe_open(str(tmp), framework="numpy") as fh:
        return int(json.loads(fh.metadata()["training_info"])["step"])


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Host(ScriptedHost):
    """A ScriptedHost that keeps the single files uploaded to it (the checkpoint shipped)."""

    def upload(self, local: Path, remote: str, *, delete: bool = False, excludes: Any = (),
               filters: Any = ()) -> Any:
        if Path(local).is_file():
            self.files[remote] = Path(local).read_bytes()
        return super().upload(local, remote, delete=delete, excludes=excludes, filters=filters)

    def download(self, remote: str, local: Path, *, includes: Any = None,
                 max_bytes: int | None = None) -> Any:
        if self.down:
            raise TransportError("rsync: connection refused")
        return super().download(remote, local, includes=includes, max_bytes=max_bytes)


class Agent:
    """The remote side over every machine of the run. ``lose_at``: the steps at which the
    machine in use is outbid, in order. ``trained`` counts every step trained on any machine."""

    def __init__(self, clock: Clock, tmp: Path, lose_at: list[int]) -> None:
        self.clock = clock
        self.tmp = tmp
        self.lose_at = list(lose_at)
        self.trained = 0
        self.starts: list[dict[str, Any]] = []  # per start: from step, budget, resume setting
        self.state: dict[int, dict[str, Any]] = {}  # id(host) -> run state

    def start(self, host: ScriptedHost, run_dir: str) -> None:
        spec = json.loads(host.files[f"{run_dir}/plan.json"])["spec"]
        training = spec["training"]
        setting = training.get("resume_from_checkpoint") or "auto"
        name = spec["name"]
        step = 0
        if setting.endswith(".safetensors"):  # remote.resume: a path in the dataset folder
            step = lora_step(host.files[f"{run_dir}/dataset/{setting}"], self.tmp)
        else:  # auto: the newest checkpoint in its own output folder
            saves = [p for p in host.files if p.startswith(f"{run_dir}/output/{name}/")]
            step = max((int(p[-21:-12]) for p in saves), default=0)
        self.starts.append({"step": step, "budget": spec["budget"]["max_usd"],
                            "setting": setting, "save_every": training["save_every"]})
        self.state[id(host)] = {"run_dir": run_dir, "name": name, "step": step,
                                "total": training["steps"], "every": training["save_every"],
                                "checkpoint": None}
        self._status(host)

    def _status(self, host: ScriptedHost, state: str = "running") -> None:
        st = self.state[id(host)]
        host.files[f"{st['run_dir']}/status.json"] = json.dumps(
            {"state": state, "stage": "train", "step": st["step"], "total": st["total"],
             "last_checkpoint": st["checkpoint"], "s_per_step": 1.0}).encode()

    def beat(self, host: ScriptedHost, path: str) -> None:
        """One poll: a minute passes and, while the agent runs, STEPS_PER_POLL steps train."""
        if not path.endswith("/heartbeat") or id(host) not in self.state or not host.alive:
            return
        self.clock.now += 60
        st = self.state[id(host)]
        for _ in range(STEPS_PER_POLL):
            if st["step"] >= st["total"]:
                break
            st["step"] += 1
            self.trained += 1
            if st["step"] % st["every"] == 0 or st["step"] == st["total"]:
                st["checkpoint"] = (f"{st['run_dir']}/output/{st['name']}/"
                                    f"{st['name']}_{st['step']:09d}.safetensors")
                host.files[st["checkpoint"]] = lora(st["step"])
            if self.lose_at and st["step"] >= self.lose_at[0]:
                self.lose_at.pop(0)
                self._status(host)
                host.down = True  # outbid: the container stops with the agent in it
                host.alive.clear()
                return
        if st["step"] >= st["total"]:
            host.finish(st["run_dir"], "done")
            return
        self._status(host)


class Fleet(ScriptedProvider):
    """A rented-machine provider over in-memory hosts (journaled like ``VastProvider``);
    reconcile, orphans and gc are ScriptedProvider's (nothing to do)."""

    name = "vast"

    def __init__(self, agent: Agent, clock: Clock, *, dph: float = 0.6,
                 usd_per_step: float = 0.01) -> None:
        self.agent = agent
        self.clock = clock
        self.dph = dph
        self.usd_per_step = usd_per_step
        self.hosts: dict[int, Host] = {}  # journal row -> host
        self.estimates: list[Any] = []  # the specs priced
        self.released: list[tuple[int, bool]] = []
        self.restartable = False  # an outbid machine that is started again comes back
        self.failing_releases = 0  # the next releases fail (the API is down)

    def estimate(self, spec: Any) -> Estimate:
        self.estimates.append(spec)
        est = spec.training.steps * self.usd_per_step
        if est > spec.budget.max_usd:
            raise BudgetError(f"no offer can finish {spec.training.steps} steps within "
                              f"${spec.budget.max_usd:.2f}")
        return Estimate(provider=self.name, price_per_hour=self.dph, est_usd=est,
                        est_hours=0.1, gpu_name="RTX 4090")

    def acquire(self, run_id: str, spec: Any, estimate: Estimate, journal: Any,
                notify: Any) -> Machine:
        host = Host()
        host.on_start = self.agent.start
        host.on_write = self.agent.beat
        row = journal.instance_intent(run_id, provider=self.name, label=f"flux-remote:{run_id}",
                                      offer_id=len(self.hosts) + 1, gpu_name="RTX 4090",
                                      dph_total=self.dph)
        journal.instance_created(row, 7000 + len(self.hosts), billing_started_at=self.clock())
        self.hosts[row] = host
        return self._machine(journal, row)

    def _machine(self, journal: Any, row: int) -> Machine:
        inst = journal.get_instance(row)
        return Machine(host=self.hosts[row], root="/r", python="python3", price_per_hour=self.dph,
                       billing_started_at=float(inst["billing_started_at"]), instance_row=row,
                       info={"gpu_name": "RTX 4090", "instance_id": inst["instance_id"]})

    def reattach(self, run_id: str, spec: Any, journal: Any) -> Machine:
        row = journal.current_instance(run_id)
        if row is None:
            raise RunError(f"run {run_id} has no live instance")
        host = self.hosts[row["id"]]
        if host.down and not self.restartable:
            raise ProviderError(f"instance {row['instance_id']} failed to start: instance is "
                                "exited")
        host.down = False
        journal.update_instance(row["id"], state="live")
        return self._machine(journal, row["id"])

    def release(self, run_id: str, journal: Any, *, keep_data: bool = False) -> None:
        row = journal.current_instance(run_id)
        if row is None:
            return
        if self.failing_releases:
            self.failing_releases -= 1
            raise ProviderError("the Vast API answered 503")
        self.released.append((row["id"], keep_data))
        if keep_data:
            journal.instance_stopped(row["id"])
            return
        journal.destroy_intent(row["id"])
        journal.instance_destroyed(row["id"])

    def health(self, run_id: str, journal: Any) -> str | None:
        row = journal.current_instance(run_id)
        if row is None:
            return "the journal has no live instance for it"
        if self.hosts[row["id"]].down:
            return f"instance {row['instance_id']} is 'exited' (outbid)"
        return None


def setup(tmp_path: Path, lose_at: list[int], *, steps: int = 60, budget: float = 5.0,
          **spec_extra: Any) -> tuple[Orchestrator, Fleet, Agent, str]:
    clock = Clock()
    agent = Agent(clock, tmp_path / "probe.safetensors", lose_at)
    fleet = Fleet(agent, clock)
    spec = load_spec(write_spec(tmp_path, name="bid", steps=steps, budget=budget,
                                provider={"type": "vast"}, **spec_extra))
    orch = Orchestrator(open_journal(clock=clock), fleet, clock=clock, sleep=lambda s: None)
    run_id = orch.create_run(spec, fleet.estimate(spec), out_dir=tmp_path / "out")
    return orch, fleet, agent, run_id


def every_machine_destroyed(orch: Orchestrator, run_id: str) -> None:
    rows = orch.journal.instances(run_id)
    assert rows and all(r["state"] == "destroyed" for r in rows), rows


@pytest.mark.parametrize("lose_at", [[5], [52], [13, 38]], ids=["early", "late", "twice"])
def test_an_outbid_run_finishes_on_the_next_machine(tmp_path: Path, lose_at: list[int]) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, lose_at)
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "done", outcome.error
    every = 4  # write_spec's save_every
    assert len(fleet.hosts) == len(lose_at) + 1
    every_machine_destroyed(orch, run_id)
    # per outbid at most one save interval is trained again, plus the steps of the one poll a
    # save needs to come home (the early case: the save of step 4 dies with the machine at 5)
    assert agent.trained - 60 <= (every + STEPS_PER_POLL) * len(lose_at)
    # each new machine resumed from the checkpoint that came home, shipped with the dataset
    for start in agent.starts[1:]:
        assert start["step"] == 0 or start["setting"] == relaunch.resume_name(start)
    receipt = json.loads((tmp_path / "out" / "controller_receipt.json").read_text())
    assert [m["instance_id"] for m in receipt["machines"]] == \
        [r["instance_id"] for r in orch.journal.instances(run_id)]
    assert receipt["metered_usd"] == pytest.approx(sum(m["usd"] for m in receipt["machines"])
                                                   + receipt["bandwidth_usd"], abs=1e-6)
    assert receipt["metered_usd"] <= 5.0
    assert [e["kind"] for e in orch.journal.events(run_id)].count(relaunch.CONTINUE) == \
        len(lose_at)


def test_the_replan_prices_the_steps_left_with_the_money_left(tmp_path: Path) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [30])
    orch.drive(run_id, Options(poll_interval=0))
    rest = fleet.estimates[-1]
    home = agent.starts[1]["step"]
    assert home == 24 and rest.training.steps == 60 - home  # the save of 28 died with it
    first = orch.journal.instances(run_id)[0]
    spent = (first["destroyed_at"] - first["billing_started_at"]) / 3600 * fleet.dph
    assert rest.budget.max_usd == pytest.approx(5.0 - spent)
    assert agent.starts[1]["budget"] == pytest.approx(5.0 - spent)  # the agent's own cap too


def test_no_offer_within_the_money_left_ends_with_the_checkpoint_at_home(tmp_path: Path) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [30])
    first_acquire = fleet.acquire

    def acquire(*args: Any, **kw: Any) -> Machine:
        fleet.usd_per_step = 0.2  # from now on the 36 steps left would cost $7.20: over $5
        return first_acquire(*args, **kw)

    fleet.acquire = acquire  # type: ignore[method-assign]
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "budget" and outcome.error.startswith("budget:")
    local = tmp_path / "out" / "checkpoints" / "bid_000000024.safetensors"
    assert str(local) in outcome.error and local.is_file()
    assert len(fleet.hosts) == 1  # nothing rented that the money could not finish
    every_machine_destroyed(orch, run_id)
    assert orch.journal.events(run_id, kind=relaunch.BUDGET_END)


def test_on_lost_stop_keeps_the_machine_and_ends_the_run(tmp_path: Path) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [30], gpu={"on_lost": "stop"})
    with pytest.raises(MachineLost):
        orch.drive(run_id, Options(poll_interval=0))
    assert orch.journal.get_run(run_id)["state"] == "failed"
    assert len(fleet.hosts) == 1 and fleet.released == [(1, True)]


def test_a_newer_checkpoint_only_on_the_lost_machine_is_tried_first(tmp_path: Path) -> None:
    # the status names the save of step 24; the machine dies while it downloads
    orch, fleet, agent, run_id = setup(tmp_path, [26])
    fleet.restartable = True
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "done", outcome.error
    assert len(fleet.hosts) == 1  # it came back: nothing new rented
    assert fleet.released == [(1, True), (1, False)]  # kept stopped, started, destroyed at the end
    assert agent.starts[1] == {**agent.starts[1], "step": 24, "setting": "auto"}
    assert orch.journal.events(run_id, kind=relaunch.RESTARTED)


def test_a_machine_stopped_as_untrusted_is_not_started_again_for_its_newer_checkpoint(
        tmp_path: Path) -> None:
    # another seat's agent ignored STOP on this instance (VastProvider.stop_machine): it was
    # stopped through the API, and no run starts it again, whatever it holds
    orch, fleet, agent, run_id = setup(tmp_path, [26])
    fleet.restartable = True
    orch.journal.add_event(run_id, UNTRUSTED_MACHINE, {"instance_id": "7000"})
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "done", outcome.error
    assert fleet.released[0] == (1, False) and len(fleet.hosts) == 2  # destroyed, not kept
    assert not orch.journal.events(run_id, kind=relaunch.RESTARTED)
    assert agent.starts[1]["step"] == 20  # from the checkpoint at home


def test_a_lost_machine_that_does_not_come_back_is_destroyed(tmp_path: Path) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [26])
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    orch.sleep = sleep
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "done", outcome.error
    assert fleet.released[:2] == [(1, True), (1, False)]
    assert now[0] >= relaunch.RESTART_WAIT_S - relaunch.RESTART_POLL_S
    assert agent.starts[1]["step"] == 20  # from home: the step-24 save was given up
    every_machine_destroyed(orch, run_id)


def test_resume_continues_a_run_whose_machine_was_lost_meanwhile(tmp_path: Path) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [])
    assert orch.drive(run_id, Options(detach=True)).detached
    first = next(iter(fleet.hosts.values()))
    # the laptop follows a while, then is closed; the machine is outbid meanwhile
    follower = orch.follower(orch.journal.get_run(run_id), Options(poll_interval=0),
                             checkpoints=True)
    for _ in range(5):
        follower.poll()
    first.down = True
    first.alive.clear()
    again = Orchestrator(orch.journal, fleet, clock=orch.clock, sleep=lambda s: None)
    outcome = again.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "done", outcome.error
    assert len(fleet.hosts) == 2 and agent.starts[1]["step"] == 12
    every_machine_destroyed(orch, run_id)


def test_a_checkpoint_that_fails_validation_at_home_is_not_shipped(tmp_path: Path) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [30])
    real = Agent.beat

    def beat(self: Agent, host: ScriptedHost, path: str) -> None:
        real(self, host, path)
        for key in host.files:
            if key.endswith(".safetensors"):
                host.files[key] = b"not a safetensors file"

    fleet_acquire = fleet.acquire

    def acquire(*args: Any, **kw: Any) -> Machine:
        machine = fleet_acquire(*args, **kw)
        if len(fleet.hosts) == 1:  # the first machine's saves are garbage, the next one's good
            machine.host.on_write = beat.__get__(agent)  # type: ignore[attr-defined]
        return machine

    fleet.acquire = acquire  # type: ignore[method-assign]
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "done", outcome.error
    assert agent.starts[1]["setting"] == "auto" and agent.starts[1]["step"] == 0
    assert orch.journal.events(run_id, kind="checkpoint_rejected")


def test_checkpoints_come_home_when_the_run_may_continue(tmp_path: Path) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [])
    assert orch.drive(run_id, Options(poll_interval=0)).state == "done"
    assert orch.journal.events(run_id, kind=CHECKPOINT_FETCHED)


def test_a_local_run_is_not_continued(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, name="own"))
    assert not relaunch.continues(spec)
    assert relaunch.continues(load_spec(write_spec(tmp_path, name="v", provider={"type": "vast"})))


def test_the_receipt_machine_list_prices_each_row(tmp_path: Path) -> None:
    journal = open_journal(clock=lambda: 7200.0)
    journal.create_run(run_id="r", name="r", provider="vast", state="running", spec={},
                       out_dir=str(tmp_path), budget_usd=1)
    a = journal.instance_intent("r", provider="vast", dph_total=0.5)
    journal.instance_created(a, 1, billing_started_at=1.0)
    journal.instance_destroyed(a)
    b = journal.instance_intent("r", provider="vast", dph_total=1.0)
    journal.instance_created(b, 2, billing_started_at=3600.0)
    assert [m["usd"] for m in relaunch.machines(journal, "r", 9000.0)] == \
        pytest.approx([7199 / 7200, 1.5])
    assert relaunch.earlier_machines_usd(journal, "r", 9000.0) == pytest.approx(7199 / 7200)


def test_a_bid_machine_gets_the_planners_save_every_unless_the_spec_sets_one(
        tmp_path: Path) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [])
    machine = Machine(host=Host(), root="/r", python="python3", price_per_hour=0.6,
                      billing_started_at=0.0, instance_row=0, info={"save_every": 7})
    run = orch.journal.get_run(run_id)
    assert relaunch.plan_spec(orch, run, machine)["training"]["save_every"] == 4  # the spec's
    data = json.loads(run["spec_json"])
    data["training"]["save_every"] = None
    open_run = {**run, "spec_json": json.dumps(data)}
    assert relaunch.plan_spec(orch, open_run, machine)["training"]["save_every"] == 7


def test_a_failed_destroy_after_a_loss_is_finished_by_resume(tmp_path: Path) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [30])
    fleet.failing_releases = 1
    with pytest.raises(ProviderError):
        orch.drive(run_id, Options(poll_interval=0))
    assert orch.journal.get_run(run_id)["state"] == "renting"  # decided, journaled, not done
    assert len(fleet.hosts) == 1  # nothing rented while the lost machine may still bill
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "done", outcome.error
    assert len(fleet.hosts) == 2 and agent.starts[1]["step"] == 24
    every_machine_destroyed(orch, run_id)


def test_an_outbid_vast_instance_does_not_restart_and_is_destroyed(fake_vast: Any) -> None:
    """FakeVast's outbid(): the instance stays down when started again (its bid lost), so the
    restart attempt fails at once and the release destroys it."""
    from controller.providers.vast import VastProvider
    from controller.vast.client import VastClient
    from controller.vast.readiness import Deadlines
    from tests.test_launch_vast_e2e import NO_WAIT

    client = VastClient(base_url=fake_vast.url, api_key=fake_vast.api_key,
                        min_intervals=NO_WAIT, sleep=lambda s: None)
    provider = VastProvider(client, deadlines=Deadlines(poll_s=0.01), sleep=lambda s: None,
                            public_key="ssh-ed25519 AAAA test", key_path=Path("/nonexistent"))
    journal = open_journal()
    journal.create_run(run_id="o", name="o", provider="vast", state="running", spec={},
                       out_dir="/tmp", budget_usd=1)
    iid = client.create_instance(int(fake_vast.offers[-1]["id"]), image="img", disk_gb=40,
                                 label="flux-remote:o")
    row = journal.instance_intent("o", provider="vast", label="flux-remote:o")
    journal.instance_created(row, iid)
    client.show_instance(iid)
    fake_vast.outbid(iid)
    assert "'exited'" in (provider.health("o", journal) or "")
    provider.release("o", journal, keep_data=True)
    assert fake_vast.instances[iid]["intended_status"] == "stopped"
    with pytest.raises(ProviderError):
        provider.reattach("o", load_spec_for_vast(), journal)
    assert fake_vast.instances[iid]["actual_status"] == "exited"  # still outbid
    provider.release("o", journal)
    assert fake_vast.instances == {}
    assert journal.get_instance(row)["state"] == "destroyed"


def load_spec_for_vast() -> Any:
    from controller.spec.model import RunSpec

    return RunSpec.model_validate({"name": "o", "dataset": {"path": "/tmp"},
                                   "budget": {"max_usd": 1}})


def test_without_torch_the_header_of_a_checkpoint_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    good.write_bytes(lora(12))
    assert relaunch.header_report(good, rank=RANK) == {"problems": [], "step": 12}
    assert relaunch.header_report(good, rank=RANK + 1)["problems"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert relaunch.header_report(bad, rank=RANK)["problems"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(lora(12)[:-8])  # the tensor data ends before its offsets say
    assert relaunch.header_report(cut, rank=RANK)["problems"]


class Purse:
    """A batch's ledger as ``Options.purse`` sees it (controller.batch.scheduler.LedgerPurse)."""

    def __init__(self, usd: float, *, grants: bool = True) -> None:
        self.usd, self.grants, self.granted = usd, grants, []

    def available(self) -> float:
        return self.usd

    def grant(self, run_id: str, usd: float) -> bool:
        if not self.grants or usd > self.usd:
            return False
        self.usd -= usd
        self.granted.append(usd)
        return True


def dearer_after_the_first_machine(fleet: Fleet) -> None:
    first_acquire = fleet.acquire

    def acquire(*args: Any, **kw: Any) -> Machine:
        fleet.usd_per_step = 0.2  # from now on the 36 steps left would cost $7.20: over $5
        return first_acquire(*args, **kw)

    fleet.acquire = acquire  # type: ignore[method-assign]


def test_in_a_batch_the_rest_takes_what_it_needs_from_the_batch(tmp_path: Path) -> None:
    """A batch run (its reservation: no room for a second setup) whose machine is lost goes on
    when the batch's ledger can pay the difference: its budget is raised by just that."""
    orch, fleet, agent, run_id = setup(tmp_path, [30])
    dearer_after_the_first_machine(fleet)
    purse = Purse(10.0)
    outcome = orch.drive(run_id, Options(poll_interval=0, purse=purse))
    assert outcome.state == "done", outcome.error
    [granted] = purse.granted
    left = orch.journal.events(run_id, kind="budget_top_up")[0]["detail"]["money_left"]
    assert left == pytest.approx(36 * 0.2 * 1.15)  # the rest's estimate with its safety margin
    # the run's own cap (the follower's and the agent's) is raised by what was granted
    assert orch.journal.get_run(run_id)["budget_usd"] == pytest.approx(5.0 + granted)
    assert agent.starts[1]["budget"] == pytest.approx(left)
    assert granted > 0 and len(fleet.hosts) == 2
    every_machine_destroyed(orch, run_id)


@pytest.mark.parametrize("purse", [Purse(1.0), Purse(10.0, grants=False)],
                         ids=["too-little-left", "refused"])
def test_in_a_batch_without_the_money_the_rest_still_ends_budget(tmp_path: Path,
                                                                 purse: Purse) -> None:
    orch, fleet, agent, run_id = setup(tmp_path, [30])
    dearer_after_the_first_machine(fleet)
    outcome = orch.drive(run_id, Options(poll_interval=0, purse=purse))
    assert outcome.state == "budget" and purse.granted == []
    assert len(fleet.hosts) == 1  # nothing rented that the money could not finish
    assert not orch.journal.events(run_id, kind="budget_top_up")
    assert orch.journal.get_run(run_id)["budget_usd"] == pytest.approx(5.0)
