"""``vast``: rent the cheapest Vast.ai offer that finishes the run within budget, then destroy it.

Every instance is labelled ``flux-remote:<run_id>`` so that it can always be found again, and
every create and destroy is journaled before and after the call. Releasing a run destroys any
other instance still carrying its label (a late duplicate of a create whose answer was lost). An
offer that is gone when we try to rent it, or an instance that misses a readiness deadline
(destroyed first), moves on to the next offer in the plan. The controller's own SSH key
(``controller.hosts.keys``) is attached to the instance; the account key never leaves the laptop.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from controller.errors import (BudgetError, HostKeyError, OfferGoneError, ProviderError,
                               RunError, TransportError)
from controller.journal import (INSTANCE_CREATING, INSTANCE_DESTROYED, INSTANCE_DESTROYING,
                                INSTANCE_LIVE, INSTANCE_STOPPED, UNTRUSTED_MACHINE, seat_of,
                                untrusted_machine)
from controller.planning.packing import SEAT_DISK_GB
from controller.providers.base import Estimate, Machine, Notify
from controller.run.states import ACTIVE_STATES, instance_label
from controller.vast.client import CREATE_READ_BACK_S

if TYPE_CHECKING:
    from controller.hosts.base import Host
    from controller.journal import Journal
    from controller.spec.model import RunSpec

LABEL_PREFIX = "flux-remote:"
MAX_OFFERS_TRIED = 5
LOST_STATUSES = ("exited", "offline", "unknown", "stopped")  # never become running by themselves
# A stopped instance reports "exited" (vast-cli instances.py _STATUS_COLORS; SkyPilot's Vast
# provisioner resumes exited, stopped and frozen): these can be started again, keeping the disk.
RESUMABLE_STATUSES = ("exited", "stopped", "frozen")
SSH_READY_S = 300.0  # after "running": Vast can take a minute more to install the key
SSH_RECONNECT_S = 20.0  # one readiness probe's reconnect window (the wait loop retries it)
SSH_RUN_RECONNECT_S = 120.0  # the run's connection: how long a dropped one is retried
DEFAULT_REMOTE_PYTHON = "python3"  # the spec's default: find the image's own Python instead


def _bandwidth_prices(offer: dict[str, Any] | None) -> dict[str, float]:
    """$/GB the instance bills for traffic (``inet_down_cost``: what we upload to it)."""
    offer = offer or {}
    return {"inet_down_cost": float(offer.get("inet_down_cost") or 0.0),
            "inet_up_cost": float(offer.get("inet_up_cost") or 0.0)}


class OfferClaims:
    """Offers taken by the runs of one batch (shared by their providers, thread-safe): an offer
    one run rents is not tried by the others, which move on to their next best."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, offer_id: Any) -> bool:
        """Take ``offer_id``; False when another run already has it."""
        with self._lock:
            if str(offer_id) in self._ids:
                return False
            self._ids.add(str(offer_id))
            return True

    def release(self, offer_id: Any) -> None:
        """The run that rented it ended well and let it go: others may rent it again."""
        with self._lock:
            self._ids.discard(str(offer_id))

    def __contains__(self, offer_id: object) -> bool:
        with self._lock:
            return str(offer_id) in self._ids


class VastProvider:
    name = "vast"

    def __init__(self, client: Any = None, *, ssh_user: str = "root",
                 key_path: Path | None = None, public_key: str | None = None,
                 known_hosts_path: Path | None = None, deadlines: Any = None,
                 ssh_ready_s: float = SSH_READY_S, ssh_retry_s: float = 5.0,
                 reconnect_window_s: float = SSH_RUN_RECONNECT_S,
                 onstart_s: float | None = None,
                 max_offers: int = MAX_OFFERS_TRIED,
                 measured_s_per_step: dict[str, float] | None = None,
                 offer_claims: OfferClaims | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client
        self.ssh_user = ssh_user
        self.key_path = key_path
        self.public_key = public_key
        self.known_hosts_path = known_hosts_path
        self.deadlines = deadlines
        self.ssh_ready_s = ssh_ready_s
        self.ssh_retry_s = ssh_retry_s
        self.reconnect_window_s = reconnect_window_s
        self.onstart_s = onstart_s
        self.max_offers = max_offers
        self.measured_s_per_step = measured_s_per_step or {}
        self.offer_claims = offer_claims  # a batch's shared claims (None: a lone run)
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep

    @property
    def client(self) -> Any:
        if self._client is None:
            from controller.vast.client import VastClient

            self._client = VastClient()
        return self._client

    # ---- planning --------------------------------------------------------------------------

    def estimate(self, spec: "RunSpec") -> Estimate:
        from controller.planning.planner import mark_interruptible, plan_offers, search_query

        offers = self.client.search_offers(search_query(spec))
        if spec.gpu.interruptible:
            offers += mark_interruptible(
                self.client.search_offers(search_query(spec, interruptible=True)))
        if self.offer_claims is not None:  # a batch: offers its other runs took are not ours
            offers = [o for o in offers if o.get("id") not in self.offer_claims]
        plan = plan_offers(spec, offers, measured_s_per_step=self.measured_s_per_step)
        chosen = plan.chosen
        if chosen is None:
            reasons = ", ".join(f"{why}: {n}" for why, n in sorted(plan.excluded.items()))
            raise BudgetError(
                f"no Vast.ai offer can finish {spec.name!r} within ${spec.budget.max_usd:.2f}"
                + (f" ({len(offers)} offers; excluded {reasons})" if offers else " (no offers)"),
                hint="raise budget.max_usd, allow more GPU models (gpu.names) or relax gpu filters",
            )
        return Estimate.from_plan(plan, self.name)

    def _candidates(self, spec: "RunSpec", estimate: Estimate) -> list[Any]:
        """The offers the planner ranked as fitting (safety margin and max_hours included)."""
        offers = list(getattr(estimate.plan, "offers", None) or [])
        return [o for o in offers if o.fits and (self.offer_claims is None or
                                                 o.offer_id not in self.offer_claims)
                ][: self.max_offers]

    # ---- renting ---------------------------------------------------------------------------

    def _keys(self) -> tuple[Path, str]:
        if self.key_path is not None and self.public_key:
            return self.key_path, self.public_key
        from controller.hosts.keys import ensure_keypair
        from controller.state import state_dir

        if self.key_path is None:
            return ensure_keypair(state_dir())
        pub = Path(f"{self.key_path}.pub")
        text = pub.read_text(encoding="utf-8").strip() if pub.exists() else ""
        return self.key_path, text or ensure_keypair(state_dir())[1]

    def _known_hosts(self) -> Path:
        from controller.state import known_hosts_path

        return self.known_hosts_path or known_hosts_path()

    def _host(self, address: str, port: int, *, reconnect_window_s: float | None = None,
              repin_first: bool = False) -> "Host":
        from controller.hosts.ssh import SshHost, SshTarget

        key_path, _ = self._keys()
        target = SshTarget(host=address, port=int(port), user=self.ssh_user,
                           key_path=Path(key_path), known_hosts_path=self._known_hosts())
        return SshHost(target, reconnect_window_s=self.reconnect_window_s
                       if reconnect_window_s is None else reconnect_window_s,
                       repin_first=repin_first)

    def _wait_ssh(self, address: str, port: int, instance_id: str, *,
                  new_instance: bool = False) -> "Host":
        """Probe until a command runs, then return the run's host (normal reconnect window).

        The probe has a short reconnect window of its own, so this loop (deadline
        ``ssh_ready_s``) decides how long to wait. A changed host key is not retried: it aborts
        (HostKeyError). ``new_instance``: an instance first reached now, on an address Vast may
        have handed out before; the key it offers replaces that address's pin."""
        probe = self._host(address, port,
                           reconnect_window_s=min(SSH_RECONNECT_S, self.reconnect_window_s),
                           repin_first=new_instance)
        deadline = self.monotonic() + self.ssh_ready_s
        try:
            while True:
                try:
                    probe.run("true", timeout=30)
                    break
                except HostKeyError:
                    raise
                except TransportError as exc:
                    if self.monotonic() >= deadline:
                        raise ProviderError(
                            f"instance {instance_id} runs but SSH did not answer within "
                            f"{self.ssh_ready_s:.0f} s: {exc}") from exc
                    probe.close()
                    self.sleep(self.ssh_retry_s)
        finally:
            probe.close()
        return self._host(address, port)

    def _onstart(self, spec: "RunSpec") -> str:
        from controller.vast.onstart import DEFAULT_VAST_URL, onstart_script

        url = str(getattr(self.client, "base_url", "") or DEFAULT_VAST_URL)
        return onstart_script(spec.provider.remote_root,
                              None if url.rstrip("/") == DEFAULT_VAST_URL else url)

    def _python(self, host: "Host", spec: "RunSpec") -> str:
        """The image's Python on the instance (the spec's, verified, when it names one)."""
        from controller.vast.onstart import find_python

        named = spec.provider.remote_python
        return find_python(host, spec.provider.remote_root,
                           None if named == DEFAULT_REMOTE_PYTHON else named)

    @staticmethod
    def _known_python(host: "Host", journal: "Journal", instance_id: str) -> str | None:
        """The interpreter found on this instance when it was rented (journaled), if it is still
        an executable file there: the full probe imports torch, seconds at every reattach."""
        import shlex

        found = [e["detail"].get("python") for e in journal.events(kind="remote_python")
                 if e["detail"].get("instance_id") == instance_id]
        if not found or not found[-1]:
            return None
        try:
            answer = host.run(f"test -x {shlex.quote(found[-1])}", timeout=60, check=False)
        except TransportError:
            return None
        return str(found[-1]) if answer.ok else None

    def _booted(self, host: "Host", spec: "RunSpec", instance_id: Any, notify: Notify) -> None:
        """Wait for the onstart script's marker: ``running`` comes before onstart has run."""
        from controller.vast.onstart import ONSTART_S, wait_for_onstart

        waited = wait_for_onstart(host, spec.provider.remote_root,
                                  deadline_s=ONSTART_S if self.onstart_s is None else
                                  self.onstart_s, clock=self.monotonic, sleep=self.sleep)
        notify("", f"instance {instance_id}: boot script done ({waited:.0f} s after SSH)")

    def _info(self, spec: "RunSpec", python: str, **info: Any) -> dict[str, Any]:
        from controller.vast.onstart import instance_env_file

        return {**info, "python": python,
                "env_file": instance_env_file(spec.provider.remote_root)}

    @staticmethod
    def _bill_boot_download(run_id: str, spec: "RunSpec", journal: "Journal",
                            offer: dict[str, Any] | None) -> None:
        """Vast bills what the instance downloads at ``inet_down_cost`` $/GB: the image pull, the
        installs and the weights. The controller cannot see those bytes, so the planner's
        figure goes into the meter as a ``transfer`` event (``estimated``), with the uploads."""
        from controller.planning.planner import boot_download_gb

        gb = boot_download_gb(spec)
        price = _bandwidth_prices(offer)["inet_down_cost"]
        journal.add_event(run_id, "transfer", {"direction": "down", "estimated": True,
                                               "what": "image, installs and weights",
                                               "bytes_sent": int(gb * 1e9), "usd": gb * price})

    def acquire(self, run_id: str, spec: "RunSpec", estimate: Estimate, journal: "Journal",
                notify: Notify) -> Machine:
        from controller.vast.readiness import ssh_endpoint, wait_until_running

        label = instance_label(run_id)
        _, public_key = self._keys()
        tried = 0
        for offer in self._candidates(spec, estimate):
            if self.offer_claims is not None and not self.offer_claims.claim(offer.offer_id):
                continue  # another run of the batch took it meanwhile
            tried += 1
            notify("renting", f"renting offer {offer.offer_id}: {offer.num_gpus}x {offer.gpu_name}"
                              f" at ${offer.dph_total:.3f}/h")
            seats = max(1, int(estimate.seats))  # > 1: one seat each for that many runs
            row = journal.instance_intent(run_id, provider=self.name, label=label,
                                          offer_id=offer.offer_id, gpu_name=offer.gpu_name,
                                          num_gpus=offer.num_gpus,
                                          dph_total=offer.dph_total / seats, seats=seats)
            known = [int(r["instance_id"]) for r in journal.instances(run_id)
                     if r.get("instance_id") and str(r["instance_id"]).isdigit()]
            try:
                instance_id = self.client.create_instance(
                    int(offer.offer_id), image=spec.gpu.image,
                    disk_gb=spec.gpu.disk_gb + SEAT_DISK_GB * (seats - 1),
                    label=label, onstart=self._onstart(spec), known_ids=known,
                    price=offer.breakdown.get("bid_price") if offer.interruptible else None)
            except OfferGoneError:
                journal.instance_failed(row, "offer gone")
                notify("", f"offer {offer.offer_id} is gone; trying the next one")
                continue
            except ProviderError as exc:
                self._settle_create(journal, journal.get_instance(row) or {}, str(exc))
                if journal.current_instance(run_id) is None:
                    raise
                instance_id = int(journal.current_instance(run_id)["instance_id"])
            else:
                journal.instance_created(row, instance_id, billing_started_at=self.clock())
            notify("booting", f"instance {instance_id} created; waiting until it runs")
            try:
                instance = wait_until_running(self.client, int(instance_id),
                                              deadlines=self.deadlines, clock=self.monotonic,
                                              sleep=self.sleep,
                                              unlisted_grace_s=sum(CREATE_READ_BACK_S))
                self.client.attach_ssh_key(int(instance_id), public_key)
                address, port = ssh_endpoint(instance)
                journal.update_instance(row, ssh_host=address, ssh_port=int(port))
                # A new instance on an address Vast handed out before: its key is new too.
                host = self._wait_ssh(address, int(port), str(instance_id), new_instance=True)
                self._booted(host, spec, instance_id, notify)
            except HostKeyError:
                self._destroy_row(journal, row)
                raise
            except (ProviderError, TransportError) as exc:
                notify("", f"instance {instance_id} did not become ready ({exc}); destroying it")
                self._destroy_row(journal, row)
                continue
            try:
                python = self._python(host, spec)
            except (ProviderError, TransportError):
                self._destroy_row(journal, row)  # the image's fault: another offer fares no better
                raise
            notify("", f"instance {instance_id}: the agent runs with {python}")
            self._bill_boot_download(run_id, spec, journal, offer.offer)
            journal.add_event(run_id, "remote_python", {"instance_id": str(instance_id),
                                                        "python": python})
            current = journal.get_instance(row) or {}
            return Machine(host=host, root=spec.provider.remote_root,
                           python=python,
                           price_per_hour=float(offer.dph_total) / seats,
                           billing_started_at=float(current.get("billing_started_at") or
                                                    self.clock()),
                           instance_row=row,
                           info=self._info(spec, python, **seat_of(current),
                                           gpu_name=offer.gpu_name,
                                           num_gpus=offer.num_gpus, offer_id=offer.offer_id,
                                           instance_id=instance_id,
                                           interruptible=offer.interruptible,
                                           # the planner's save_every for a bid machine
                                           # (controller.run.relaunch.plan_spec)
                                           save_every=offer.breakdown.get("save_every"),
                                           **_bandwidth_prices(offer.offer)))
        raise ProviderError(f"none of the {tried} offers tried became a ready instance",
                            hint="run `flux-remote plan` again later; offers change by the minute")

    def reattach(self, run_id: str, spec: "RunSpec", journal: "Journal") -> Machine:
        from controller.vast.readiness import is_ready, ssh_endpoint, wait_until_running

        row = journal.current_instance(run_id)
        if row is None or not row.get("instance_id"):
            raise RunError(f"run {run_id} has no live instance in the journal")
        instance = self.client.show_instance(int(row["instance_id"]))
        restarted = False
        if instance is None:
            journal.instance_destroyed(int(row["id"]))  # a fact now, whoever destroyed it
            raise ProviderError(f"instance {row['instance_id']} of run {run_id} no longer exists")
        if row["state"] == INSTANCE_LIVE and untrusted_machine(journal, row["instance_id"]):
            # a seat's agent ignored STOP there: only its own run (``fetch``) starts it again
            raise ProviderError(f"instance {row['instance_id']} was stopped because an agent on "
                                f"it ignored the cost cap's STOP; it is not started again for "
                                f"run {run_id}")
        if instance.get("actual_status") in RESUMABLE_STATUSES or \
                row["state"] == INSTANCE_STOPPED:
            # Kept for a later fetch, or stopped by the agent's watchdog, the user or the host:
            # start it again (GPU billing resumes: journaled before and after).
            journal.add_event(run_id, "start_intent", {"instance_id": row["instance_id"],
                                                       "status": instance.get("actual_status")})
            self.client.start_instance(int(row["instance_id"]))
            journal.add_event(run_id, "start_result", {"instance_id": row["instance_id"]})
            restarted = True
            instance = wait_until_running(self.client, int(row["instance_id"]),
                                          deadlines=self.deadlines, clock=self.monotonic,
                                          sleep=self.sleep)
            journal.update_instance(int(row["id"]), state=INSTANCE_LIVE)
        if not is_ready(instance):
            # Killed while it booted: wait for it like acquire would (fails fast when lost).
            instance = wait_until_running(self.client, int(row["instance_id"]),
                                          deadlines=self.deadlines, clock=self.monotonic,
                                          sleep=self.sleep)
        if not row.get("ssh_host"):
            # The endpoint is journaled after the key is attached: no endpoint, maybe no key.
            self.client.attach_ssh_key(int(row["instance_id"]), self._keys()[1])
        address, port = ssh_endpoint(instance)
        first_contact = not row.get("ssh_host")  # killed before the endpoint was journaled
        journal.update_instance(int(row["id"]), ssh_host=address, ssh_port=int(port))
        host = self._wait_ssh(address, int(port), str(row["instance_id"]),
                              new_instance=first_contact)
        # No marker wait here: onstart finished once on this container (the run got this far)
        # and what it left (rsync, the variables file) persists on the container's disk.
        python = self._known_python(host, journal, str(row["instance_id"])) or \
            self._python(host, spec)
        return Machine(host=host, root=spec.provider.remote_root,
                       python=python,
                       price_per_hour=float(row["dph_total"] or 0.0),
                       billing_started_at=float(row["billing_started_at"] or self.clock()),
                       instance_row=int(row["id"]),
                       info=self._info(spec, python, **seat_of(row), gpu_name=row["gpu_name"],
                                       num_gpus=row["num_gpus"], offer_id=row["offer_id"],
                                       instance_id=row["instance_id"], restarted=restarted))

    def health(self, run_id: str, journal: "Journal") -> str | None:
        row = journal.current_instance(run_id)
        if row is None or not row.get("instance_id"):
            return "the journal has no live instance for it"
        try:
            instance = self.client.show_instance(int(row["instance_id"]))
        except ProviderError:
            return None  # the API is unsure too: keep retrying the connection
        if instance is None:
            journal.instance_destroyed(int(row["id"]))
            return f"instance {row['instance_id']} no longer exists"
        status = instance.get("actual_status")
        if status in LOST_STATUSES:
            return f"instance {row['instance_id']} is {status!r} ({instance.get('status_msg')})"
        return None

    # ---- letting go ------------------------------------------------------------------------

    def _destroy_row(self, journal: "Journal", row_id: int) -> None:
        row = journal.get_instance(row_id)
        if row is None or not row.get("instance_id"):
            return
        journal.destroy_intent(row_id)
        self.client.destroy_instance(int(row["instance_id"]))
        journal.instance_destroyed(row_id)

    def release(self, run_id: str, journal: "Journal", *, keep_data: bool = False) -> None:
        row = journal.current_instance(run_id)
        if row is None:
            return
        if row["state"] == INSTANCE_CREATING:
            # a create interrupted before its answer (Ctrl-C): Vast may list the instance late,
            # so look for the label as patiently as a lost create does before giving up on it
            self._settle_create(journal, row, "released while its create was under way",
                                patient=True)
            row = journal.current_instance(run_id)
            if row is None:
                return
        if seat_of(row):
            self._leave_seat(run_id, row, journal, keep_data=keep_data)
            return
        if keep_data:
            if row["state"] != INSTANCE_STOPPED:
                journal.add_event(run_id, "stop_intent", {"instance_id": row["instance_id"]})
                self.client.stop_instance(int(row["instance_id"]))
                journal.instance_stopped(int(row["id"]))
            return
        self._destroy_row(journal, int(row["id"]))
        self._sweep_label(run_id, journal)

    def stop_machine(self, run_id: str, journal: "Journal") -> None:
        """Stop the whole shared instance the run sits on, through the API: its agent ignored
        the cost cap's STOP, so the machine is not trusted to stop that run's training itself.
        The other runs on it lose it like a machine that went offline (they continue elsewhere
        from their checkpoints at home, ``gpu.on_lost``); it is never started again for them
        (:meth:`reattach`), only for this run's ``fetch``. This run's row is kept ``stopped``."""
        row = journal.current_instance(run_id)
        if row is None or not row.get("instance_id"):
            return
        journal.add_event(run_id, UNTRUSTED_MACHINE, {"instance_id": row["instance_id"]})
        journal.add_event(run_id, "stop_intent", {"instance_id": row["instance_id"],
                                                  "why": "its agent ignored STOP"})
        self.client.stop_instance(int(row["instance_id"]))
        journal.instance_stopped(int(row["id"]))

    def _leave_seat(self, run_id: str, row: dict[str, Any], journal: "Journal", *,
                    keep_data: bool) -> None:
        """Release one seat of a shared multi-GPU instance: the instance is stopped or destroyed
        only by the last run on it (``Journal.leave_seat`` decides, atomically)."""
        if row["state"] == INSTANCE_STOPPED and keep_data:
            return  # already kept
        action = journal.leave_seat(int(row["id"]), keep=keep_data)
        if action == "destroy":
            self._destroy_row(journal, int(row["id"]))
            self._sweep_label(run_id, journal)
        elif action == "stop":
            journal.add_event(run_id, "stop_intent", {"instance_id": row["instance_id"],
                                                      "why": "a seat's bundle is not home"})
            self.client.stop_instance(int(row["instance_id"]))
            if keep_data:
                journal.instance_stopped(int(row["id"]))
            else:
                journal.add_event(run_id, "stop_result", {"instance_id": row["instance_id"]})

    def hand_over(self, run_id: str, to_run_id: str, journal: "Journal") -> int:
        """The batch's next run takes the instance: journaled first, then relabelled for the new
        run (what the console and ``gc`` show). A failed relabel is only journaled: the journal,
        not the label, says who owns a live instance."""
        row = journal.current_instance(run_id)
        if row is None or row["state"] != INSTANCE_LIVE:
            raise RunError(f"run {run_id} holds no live instance to hand over")
        new_row = journal.hand_over_instance(int(row["id"]), to_run_id)
        label = instance_label(to_run_id)
        try:
            self.client.label_instance(int(row["instance_id"]), label)
        except ProviderError as exc:
            journal.add_event(to_run_id, "label_failed", {"label": label, "error": str(exc)})
        return new_row

    def _sweep_label(self, run_id: str, journal: "Journal") -> None:
        """Destroy every other instance carrying exactly this run's label (journaled).

        A safety net for a create whose lost answer was read back in vain, then sent again: the
        first instance may have appeared after all. The run itself is over by now, so a failure
        here is only journaled (``label_sweep_failed``); ``flux-remote gc`` finds what is left.
        """
        label = instance_label(run_id)
        destroyed = {str(r["instance_id"]) for r in journal.instances()
                     if r.get("instance_id") and r["state"] == INSTANCE_DESTROYED}
        # an instance handed to another run of the batch still carries this label for a moment
        destroyed |= {str(r["instance_id"]) for r in journal.instances()
                      if r.get("instance_id") and r["state"] == INSTANCE_LIVE}
        try:
            late = [i for i in self.client.list_instances(label)
                    if i.get("label") == label and str(i.get("id")) not in destroyed]
        except ProviderError as exc:
            journal.add_event(run_id, "label_sweep_failed", {"label": label, "error": str(exc)})
            return
        for inst in late:
            try:
                self.destroy_orphan({"instance_id": inst["id"], "run_id": run_id}, journal)
            except ProviderError as exc:
                journal.add_event(run_id, "label_sweep_failed",
                                  {"label": label, "instance_id": str(inst["id"]),
                                   "error": str(exc)})

    # ---- reconciliation and gc -------------------------------------------------------------

    def _settle_create(self, journal: "Journal", row: dict[str, Any], why: str, *,
                       patient: bool = False) -> str:
        """A create intent without a result: the label says whether the instance exists.

        ``patient``: look again on the client's ``CREATE_READ_BACK_S`` schedule (the window a
        lost create answer is read back in: Vast can list a new instance late) before the
        create is marked failed."""
        from controller.vast.client import CREATE_READ_BACK_S

        label = row.get("label") or instance_label(row["run_id"])
        known = {r["instance_id"] for r in journal.instances() if r.get("instance_id")}
        found: list[dict[str, Any]] = []
        for delay in (0.0, *(CREATE_READ_BACK_S if patient else ())):
            if delay:
                self.sleep(delay)
            found = [i for i in self.client.list_instances(label) if i.get("label") == label
                     and str(i.get("id")) not in known]
            if found:
                break
        if found:
            newest = max(found, key=lambda i: int(i.get("id") or 0))
            journal.instance_created(int(row["id"]), newest["id"], billing_started_at=self.clock())
            return f"run {row['run_id']}: instance {newest['id']} was created (found by label)"
        journal.instance_failed(int(row["id"]), f"no instance labelled {label}: {why}")
        return f"run {row['run_id']}: the create never happened"

    def reconcile(self, journal: "Journal") -> list[str]:
        lines = []
        for row in journal.pending_intents():
            if row["provider"] != self.name:
                continue
            if row["state"] == INSTANCE_CREATING:
                lines.append(self._settle_create(journal, row, "reconciled after a crash"))
            elif row["state"] == INSTANCE_DESTROYING:
                self.client.destroy_instance(int(row["instance_id"]))
                journal.instance_destroyed(int(row["id"]))
                lines.append(f"run {row['run_id']}: instance {row['instance_id']} destroyed")
        return lines

    def _owned_ids(self, journal: "Journal") -> set[str]:
        active = {r["run_id"] for r in journal.list_runs() if r["state"] in ACTIVE_STATES}
        owned = set()
        for row in journal.instances():
            if not row.get("instance_id"):
                continue
            if row["state"] == INSTANCE_STOPPED:
                owned.add(str(row["instance_id"]))  # kept on purpose: its bundle is unfetched
            elif row["state"] == INSTANCE_LIVE and row["run_id"] in active:
                owned.add(str(row["instance_id"]))
        return owned

    def orphans(self, journal: "Journal") -> list[dict[str, Any]]:
        owned = self._owned_ids(journal)
        result = []
        for inst in self.client.list_instances(LABEL_PREFIX):
            if str(inst.get("id")) in owned:
                continue
            label = str(inst.get("label") or "")
            result.append({"instance_id": inst.get("id"), "label": label,
                           "run_id": label[len(LABEL_PREFIX):], "status": inst.get("actual_status"),
                           "dph_total": inst.get("dph_total"), "gpu_name": inst.get("gpu_name")})
        return result

    def destroy_orphan(self, instance: dict[str, Any], journal: "Journal") -> None:
        instance_id = str(instance["instance_id"])
        rows = [r for r in journal.instances() if r.get("instance_id") == instance_id]
        if rows:
            self._destroy_row(journal, int(rows[-1]["id"]))
            return
        run_id = instance.get("run_id") or None
        if run_id is not None and journal.get_run(run_id) is None:
            run_id = None
        journal.add_event(run_id, "gc_destroy_intent", {"instance_id": instance_id})
        self.client.destroy_instance(int(instance_id))
        journal.add_event(run_id, "gc_destroy_result", {"instance_id": instance_id})
