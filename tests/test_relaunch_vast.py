"""A run outbid on FakeVast continues on the next offer (a real sshd is the instance).

The outbid is FakeVast's ``outbid()`` (the instance stops, ``exited``/``stopped``); the container's
processes end with it (every process of the run dir is killed), its SSH goes away (the sshd is
stopped) and the next machine has a fresh disk (the run dir is removed). The sshd comes back when
the next instance is created: FakeVast hands out the same endpoint for every instance.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from controller.journal import open_journal
from controller.run import relaunch
from controller.run.fetch import verify_sums
from controller.run.orchestrator import Options, Orchestrator
from controller.spec.loader import load_spec
from tests.test_batch_scheduler import add_twin_offers
from tests.test_launch_vast_e2e import Recorder, vast_provider, vast_spec

pytestmark = [pytest.mark.ssh, pytest.mark.slow]


def kill_processes_of(run_dir: Path) -> int:
    """SIGKILL every process whose command line or working directory is in ``run_dir``."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(run_dir) in cmdline or cwd.startswith(str(run_dir)):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


# When the machine is outbid: (which machine of the run, 0 for the first; the step whose
# checkpoint has just come home). "late" leaves one checkpoint interval of the 16 steps.
OUTBIDS = {"early": [(0, 4)], "late": [(0, 12)], "twice": [(0, 4), (1, 8)]}


@pytest.mark.parametrize("when", sorted(OUTBIDS))
def test_a_run_outbid_on_fake_vast_continues_on_the_next_offer(
        when: str, tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    add_twin_offers(fake_vast, 3)
    spec = load_spec(vast_spec(tmp_path, name="ob", steps=16,
                               publish={"fetch_checkpoints": True}))
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd, reconnect_window_s=2.0)
    plan = OUTBIDS[when]
    outbids: list[dict[str, Any]] = []
    run_ids: list[str] = []

    class Outbidder(Recorder):
        """Outbids the run's machine as soon as the planned checkpoint is home."""

        def note(self, text: str) -> None:
            super().note(text)
            if len(outbids) == len(plan) or "is home" not in text:
                return
            run = journal.get_run(run_ids[0])
            rows = journal.instances(run_ids[0])
            machine, step = plan[len(outbids)]
            if len(rows) - 1 != machine or (run["step"] or 0) < step:
                return
            run_dir = Path(run["remote_run_dir"])
            outbids.append({"iid": int(rows[-1]["instance_id"]), "step": run["step"]})
            fake_vast.outbid(outbids[-1]["iid"])
            if len(outbids) == len(plan):
                # the delay only had to keep the machines mid-run until now: the last
                # machine's agent (started with ``orch.env``) trains at full speed
                orch.env.pop("FLUX_REMOTE_TINY_STEP_DELAY", None)
            kill_processes_of(run_dir)
            sshd.stop()
            shutil.rmtree(run_dir)

    real_create = fake_vast._create

    def create(offer_id: int, body: dict[str, Any]) -> Any:
        if outbids and sshd.pid is None:
            sshd.start()
        return real_create(offer_id, body)

    fake_vast._create = create  # type: ignore[method-assign]
    env = {**os.environ, "FLUX_REMOTE_TINY_STEP_DELAY": "0.4"}
    orch = Orchestrator(journal, provider, reporter=Outbidder(), env=env)
    estimate = provider.estimate(spec)
    out = tmp_path / "bundle"
    run_ids.append(orch.create_run(spec, estimate, out_dir=out))
    try:
        outcome = orch.drive(run_ids[0], Options(poll_interval=0.2), estimate)
    finally:
        if sshd.pid is None:
            sshd.start()
    assert outcome.state == "done", outcome.error
    assert len(outbids) == len(plan), orch.reporter.notes  # type: ignore[attr-defined]
    rows = journal.instances(run_ids[0])
    assert len(rows) == len(plan) + 1 and all(r["state"] == "destroyed" for r in rows)
    assert fake_vast.instances == {}  # every machine destroyed, the outbid ones too
    # each loss cost at most one checkpoint interval: training went on from the checkpoint
    # that was home when the machine went
    continues = journal.events(run_ids[0], kind=relaunch.CONTINUE)
    assert len(continues) == len(plan)
    for cont, (_, step) in zip(continues, plan):
        assert cont["detail"]["step"] >= step
        assert cont["detail"]["lost_at_step"] - cont["detail"]["step"] <= \
            spec.training.save_every
    receipt = json.loads((out / "controller_receipt.json").read_text())
    assert [m["instance_id"] for m in receipt["machines"]] == [r["instance_id"] for r in rows]
    assert receipt["metered_usd"] <= spec.budget.max_usd
    assert verify_sums(out) >= 3
    # the agents after a loss resumed from the shipped checkpoint, not from step 0
    log = "\n".join(orch.reporter.lines)  # type: ignore[attr-defined]
    assert log.count("resume_from_checkpoint: training starts from") >= len(plan), log[-2000:]
