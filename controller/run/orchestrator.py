"""The run lifecycle as a library: small journaled steps that a controller can resume.

A run's journaled state names the step still to do, so ``drive`` is one loop for a fresh launch
and for ``resume`` alike::

    planned/renting/booting --acquire--> shipping --ship+start--> running --follow--> fetching
    fetching --fetch, verify, destroy--> done | stopped | failed    (controller.run.finish)

Every step is idempotent: renting goes through the provider, which journals each create and
destroy and reconciles unfinished intents first; shipping is rsync (unchanged files are not sent
again); the agent is not started twice (its pid file is checked); following resumes at the
journaled log offset; the fetch is verified before anything is destroyed. The same code serves
the ``vast``, ``ssh`` and ``local`` providers (``controller.providers``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from controller.run import finish, relaunch
from controller.run import states as R
from controller.errors import (FluxRemoteError, HostKeyError, ProviderError, RunError,
                               SpecError, TransportError)
from controller.run.fetch import fetch_bundle, fetch_extras, has_bundle
from controller.run.follow import (FINISH_ALLOWANCE_S, LOST_CONTACT_S, Follower, MachineLost,
                                   NullReporter, Reporter, RunPaths, Snapshot, StopIgnored,
                                   fetched_checkpoint, read_json, request_stop)
from controller.untrusted import UntrustedInput, clean_text
from controller.hosts.ssh import SshHost
from controller.journal import seat_of
from controller.run.states import run_lock, spec_of
from controller.run.ship import (remove_secrets, secrets_for, secrets_path, secrets_payload,
                                start_agent, upload_run, write_plan)

if TYPE_CHECKING:
    from controller.journal import Journal
    from controller.providers.base import Estimate, Machine, Provider
    from controller.run.handover import HandOver
    from controller.spec.model import RunSpec

@dataclass
class Options:
    detach: bool = False  # return once the agent has started
    poll_interval: float = 2.0
    finish_allowance_s: float = FINISH_ALLOWANCE_S
    lost_contact_s: float = LOST_CONTACT_S
    max_agent_restarts: int = 1  # an agent that vanished without an exit code is started again
    # a batch's taker for the machine once the run has ended well (``controller.run.handover``)
    hand_over: "HandOver | None" = None
    # a batch's ledger, asked for more when a lost machine's successor needs it (relaunch)
    purse: "Purse | None" = None


class Purse(Protocol):
    """What a batch can still give one of its runs (``controller.batch.scheduler``)."""

    def available(self) -> float:
        """Dollars the batch's ledger has left."""
        ...

    def grant(self, run_id: str, usd: float) -> bool:
        """Add ``usd`` to the run's reservation; False when it no longer fits (the caller
        raises the run's budget by as much)."""
        ...


@dataclass
class Outcome:
    run_id: str
    state: str
    out_dir: str | None = None
    bundle: str | None = None
    spend_usd: float = 0.0
    est_usd: float | None = None
    budget_usd: float = 0.0
    error: str | None = None
    detached: bool = False
    receipt: dict[str, Any] | None = None
    extras: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state in (R.DONE, R.STOPPED) or self.detached

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "run_id": self.run_id, "state": self.state,
                "out_dir": self.out_dir, "bundle": self.bundle, "spend_usd": self.spend_usd,
                "est_usd": self.est_usd, "budget_usd": self.budget_usd, "error": self.error,
                "detached": self.detached, "receipt": self.receipt}


class Orchestrator:
    """Drives runs through their lifecycle; one instance per controller process."""

    def __init__(self, journal: "Journal", provider: "Provider", *,
                 reporter: Reporter | None = None, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.journal = journal
        self.provider = provider
        self.reporter = reporter or NullReporter()
        self.env = dict(os.environ if env is None else env)
        self.clock = clock
        self.sleep = sleep
        self._machines: dict[str, "Machine"] = {}
        self.purse: Purse | None = None  # set by ``drive`` from its options

    # ---- creating a run --------------------------------------------------------------------

    def create_run(self, spec: "RunSpec", estimate: "Estimate", *, out_dir: Path | None = None,
                   spec_path: Path | None = None, batch_id: str | None = None,
                   run_id: str | None = None) -> str:
        """Journal a new run in state ``planned`` (nothing rented yet); returns its id."""
        run_id = run_id or R.new_run_id(spec.name, now=self.clock())
        data = spec.model_dump(mode="json")
        data["dataset"]["path"] = str(Path(spec.dataset.path).expanduser().resolve())
        target = Path(out_dir or spec.out_dir).expanduser().resolve()
        self.journal.create_run(run_id=run_id, name=spec.name, provider=self.provider.name,
                                state=R.PLANNED, spec=data, out_dir=str(target),
                                budget_usd=spec.budget.max_usd, est_usd=estimate.est_usd,
                                spec_path=str(spec_path) if spec_path else None,
                                batch_id=batch_id)
        self.journal.add_event(run_id, "estimate", estimate.to_dict())
        return run_id

    # ---- the loop --------------------------------------------------------------------------

    def drive(self, run_id: str, options: Options | None = None,
              estimate: "Estimate | None" = None) -> Outcome:
        """Carry the run on from its journaled state until it ends (or, with ``detach``, until
        its agent runs). Raises FluxRemoteError for failures the user must see; KeyboardInterrupt
        passes through (the CLI asks stop-or-detach; the journal is consistent at every point)."""
        options = options or Options()
        with run_lock(self.journal, run_id):
            return self._drive(run_id, options, estimate)

    def _drive(self, run_id: str, options: Options, estimate: "Estimate | None") -> Outcome:
        self.purse = options.purse
        if self.state(run_id) in R.ACTIVE_STATES:
            for line in self.provider.reconcile(self.journal):
                self.reporter.note(line)
        while True:
            run = self.run_row(run_id)
            state = run["state"]
            if state in (R.SHIPPING, R.RUNNING, R.FETCHING) and \
                    self.journal.current_instance(run_id) is None:
                return finish.machine_gone(self, run)
            if state in (R.PLANNED, R.RENTING, R.BOOTING):
                self._acquire(run, estimate)
            elif state == R.SHIPPING:
                self._ship_and_start(run)
                if options.detach:
                    return self.outcome_of(self.run_row(run_id), detached=True)
            elif state == R.RUNNING:
                if options.detach:
                    return self.outcome_of(run, detached=True)
                self._follow(run, options)
            elif state == R.FETCHING:
                return finish.finish(self, run, options)
            else:
                return self.outcome_of(run)

    def run_row(self, run_id: str) -> dict[str, Any]:
        run = self.journal.get_run(run_id)
        if run is None:
            raise RunError(f"no run {run_id!r} in the journal", hint="see `flux-remote ls`")
        return run

    def set_state(self, run_id: str, state: str, **fields: Any) -> None:
        self.journal.update_run(run_id, state=state, **fields)

    def _fail(self, run_id: str, message: str, *, release: bool = True,
              keep_data: bool = False, state: str = R.FAILED) -> None:
        """End the run (``failed``, or ``state``); by default let its machine go first
        (nothing left billing)."""
        if release:
            try:
                self.provider.release(run_id, self.journal, keep_data=keep_data)
            except FluxRemoteError as exc:
                message += f"\n(and releasing its machine failed: {exc})"
        self.set_state(run_id, state, error=message, ended_at=self.clock())

    def _notify(self, run_id: str) -> Callable[[str, str], None]:
        def notify(state: str, message: str) -> None:
            if state in (R.RENTING, R.BOOTING):
                self.set_state(run_id, state)
            if message:
                self.reporter.note(message)
        return notify

    # ---- step: get a machine ---------------------------------------------------------------

    def _acquire(self, run: dict[str, Any], estimate: "Estimate | None") -> None:
        run_id = run["run_id"]
        spec = spec_of(run)
        try:
            machine = self._machines.get(run_id)  # handed over by the batch's previous run
            if machine is None and self.journal.current_instance(run_id) is not None:
                machine = self._reattach_or_release(run_id, spec)
            if machine is None and relaunch.continuation(self.journal, run_id) is not None:
                self.set_state(run_id, R.RENTING)  # after a lost machine: what is left, money left
                machine = relaunch.acquire_next(self, run, spec, self._notify(run_id))
                if machine is None:
                    return  # no offer fits: the run ended (budget_end)
            elif machine is None:
                self.set_state(run_id, R.RENTING)
                estimate = estimate or self.provider.estimate(spec)
                machine = self.provider.acquire(run_id, spec, estimate, self.journal,
                                                self._notify(run_id))
        except FluxRemoteError as exc:
            self._fail(run_id, str(exc))
            raise
        self._machines[run_id] = machine
        self.set_state(run_id, R.SHIPPING, remote_run_dir=f"{machine.root}/{run_id}")

    def _reattach_or_release(self, run_id: str, spec: "RunSpec") -> "Machine | None":
        """A machine from a previous attempt: use it if it answers, else destroy it."""
        try:
            return self.provider.reattach(run_id, spec, self.journal)
        except HostKeyError:
            raise  # possibly someone in between: abort, rent nothing new
        except (ProviderError, TransportError) as exc:
            self.reporter.note(f"the earlier machine is not usable ({exc}); releasing it")
            self.provider.release(run_id, self.journal)
            return None

    def forget_machine(self, run_id: str) -> None:
        """Drop this process's handle on the run's machine (it is lost or let go)."""
        machine = self._machines.pop(run_id, None)
        if machine is not None:
            machine.host.close()

    def let_go_of(self, run_id: str) -> None:
        """Drop this process's handle on the run's machine without closing its connection: the
        machine went on to another run, which uses it now (``controller.run.handover``)."""
        self._machines.pop(run_id, None)

    def held(self, run_id: str) -> "Machine | None":
        """The run's machine if this process holds it (no reconnecting)."""
        return self._machines.get(run_id)

    def adopt_machine(self, run_id: str, machine: "Machine") -> None:
        self._machines[run_id] = machine

    def machine(self, run_id: str) -> "Machine":
        """The run's machine, reconnecting through the journal when this process has none."""
        if run_id not in self._machines:
            run = self.run_row(run_id)
            self._machines[run_id] = self.provider.reattach(run_id, spec_of(run), self.journal)
        return self._machines[run_id]

    def paths(self, run: dict[str, Any]) -> RunPaths:
        return RunPaths(run["remote_run_dir"] or f"{self.machine(run['run_id']).root}/"
                                                  f"{run['run_id']}")

    # ---- step: ship and start --------------------------------------------------------------

    def transfer_cost(self, run_id: str, machine: "Machine", direction: str,
                      stats: Any) -> float:
        """Journal one transfer and its bandwidth price; returns the dollars."""
        price = float(machine.info.get("inet_down_cost" if direction == "up" else
                                       "inet_up_cost", 0.0))
        usd = stats.bytes_sent / 1e9 * price
        self.journal.add_event(run_id, "transfer", {
            "direction": direction, **stats.to_dict(), "usd": usd})
        return usd

    def bandwidth_usd(self, run_id: str) -> float:
        return sum(float(e["detail"].get("usd") or 0.0)
                   for e in self.journal.events(run_id, kind="transfer"))

    def _ship_and_start(self, run: dict[str, Any]) -> None:
        from remote.plan import make_plan

        run_id = run["run_id"]
        spec = spec_of(run)
        try:
            machine = self.machine(run_id)
            host, paths = machine.host, RunPaths(f"{machine.root}/{run_id}")
            self.reporter.note(f"shipping the agent and the dataset to {paths.run_dir}")
            for stats in upload_run(host, paths, Path(spec.dataset.path),
                                    caption_ext=spec.dataset.caption_ext,
                                    max_files=spec.dataset.max_files):
                self.transfer_cost(run_id, machine, "up", stats)
            shipped = relaunch.ship_checkpoint(self, run, machine, f"{paths.run_dir}/dataset")
            if shipped is not None:
                self.transfer_cost(run_id, machine, "up", shipped)
            secrets_file = None
            values, warnings = secrets_for(spec, self.env)
            for warning in warnings:
                self.reporter.note(warning)
            secrets = secrets_payload(values)
            if secrets:
                secrets_file = secrets_path(machine.root, run_id)
                host.write_bytes(secrets_file, secrets, mode=0o600)
            write_plan(host, paths, make_plan(
                run_id=run_id, spec=relaunch.plan_spec(self, run, machine),
                run_dir=paths.run_dir,
                dataset_dir=f"{paths.run_dir}/dataset", provider=self.provider.name,
                price_per_hour=machine.price_per_hour,
                billing_started_at=machine.billing_started_at, secrets_file=secrets_file,
                instance=machine.info))
            self._start_agent(run_id, machine, paths)
        except (TransportError, ProviderError, SpecError) as exc:
            self._fail(run_id, f"shipping to the machine failed: {exc}")
            raise
        self.set_state(run_id, R.RUNNING, remote_run_dir=paths.run_dir)

    def _start_agent(self, run_id: str, machine: "Machine", paths: RunPaths) -> None:
        pid = start_agent(machine.host, paths, machine.python, self.env)
        if pid is not None:
            self.journal.add_event(run_id, "agent_started", {"pid": pid})
            self.reporter.note(f"agent started (pid {pid})")

    # ---- step: follow ----------------------------------------------------------------------

    def follower(self, run: dict[str, Any], options: Options, *,
                 checkpoints: bool = False) -> Follower:
        """A Follower of the run. ``checkpoints``: bring each new checkpoint home into
        ``<out>/checkpoints/`` when the spec asks for it (``publish.fetch_checkpoints``); only the
        follow loop does, not a one-off poll such as ``status``."""
        machine = self.machine(run["run_id"])
        spec = spec_of(run)
        # a run that continues after a lost machine needs its checkpoints home to go on from
        fetch = checkpoints and (spec.publish.fetch_checkpoints or relaunch.continues(spec))
        return Follower(machine.host, self.paths(run), journal=self.journal, run_id=run["run_id"],
                        price_per_hour=machine.price_per_hour,
                        billing_started_at=machine.billing_started_at,
                        budget_usd=run["budget_usd"], max_hours=spec.budget.max_hours,
                        bandwidth_usd=self.bandwidth_usd(run["run_id"]),
                        poll_interval=options.poll_interval,
                        stop_grace_s=spec.budget.stop_grace_s,
                        checkpoint_max_bytes=spec.publish.max_checkpoint_mb << 20,
                        finish_allowance_s=options.finish_allowance_s,
                        lost_contact_s=options.lost_contact_s, reporter=self.reporter,
                        health=lambda: self.provider.health(run["run_id"], self.journal),
                        checkpoint_dir=Path(run["out_dir"]) / "checkpoints" if fetch else None,
                        transfer_cost=lambda stats: self.transfer_cost(run["run_id"], machine,
                                                                       "down", stats),
                        # the run's other machines: offers given up during readiness (each billed
                        # while it loaded) and machines lost earlier
                        prior_usd=relaunch.earlier_machines_usd(
                            self.journal, run["run_id"], self.clock(),
                            current_row=machine.instance_row),
                        clock=self.clock, sleep=self.sleep)

    def _follow(self, run: dict[str, Any], options: Options) -> None:
        run_id = run["run_id"]
        restarts = 0
        follower: Follower | None = None
        while True:
            try:
                try:
                    follower = self.follower(run, options, checkpoints=True)
                except ProviderError as exc:  # reattaching failed: lost, or just unreachable?
                    problem = self.provider.health(run_id, self.journal)
                    if problem is None:
                        raise  # the run stays `running`: `resume` tries again later
                    raise MachineLost(f"{exc} ({problem})") from exc
                snap = self._follow_watching(follower)
            except StopIgnored as exc:
                self._stop_from_home(run, exc)
                return
            except (UntrustedInput, ValueError, TypeError, UnicodeError) as exc:
                # the instance sent something unusable: end the run in its release path (fetch
                # what verifies, then destroy or stop), never with a traceback
                message = f"the instance sent unusable data: {clean_text(exc)}"
                self.journal.add_event(run_id, "untrusted_input", {"error": message})
                self.reporter.note(f"{message}; ending the run")
                self.set_state(run_id, R.FETCHING)
                return
            except MachineLost as exc:
                if relaunch.continues(spec_of(run)):
                    relaunch.after_loss(self, run, exc, seen_checkpoint=(
                        follower.seen_checkpoint if follower is not None else None))
                    return
                # Whatever is on its disk cannot be reached: keep it (stopped) when it still
                # exists, so a later fetch can try; nothing keeps billing for compute.
                message = self._lost_message(run, exc)
                self._fail(run_id, message, keep_data=True)
                raise MachineLost(message) from exc
            if snap.agent_state in ("done", "failed", "stopped") or snap.agent_rc is not None:
                break
            if restarts >= options.max_agent_restarts:
                break
            restarts += 1
            self.reporter.note("the agent vanished without an exit code; starting it again "
                               "(it resumes from its last finished stage)")
            self._start_agent(run_id, self.machine(run_id), self.paths(run))
        self.set_state(run_id, R.FETCHING)

    def _lost_message(self, run: dict[str, Any], exc: MachineLost) -> str:
        """What the user reads when the machine is lost: how to fetch if it comes back and, when
        a checkpoint is home (``publish.fetch_checkpoints``), how to continue from it."""
        run_id = run["run_id"]
        message = (f"{exc}\n  if it comes back: flux-remote fetch {run_id}; "
                   f"then flux-remote down {run_id}")
        home = fetched_checkpoint(self.journal, run_id)
        if home is None:
            return message
        local = Path(home["local"])
        dataset = spec_of(run).dataset.path
        step = f" (step {home['step']})" if home.get("step") is not None else ""
        return (f"{message}\n  the last checkpoint brought home: {local}{step}\n"
                f"  to continue from it: copy it into the dataset folder {dataset} and launch "
                f"again with training.resume_from_checkpoint: {local.name}")

    def _stop_from_home(self, run: dict[str, Any], exc: StopIgnored) -> None:
        """The budget is enforced from home: the agent ignored the cap's STOP, so the instance is
        stopped through the provider's API (its disk, and what was trained, is kept) and the run
        ends ``budget`` with an error that says how to fetch and then destroy it."""
        run_id = run["run_id"]
        message = (f"budget: {exc}; the instance was stopped through the provider's API (its "
                   f"disk is kept)\n  fetch what it holds: flux-remote fetch {run_id}\n"
                   f"  then destroy it:    flux-remote down {run_id}")
        self.reporter.note(message)
        machine = self._machines.get(run_id)
        if machine is not None:
            remove_secrets(machine.host, machine.root, run_id)
        row = self.journal.current_instance(run_id)
        if row is not None and seat_of(row):
            # one seat of a shared instance (only Vast rents them): the whole instance is
            # stopped; the runs on its other GPUs continue elsewhere (gpu.on_lost)
            try:
                self.provider.stop_machine(run_id, self.journal)
            except FluxRemoteError as exc:
                message += f"\n(and stopping its machine failed: {exc})"
            self._fail(run_id, message, release=False, state=R.BUDGET)
            return
        self._fail(run_id, message, keep_data=True, state=R.BUDGET)

    @staticmethod
    def _follow_watching(follower: Follower) -> Snapshot:
        """``follower.follow()`` with the provider's health as the SSH host's ``give_up`` hook:
        a dead Vast host (outbid, offline) ends a reconnect at once instead of after its whole
        window. Other hosts (LocalHost) have no reconnect loop to cut short."""
        host = follower.host
        if not isinstance(host, SshHost) or follower.health is None:
            return follower.follow()
        previous = host.give_up
        host.give_up = follower.health
        try:
            return follower.follow()
        finally:
            host.give_up = previous

    def request_stop(self, run_id: str, reason: str = "stop requested by the user") -> None:
        """Write STOP (the agent checkpoints, publishes what exists and ends)."""
        run = self.run_row(run_id)
        request_stop(self.machine(run_id).host, self.paths(run), reason)
        self.journal.update_run(run_id, stop_requested=1)
        self.journal.add_event(run_id, "stop_requested", {"reason": reason})

    # ---- step: finish ----------------------------------------------------------------------

    # ---- commands on an existing run ------------------------------------------------------

    def fetch_now(self, run_id: str) -> dict[str, Any]:
        """``fetch``: the verified bundle if there is one, else the newest checkpoint and logs."""
        run = self.run_row(run_id)
        machine = self.machine(run_id)
        paths, out_dir = self.paths(run), Path(run["out_dir"])
        spec = spec_of(run)
        if has_bundle(machine.host, paths):
            fetched = fetch_bundle(machine.host, paths, out_dir,
                                   max_bytes=spec.publish.max_bundle_mb << 20)
            self.journal.update_run(run_id, bundle_path=str(out_dir))
            self.journal.add_event(run_id, "fetched", {"files_verified": fetched.files_verified})
            result = {"bundle": str(out_dir), "files_verified": fetched.files_verified,
                      "extras": fetch_extras(machine.host, paths, out_dir)}
            if machine.info.get("restarted"):
                self._done_after_restart(run_id, out_dir)
            return result
        status = read_json(machine.host, paths.status) or {}
        extras = fetch_extras(machine.host, paths, out_dir,
                              checkpoint=status.get("last_checkpoint"),
                              checkpoint_max_bytes=spec.publish.max_checkpoint_mb << 20)
        if machine.info.get("restarted"):
            # Started only to fetch (its container restarted, so no agent runs): stop it again;
            # the disk is kept for `resume` or `down`.
            self._machines.pop(run_id, None)
            self.provider.release(run_id, self.journal, keep_data=True)
        return {"bundle": None, "files_verified": 0, "extras": extras}

    def _done_after_restart(self, run_id: str, out_dir: Path) -> None:
        """A stopped instance was started only to bring its verified bundle home: the run is
        done, and the instance is destroyed now rather than left billing storage."""
        machine = self._machines.pop(run_id)
        remove_secrets(machine.host, machine.root, run_id)
        self.provider.release(run_id, self.journal)
        if self.state(run_id) in R.ACTIVE_STATES:
            self.set_state(run_id, R.DONE, bundle_path=str(out_dir), ended_at=self.clock())

    def down(self, run_id: str, *, force: bool = False) -> Outcome:
        """Destroy the run's machine now; first fetch what can be fetched unless ``force``."""
        with run_lock(self.journal, run_id):
            return self._down(run_id, force=force)

    def _down(self, run_id: str, *, force: bool) -> Outcome:
        self.run_row(run_id)  # an unknown run id fails here, before anything is destroyed
        fetched: dict[str, Any] = {}
        if self.journal.current_instance(run_id) is not None and not force:
            try:
                fetched = self.fetch_now(run_id)
            except FluxRemoteError as exc:
                self.reporter.note(f"could not fetch before destroying: {exc}")
        if run_id in self._machines:
            remove_secrets(self._machines[run_id].host, self._machines[run_id].root, run_id)
        self.provider.release(run_id, self.journal)
        if self.state(run_id) in R.ACTIVE_STATES:  # a fetch may have ended it (done)
            self.set_state(run_id, R.STOPPED, error="taken down by the user",
                           ended_at=self.clock(),
                           **({"bundle_path": fetched["bundle"]} if fetched.get("bundle") else {}))
        return self.outcome_of(self.run_row(run_id), extras=fetched.get("extras") or [])

    def outcome(self, run_id: str, *, detached: bool = False) -> Outcome:
        """The run as it stands in the journal (``detached``: it carries on without us)."""
        return self.outcome_of(self.run_row(run_id), detached=detached)

    def state(self, run_id: str) -> str:
        return str(self.run_row(run_id)["state"])

    def outcome_of(self, run: dict[str, Any], *, detached: bool = False,
                   receipt: dict[str, Any] | None = None,
                   extras: list[str] | None = None) -> Outcome:
        return Outcome(run_id=run["run_id"], state=run["state"], out_dir=run["out_dir"],
                       bundle=run.get("bundle_path"), spend_usd=float(run.get("spend_usd") or 0.0),
                       est_usd=run.get("est_usd"), budget_usd=float(run["budget_usd"]),
                       error=run.get("error"), detached=detached, receipt=receipt,
                       extras=extras or [])

