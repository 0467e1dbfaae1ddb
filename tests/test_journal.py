import sqlite3
import threading

import pytest

from controller import journal as jmod
from controller.journal import Journal
from controller.run.states import instance_label, new_run_id


def _run(j: Journal, run_id: str = "demo-20261129-184000-abcd", **kw) -> str:
    j.create_run(run_id=run_id, name="demo", provider="vast", state="planned",
                 spec={"name": "demo"}, out_dir="/tmp/out", budget_usd=5.0, **kw)
    return run_id


def test_blank_database_gets_every_migration(tmp_path):
    j = Journal(tmp_path / "j.sqlite3")
    assert j.applied_migrations() == [m.__name__.lstrip("_") for m in jmod.MIGRATIONS]
    mode = j._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert j.migrate() == []  # idempotent


def test_old_database_is_migrated_forward(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    jmod._m001_initial(db)
    db.execute("INSERT INTO _migrations VALUES ('m001_initial', 0)")
    db.execute("INSERT INTO runs (run_id, name, provider, state, spec_json, out_dir, budget_usd,"
               " created_at, updated_at) VALUES ('r1', 'n', 'local', 'done', '{}', '/o', 1, 0, 0)")
    db.commit()
    db.close()
    j = Journal(path)
    assert j.applied_migrations()[:2] == ["m001_initial", "m002_follow_state"]
    assert j.applied_migrations() == [m.__name__.lstrip("_") for m in jmod.MIGRATIONS]
    assert j.list_batches() == [] and j.runs_of_batch("none") == []  # m003: the batch tables
    run = j.get_run("r1")
    assert run["log_offset"] == 0 and run["spend_usd"] == 0


def test_a_failing_migration_leaves_no_record(tmp_path, monkeypatch):
    def m003_broken(db):
        db.execute("CREATE TABLE half (x)")
        raise RuntimeError("boom")

    j = Journal(tmp_path / "j.sqlite3")
    monkeypatch.setattr(jmod, "MIGRATIONS", [*jmod.MIGRATIONS, m003_broken])
    with pytest.raises(RuntimeError):
        j.migrate()
    assert "m003_broken" not in j.applied_migrations()
    assert not j._db.execute("SELECT 1 FROM sqlite_master WHERE name='half'").fetchone()


def test_run_state_changes_are_events(tmp_path):
    clock = iter(range(100, 200)).__next__
    j = Journal(tmp_path / "j.sqlite3", clock=lambda: float(clock()))
    run_id = _run(j)
    j.update_run(run_id, state="renting")
    j.update_run(run_id, state="renting", stage="x")
    states = [e["detail"]["state"] for e in j.events(run_id, kind="state")]
    assert states == ["planned", "renting"]
    with pytest.raises(ValueError):
        j.update_run(run_id, bogus=1)


def test_instance_intent_then_result(tmp_path):
    j = Journal(tmp_path / "j.sqlite3")
    run_id = _run(j)
    row = j.instance_intent(run_id, provider="vast", label=instance_label(run_id), offer_id=7,
                            gpu_name="RTX 4090", dph_total=0.4)
    assert [r["id"] for r in j.pending_intents()] == [row]
    j.instance_created(row, 1234, billing_started_at=50.0)
    assert j.pending_intents() == []
    inst = j.current_instance(run_id)
    assert inst["instance_id"] == "1234" and inst["state"] == "live"
    assert inst["billing_started_at"] == 50.0
    j.destroy_intent(row)
    assert [r["id"] for r in j.pending_intents()] == [row]
    j.instance_destroyed(row)
    assert j.current_instance(run_id) is None
    kinds = [e["kind"] for e in j.events(run_id) if e["kind"] != "state"]
    assert kinds == ["rent_intent", "rent_result", "destroy_intent", "destroy_result"]


def test_failed_create_is_not_current(tmp_path):
    j = Journal(tmp_path / "j.sqlite3")
    run_id = _run(j)
    row = j.instance_intent(run_id, provider="vast", offer_id=1)
    j.instance_failed(row, "offer gone")
    assert j.current_instance(run_id) is None
    assert j.get_instance(row)["detail"] == "offer gone"


def test_spend_and_speeds(tmp_path):
    j = Journal(tmp_path / "j.sqlite3")
    run_id = _run(j)
    j.add_spend_sample(run_id, usd=0.5, dph_total=0.4)
    j.add_spend_sample(run_id, usd=0.7, dph_total=0.4, bandwidth_usd=0.01)
    assert j.get_run(run_id)["spend_usd"] == 0.7
    assert len(j.spend_samples(run_id)) == 2
    for value in (2.0, 3.0, 10.0):
        j.record_s_per_step("RTX 4090", value)
    assert j.measured_s_per_step() == {"RTX 4090": 3.0}


def test_find_runs_by_prefix(tmp_path):
    j = Journal(tmp_path / "j.sqlite3")
    _run(j, "demo-20261129-184000-abcd")
    _run(j, "demo-20261129-184100-ef01")
    assert len(j.find_runs("demo-2026")) == 2
    assert [r["run_id"] for r in j.find_runs("demo-20261129-1841")] == ["demo-20261129-184100-ef01"]
    assert j.find_runs("nope") == []


def test_two_connections_write_concurrently(tmp_path):
    a = Journal(tmp_path / "j.sqlite3")
    b = Journal(tmp_path / "j.sqlite3")
    run_id = _run(a)

    def writer(j: Journal) -> None:
        for i in range(20):
            j.add_event(run_id, "poll", {"i": i})

    threads = [threading.Thread(target=writer, args=(j,)) for j in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(a.events(run_id, kind="poll")) == 40


def test_run_id_format():
    run_id = new_run_id("demo", now=0, suffix="abcd")
    assert run_id == "demo-19700101-000000-abcd"
    assert len(new_run_id("x").rsplit("-", 1)[1]) == 4
