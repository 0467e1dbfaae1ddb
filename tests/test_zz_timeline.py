import json
from pathlib import Path
from typing import Any
import pytest
from controller.batch.scheduler import BatchScheduler
from controller.batch.setup import create_batch
from controller.journal import open_journal
from controller.spec.loader import load_file
from tests.test_batch_scheduler import FAST, add_twin_offers, batch_file
from tests.test_launch_vast_e2e import vast_provider, vast_spec


@pytest.mark.ssh
def test_timeline(tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    add_twin_offers(fake_vast, 2)
    path = batch_file(vast_spec(tmp_path, name="ru", steps=2), {
        "max_usd": 20, "max_parallel": 1, "reuse_machines": True,
        "sweep": {"training.lr": [1e-3, 2e-3]}})
    journal = open_journal()
    batch_id = create_batch(journal, load_file(path), out_dir=tmp_path / "out")
    def factory(name: str, claims: Any) -> Any:
        return vast_provider(fake_vast, sshd, offer_claims=claims,
                             measured_s_per_step=journal.measured_s_per_step())
    BatchScheduler(journal, batch_id, provider_factory=factory, options=FAST).run()
    t0 = min(e["at"] for e in journal.events())
    with open("/tmp/timeline.txt", "w") as f:
        for e in journal.events():
            f.write(f"{e['at']-t0:7.2f} {str(e['run_id'])[:20]:20} {e['kind']:18} {json.dumps(e['detail'])[:100]}\n")
