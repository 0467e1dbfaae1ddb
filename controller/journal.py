"""The journal: what the controller knows about every run and every instance it ever rented.

One SQLite file in the state dir (``journal.sqlite3``), WAL mode, so a second ``flux-remote``
process (``status`` while ``launch`` follows) reads while the first writes.

Money rule: every side effect that costs or saves money is written twice, an *intent* row before
the call and its *result* after it (``instance_intent`` -> ``instance_created`` /
``instance_failed``; ``destroy_intent`` -> ``instance_destroyed``). A crash between the two leaves
an intent row behind; the next command reconciles it by listing the provider's instances by label
(``controller.run.reconcile``), so one intent never becomes two instances.

Schema changes are migrations: an ordered list of small named functions, each applied in one
transaction together with its row in ``_migrations`` (the sqlite-utils / llm pattern). A blank
database and an old one reach the same schema.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

JOURNAL_NAME = "journal.sqlite3"

# Instance rows: "creating" is an intent whose result is unknown until reconciled.
INSTANCE_CREATING = "creating"
INSTANCE_LIVE = "live"
INSTANCE_STOPPED = "stopped"
INSTANCE_DESTROYING = "destroying"
INSTANCE_DESTROYED = "destroyed"
INSTANCE_FAILED = "failed"  # the create never produced an instance (offer gone, refused)
# The run let its machine go to the batch's next run (``hand_over_instance``): the instance lives
# on under that run's row; this row's ``destroyed_at`` is when its share of the bill ended.
INSTANCE_HANDED_OVER = "handed_over"
# A run left its seat on a multi-GPU instance that other runs still train on: its bill ends, the
# instance lives on (``Journal.leave_seat``).
INSTANCE_LEFT = "left"
INSTANCE_ALIVE_STATES = (INSTANCE_CREATING, INSTANCE_LIVE, INSTANCE_STOPPED, INSTANCE_DESTROYING)


def _m001_initial(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            batch_id TEXT,
            provider TEXT NOT NULL,
            state TEXT NOT NULL,
            spec_json TEXT NOT NULL,
            spec_path TEXT,
            out_dir TEXT NOT NULL,
            budget_usd REAL NOT NULL,
            est_usd REAL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            ended_at REAL,
            error TEXT
        )"""
    )
    db.execute(
        """CREATE TABLE instances (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            provider TEXT NOT NULL,
            offer_id TEXT,
            instance_id TEXT,
            label TEXT,
            gpu_name TEXT,
            num_gpus INTEGER,
            dph_total REAL NOT NULL DEFAULT 0,
            state TEXT NOT NULL,
            intent_at REAL NOT NULL,
            billing_started_at REAL,
            destroyed_at REAL,
            updated_at REAL NOT NULL,
            detail TEXT
        )"""
    )
    db.execute("CREATE INDEX instances_run ON instances(run_id)")
    db.execute(
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            detail TEXT
        )"""
    )
    db.execute("CREATE INDEX events_run ON events(run_id)")
    db.execute(
        """CREATE TABLE spend_samples (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            at REAL NOT NULL,
            usd REAL NOT NULL,
            dph_total REAL NOT NULL,
            bandwidth_usd REAL NOT NULL DEFAULT 0
        )"""
    )
    db.execute("CREATE INDEX spend_run ON spend_samples(run_id)")
    db.execute(
        """CREATE TABLE gpu_speeds (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            gpu_name TEXT NOT NULL,
            s_per_step REAL NOT NULL,
            run_id TEXT,
            at REAL NOT NULL
        )"""
    )


def _m002_follow_state(db: sqlite3.Connection) -> None:
    """What a reattaching controller needs: where the log was read up to, the live numbers."""
    db.execute("ALTER TABLE runs ADD COLUMN log_offset INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE runs ADD COLUMN remote_run_dir TEXT")
    db.execute("ALTER TABLE runs ADD COLUMN step INTEGER")
    db.execute("ALTER TABLE runs ADD COLUMN total INTEGER")
    db.execute("ALTER TABLE runs ADD COLUMN loss REAL")
    db.execute("ALTER TABLE runs ADD COLUMN stage TEXT")
    db.execute("ALTER TABLE runs ADD COLUMN spend_usd REAL NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE runs ADD COLUMN stop_requested INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE runs ADD COLUMN bundle_path TEXT")
    db.execute("ALTER TABLE instances ADD COLUMN ssh_host TEXT")
    db.execute("ALTER TABLE instances ADD COLUMN ssh_port INTEGER")


def _m003_batches(db: sqlite3.Connection) -> None:
    """Batches (``controller.batch.scheduler``): one row per batch, one per run slot it expands to."""
    db.execute(
        """CREATE TABLE batches (
            batch_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            spec_path TEXT,
            out_dir TEXT NOT NULL,
            max_usd REAL NOT NULL,
            max_parallel INTEGER NOT NULL,
            retries INTEGER NOT NULL,
            margin REAL NOT NULL,
            varied_json TEXT NOT NULL DEFAULT '[]',
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            ended_at REAL
        )"""
    )
    db.execute(
        """CREATE TABLE batch_runs (
            batch_id TEXT NOT NULL REFERENCES batches(batch_id),
            idx INTEGER NOT NULL,
            name TEXT NOT NULL,
            label TEXT,
            params_json TEXT NOT NULL DEFAULT '{}',
            spec_json TEXT NOT NULL,
            state TEXT NOT NULL,
            run_id TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            note TEXT,
            PRIMARY KEY (batch_id, idx)
        )"""
    )


def _m004_machine_reuse(db: sqlite3.Connection) -> None:
    """Batches that hand a finished run's machine to the next run (``batch.reuse_machines``)."""
    db.execute("ALTER TABLE batches ADD COLUMN reuse_machines INTEGER NOT NULL DEFAULT 0")


def _m005_gpu_seats(db: sqlite3.Connection) -> None:
    """Batches that run several runs at once on one multi-GPU instance
    (``batch.gpus_per_machine``); older batches keep one run per instance."""
    db.execute("ALTER TABLE batches ADD COLUMN gpus_per_machine INTEGER NOT NULL DEFAULT 1")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m001_initial, _m002_follow_state,
                                                          _m003_batches, _m004_machine_reuse,
                                                          _m005_gpu_seats]

RUN_FIELDS = {
    "state", "error", "ended_at", "est_usd", "log_offset", "remote_run_dir", "step", "total",
    "loss", "stage", "spend_usd", "stop_requested", "bundle_path", "out_dir", "budget_usd",
}
INSTANCE_FIELDS = {
    "instance_id", "state", "billing_started_at", "destroyed_at", "detail", "ssh_host", "ssh_port",
    "dph_total", "gpu_name",
}


FAULT_ENV = "FLUX_REMOTE_FAULT"
_fault_seen: dict[str, int] = {}


def _live_row_like(db: sqlite3.Connection, row: Any, run_id: str, detail: str,
                   now: float) -> int:
    """A new live row for ``run_id`` on the same instance as ``row`` (same endpoint and price),
    billing from ``now``; returns its id."""
    cur = db.execute(
        "INSERT INTO instances (run_id, provider, offer_id, instance_id, label, gpu_name,"
        " num_gpus, dph_total, state, intent_at, billing_started_at, updated_at, detail,"
        " ssh_host, ssh_port) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, row["provider"], row["offer_id"], row["instance_id"], row["label"],
         row["gpu_name"], row["num_gpus"], row["dph_total"], INSTANCE_LIVE, now, now, now,
         detail, row["ssh_host"], row["ssh_port"]))
    return int(cur.lastrowid)


# A seat's agent ignored STOP, so its shared instance was stopped through the provider's API
# (``VastProvider.stop_machine``): no other run starts that instance again.
UNTRUSTED_MACHINE = "machine_untrusted"


def untrusted_machine(journal: "Journal", instance_id: Any) -> bool:
    """Whether an agent on this instance ignored STOP (an ``UNTRUSTED_MACHINE`` event)."""
    return any(str(e["detail"].get("instance_id")) == str(instance_id)
               for e in journal.events(kind=UNTRUSTED_MACHINE))


def seat_of(row: dict[str, Any]) -> dict[str, Any]:
    """``{"seat", "seats"}`` of an instance row on a shared multi-GPU instance, else ``{}``."""
    try:
        detail = json.loads(row.get("detail") or "{}")
    except (TypeError, ValueError):
        return {}
    if not isinstance(detail, dict) or int(detail.get("seats") or 1) < 2:
        return {}
    return {"seat": int(detail.get("seat") or 0), "seats": int(detail["seats"])}


def fault_point(point: str) -> None:
    """Test-only knob: ``FLUX_REMOTE_FAULT=after:<point>[@N]`` SIGKILLs this process right after
    the journal committed the N-th (default first) event ``<point>`` (an event kind such as
    ``rent_intent``, ``rent_result``, ``transfer``, ``destroy_intent``, or ``state=<run state>``).
    The fault tests (``tests/test_faults_controller.py``) use it to kill the controller at each
    state transition; unset, it costs one dictionary lookup."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted.startswith("after:"):
        return
    name, _, nth = wanted[len("after:"):].partition("@")
    if name != point:
        return
    _fault_seen[point] = _fault_seen.get(point, 0) + 1
    if _fault_seen[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def journal_path() -> Path:
    from controller.state import state_dir

    return state_dir() / JOURNAL_NAME


def open_journal(path: Path | None = None, *, clock: Callable[[], float] = time.time) -> "Journal":
    """The journal at ``path`` (default: the state dir's), migrated to the current schema."""
    return Journal(path or journal_path(), clock=clock)


class Journal:
    """A thin, thread-safe facade over the SQLite file; every write is one short transaction."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.RLock()
        self._written: list[str] = []  # event points of the open transaction (fault_point)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    # ---- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                self._written = []
                raise
            self._db.execute("COMMIT")
            written, self._written = self._written, []
        for point in written:
            fault_point(point)

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, args).fetchall()]

    def migrate(self) -> list[str]:
        """Apply the migrations this file has not seen yet; returns their names."""
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)"
            )
            done = {row[0] for row in self._db.execute("SELECT name FROM _migrations")}
        applied = []
        for migration in MIGRATIONS:
            name = migration.__name__.lstrip("_")
            if name in done:
                continue
            with self._tx() as db:
                if db.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone():
                    continue  # another process migrated meanwhile
                migration(db)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, self.clock()))
            applied.append(name)
        return applied

    def applied_migrations(self) -> list[str]:
        return [row["name"] for row in self._query("SELECT name FROM _migrations ORDER BY rowid")]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- runs ------------------------------------------------------------------------------

    def create_run(self, *, run_id: str, name: str, provider: str, state: str,
                   spec: dict[str, Any], out_dir: str, budget_usd: float,
                   est_usd: float | None = None, spec_path: str | None = None,
                   batch_id: str | None = None) -> None:
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (run_id, name, batch_id, provider, state, spec_json, spec_path,"
                " out_dir, budget_usd, est_usd, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, name, batch_id, provider, state, json.dumps(spec), spec_path, out_dir,
                 budget_usd, est_usd, now, now),
            )
            self._event(db, run_id, "state", {"state": state})

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set run columns; a change of ``state`` is also recorded as an event."""
        unknown = set(fields) - RUN_FIELDS
        if unknown:
            raise ValueError(f"unknown run fields: {sorted(unknown)}")
        if not fields:
            return
        with self._tx() as db:
            if "state" in fields:
                old = db.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                if old is not None and old[0] != fields["state"]:
                    self._event(db, run_id, "state", {"state": fields["state"], "from": old[0]})
            cols = ", ".join(f"{key} = ?" for key in fields)
            db.execute(f"UPDATE runs SET {cols}, updated_at = ? WHERE run_id = ?",
                       (*fields.values(), self.clock(), run_id))

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return rows[0] if rows else None

    def find_runs(self, prefix: str) -> list[dict[str, Any]]:
        """Runs whose id equals or starts with ``prefix`` (so users can type a short id)."""
        exact = self.get_run(prefix)
        if exact:
            return [exact]
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return self._query("SELECT * FROM runs WHERE run_id LIKE ? ESCAPE '\\' ORDER BY created_at",
                           (pattern,))

    def list_runs(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM runs ORDER BY created_at, run_id")

    # ---- instances: the money side effects -------------------------------------------------

    def instance_intent(self, run_id: str, *, provider: str, label: str | None = None,
                        offer_id: Any = None, gpu_name: str | None = None, num_gpus: int = 1,
                        dph_total: float = 0.0, seats: int = 1) -> int:
        """Record that we are about to rent; returns the row id the result is written to.

        ``seats`` > 1: the instance is rented for that many runs at once, one per GPU
        (``controller.planning.packing``); this row is seat 0 and ``dph_total`` its share."""
        now = self.clock()
        detail = json.dumps({"seat": 0, "seats": int(seats)}) if seats > 1 else None
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO instances (run_id, provider, offer_id, label, gpu_name, num_gpus,"
                " dph_total, state, intent_at, updated_at, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, provider, None if offer_id is None else str(offer_id), label, gpu_name,
                 num_gpus, dph_total, INSTANCE_CREATING, now, now, detail),
            )
            self._event(db, run_id, "rent_intent", {"offer_id": offer_id, "dph_total": dph_total})
            return int(cur.lastrowid)

    def instance_created(self, row_id: int, instance_id: Any, *,
                         billing_started_at: float | None = None) -> None:
        self._set_instance(row_id, "rent_result", instance_id=str(instance_id),
                           state=INSTANCE_LIVE,
                           billing_started_at=billing_started_at or self.clock())

    def hand_over_instance(self, row_id: int, to_run_id: str) -> int:
        """Give a live instance to another run, in one transaction: this row ends
        (``handed_over``, its bill stops now) and a new live row for ``to_run_id`` starts billing
        now, with the same instance, endpoint and price. Returns the new row's id.

        No API call is made: the instance keeps running (``controller.run.handover``); the
        rows of one machine form a chain through ``detail.from_row`` (``controller.batch.shares``)."""
        now = self.clock()
        with self._tx() as db:
            row = db.execute("SELECT * FROM instances WHERE id = ?", (row_id,)).fetchone()
            if row is None or row["state"] != INSTANCE_LIVE or not row["instance_id"]:
                raise ValueError(f"instance row {row_id} is not a live instance")
            detail = json.dumps({"from_run": row["run_id"], "from_row": row_id,
                                 **seat_of(dict(row))})
            db.execute("UPDATE instances SET state = ?, destroyed_at = ?, updated_at = ? "
                       "WHERE id = ?", (INSTANCE_HANDED_OVER, now, now, row_id))
            new_row = _live_row_like(db, row, to_run_id, detail, now)
            self._event(db, row["run_id"], "handover_out", {
                "instance_id": row["instance_id"], "to_run": to_run_id, "row": new_row})
            self._event(db, to_run_id, "handover_in", {
                "instance_id": row["instance_id"], "from_run": row["run_id"], "row": new_row})
            return new_row

    def open_seat(self, row_id: int, to_run_id: str, seat: int) -> int:
        """Put ``to_run_id`` on GPU ``seat`` of the shared instance that row ``row_id`` (a live
        seat of it) is on: a new live row at the same seat price, billing from now. Refused
        when that seat is taken."""
        now = self.clock()
        with self._tx() as db:
            row = db.execute("SELECT * FROM instances WHERE id = ?", (row_id,)).fetchone()
            if row is None or row["state"] != INSTANCE_LIVE or not row["instance_id"]:
                raise ValueError(f"instance row {row_id} is not a live instance")
            seats = int(seat_of(dict(row)).get("seats") or 1)
            if not 0 < seat < seats:
                raise ValueError(f"instance {row['instance_id']} has no seat {seat}")
            # (an instance whose last seat is leaving has no live row: ``leave_seat``)
            for other in db.execute("SELECT detail FROM instances WHERE instance_id = ? AND "
                                    "state = ?", (row["instance_id"], INSTANCE_LIVE)):
                if seat_of(dict(other)).get("seat") == seat:
                    raise ValueError(f"seat {seat} of instance {row['instance_id']} is taken")
            detail = json.dumps({"seat": seat, "seats": seats, "shared_from_row": row_id})
            new_row = _live_row_like(db, row, to_run_id, detail, now)
            self._event(db, to_run_id, "seat_open", {
                "instance_id": row["instance_id"], "seat": seat, "seats": seats, "row": new_row})
            return new_row

    def leave_seat(self, row_id: int, *, keep: bool = False) -> str:
        """A run lets its seat of a shared instance go, in one transaction, so that of two runs
        leaving at once exactly one is the last. Returns what the caller must do:

        * ``"left"``: other runs still train on the instance: this row ends (``left``, its bill
          stops now; ``keep``: ``stopped``, its unfetched bundle keeps the instance from being
          destroyed) and the instance is not touched;
        * ``"stop"``: the last seat, and a run's bundle is still on it (``keep``, or a seat left
          ``stopped``): stop the instance (disk kept);
        * ``"destroy"``: the last seat: destroy the instance."""
        now = self.clock()
        with self._tx() as db:
            row = db.execute("SELECT * FROM instances WHERE id = ?", (row_id,)).fetchone()
            if row is None or not row["instance_id"]:
                raise ValueError(f"instance row {row_id} is not an instance")
            others = [dict(r) for r in db.execute(
                "SELECT * FROM instances WHERE instance_id = ? AND id != ? AND state IN (?, ?)",
                (row["instance_id"], row_id, INSTANCE_LIVE, INSTANCE_STOPPED))]
            live = [r for r in others if r["state"] == INSTANCE_LIVE]
            kept = [r for r in others if r["state"] == INSTANCE_STOPPED]
            if live:
                state = INSTANCE_STOPPED if keep else INSTANCE_LEFT
                db.execute("UPDATE instances SET state = ?, destroyed_at = ?, updated_at = ? "
                           "WHERE id = ?", (state, None if keep else now, now, row_id))
                self._event(db, row["run_id"], "seat_left", {
                    "instance_id": row["instance_id"], "keep": keep,
                    "still_on_it": sorted(r["run_id"] for r in live)})
                return "left"
            if kept and not keep:
                db.execute("UPDATE instances SET state = ?, destroyed_at = ?, updated_at = ? "
                           "WHERE id = ?", (INSTANCE_LEFT, now, now, row_id))
                self._event(db, row["run_id"], "seat_left", {
                    "instance_id": row["instance_id"], "keep": False, "last": True,
                    "kept_for": sorted(r["run_id"] for r in kept)})
            if keep or kept:
                return "stop"
            # claimed in this transaction: no seat opens on an instance about to be destroyed
            db.execute("UPDATE instances SET state = ?, updated_at = ? WHERE id = ?",
                       (INSTANCE_DESTROYING, now, row_id))
            self._event(db, row["run_id"], "seat_last", {"instance_id": row["instance_id"]})
            return "destroy"

    def machine_rows(self, instance_id: Any) -> list[dict[str, Any]]:
        """Every row of one provider instance, in order: the runs it served one after another."""
        return self._query("SELECT * FROM instances WHERE instance_id = ? AND state != ? "
                           "ORDER BY id", (str(instance_id), INSTANCE_FAILED))

    def instance_failed(self, row_id: int, reason: str) -> None:
        """The create produced no instance (offer gone, refused, reconciled as never made)."""
        self._set_instance(row_id, "rent_failed", state=INSTANCE_FAILED, detail=reason)

    def destroy_intent(self, row_id: int) -> None:
        self._set_instance(row_id, "destroy_intent", state=INSTANCE_DESTROYING)

    def instance_destroyed(self, row_id: int) -> None:
        self._set_instance(row_id, "destroy_result", state=INSTANCE_DESTROYED,
                           destroyed_at=self.clock())

    def instance_stopped(self, row_id: int) -> None:
        self._set_instance(row_id, "stop_result", state=INSTANCE_STOPPED)

    def update_instance(self, row_id: int, **fields: Any) -> None:
        self._set_instance(row_id, None, **fields)

    def _set_instance(self, row_id: int, event: str | None, **fields: Any) -> None:
        unknown = set(fields) - INSTANCE_FIELDS
        if unknown:
            raise ValueError(f"unknown instance fields: {sorted(unknown)}")
        with self._tx() as db:
            cols = ", ".join(f"{key} = ?" for key in fields)
            db.execute(f"UPDATE instances SET {cols}, updated_at = ? WHERE id = ?",
                       (*fields.values(), self.clock(), row_id))
            if event:
                row = db.execute("SELECT run_id, instance_id FROM instances WHERE id = ?",
                                 (row_id,)).fetchone()
                if row is not None:
                    self._event(db, row[0], event, {"instance_id": row[1], **{
                        k: v for k, v in fields.items() if k in ("state", "detail")}})

    def get_instance(self, row_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM instances WHERE id = ?", (row_id,))
        return rows[0] if rows else None

    def instances(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return self._query("SELECT * FROM instances ORDER BY id")
        return self._query("SELECT * FROM instances WHERE run_id = ? ORDER BY id", (run_id,))

    def current_instance(self, run_id: str) -> dict[str, Any] | None:
        """The run's newest instance row that may still exist (or None)."""
        rows = self._query(
            "SELECT * FROM instances WHERE run_id = ? AND state IN (?, ?, ?, ?) ORDER BY id DESC",
            (run_id, *INSTANCE_ALIVE_STATES),
        )
        return rows[0] if rows else None

    def pending_intents(self) -> list[dict[str, Any]]:
        """Create or destroy intents whose result was never written (a crash in between)."""
        return self._query("SELECT * FROM instances WHERE state IN (?, ?) ORDER BY id",
                           (INSTANCE_CREATING, INSTANCE_DESTROYING))

    # ---- events, spend, speeds -------------------------------------------------------------

    def _event(self, db: sqlite3.Connection, run_id: str | None, kind: str,
               detail: dict[str, Any] | None) -> None:
        db.execute("INSERT INTO events (run_id, at, kind, detail) VALUES (?, ?, ?, ?)",
                   (run_id, self.clock(), kind, json.dumps(detail or {}, default=str)))
        self._written.append(f"state={(detail or {}).get('state')}" if kind == "state" else kind)

    def add_event(self, run_id: str | None, kind: str, detail: dict[str, Any] | None = None) -> None:
        with self._tx() as db:
            self._event(db, run_id, kind, detail)

    def events(self, run_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM events WHERE 1=1", []
        if run_id is not None:
            sql, args = sql + " AND run_id = ?", [*args, run_id]
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, kind]
        rows = self._query(sql + " ORDER BY id", tuple(args))
        for row in rows:
            row["detail"] = json.loads(row["detail"] or "{}")
        return rows

    def add_spend_sample(self, run_id: str, *, usd: float, dph_total: float,
                         bandwidth_usd: float = 0.0) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO spend_samples (run_id, at, usd, dph_total, bandwidth_usd)"
                " VALUES (?, ?, ?, ?, ?)", (run_id, self.clock(), usd, dph_total, bandwidth_usd))
            db.execute("UPDATE runs SET spend_usd = ?, updated_at = ? WHERE run_id = ?",
                       (usd, self.clock(), run_id))

    def spend_samples(self, run_id: str) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM spend_samples WHERE run_id = ? ORDER BY id", (run_id,))

    def record_s_per_step(self, gpu_name: str, s_per_step: float, run_id: str | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO gpu_speeds (gpu_name, s_per_step, run_id, at) VALUES (?, ?, ?, ?)",
                       (gpu_name, s_per_step, run_id, self.clock()))

    def measured_s_per_step(self) -> dict[str, float]:
        """Median measured seconds per step for each GPU model (feeds the planner)."""
        speeds: dict[str, list[float]] = {}
        for row in self._query("SELECT gpu_name, s_per_step FROM gpu_speeds"):
            speeds.setdefault(row["gpu_name"], []).append(row["s_per_step"])
        return {gpu: statistics.median(values) for gpu, values in speeds.items()}

    # ---- batches (controller.batch.scheduler) --------------------------------------------------------

    def create_batch(self, *, batch_id: str, name: str, spec_path: str | None, out_dir: str,
                     max_usd: float, max_parallel: int, retries: int, margin: float,
                     varied: list[str], items: list[dict[str, Any]],
                     reuse_machines: bool = False, gpus_per_machine: int = 1) -> None:
        """A batch and its run slots (``items``: idx, name, label, params, spec), all pending."""
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO batches (batch_id, name, spec_path, out_dir, max_usd, max_parallel,"
                " retries, margin, varied_json, state, created_at, updated_at, reuse_machines,"
                " gpus_per_machine) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                (batch_id, name, spec_path, out_dir, max_usd, max_parallel, retries, margin,
                 json.dumps(varied), now, now, int(bool(reuse_machines)), int(gpus_per_machine)))
            for item in items:
                db.execute(
                    "INSERT INTO batch_runs (batch_id, idx, name, label, params_json, spec_json,"
                    " state) VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                    (batch_id, item["idx"], item["name"], item.get("label"),
                     json.dumps(item.get("params") or {}, default=str), json.dumps(item["spec"])))
            self._event(db, None, "batch_created", {"batch_id": batch_id, "runs": len(items),
                                                    "max_usd": max_usd})

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM batches WHERE batch_id = ?", (batch_id,))
        return rows[0] if rows else None

    def find_batches(self, prefix: str) -> list[dict[str, Any]]:
        """Batches whose id equals or starts with ``prefix``."""
        exact = self.get_batch(prefix)
        if exact:
            return [exact]
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return self._query("SELECT * FROM batches WHERE batch_id LIKE ? ESCAPE '\\' "
                           "ORDER BY created_at", (pattern,))

    def list_batches(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM batches ORDER BY created_at, batch_id")

    def update_batch(self, batch_id: str, **fields: Any) -> None:
        unknown = set(fields) - {"state", "ended_at"}
        if unknown:
            raise ValueError(f"unknown batch fields: {sorted(unknown)}")
        with self._tx() as db:
            cols = ", ".join(f"{key} = ?" for key in fields)
            db.execute(f"UPDATE batches SET {cols}, updated_at = ? WHERE batch_id = ?",
                       (*fields.values(), self.clock(), batch_id))

    def batch_runs(self, batch_id: str) -> list[dict[str, Any]]:
        """The batch's run slots in order (``params_json``/``spec_json`` left as text)."""
        return self._query("SELECT * FROM batch_runs WHERE batch_id = ? ORDER BY idx", (batch_id,))

    def update_batch_run(self, batch_id: str, idx: int, **fields: Any) -> None:
        unknown = set(fields) - {"state", "run_id", "attempts", "note"}
        if unknown:
            raise ValueError(f"unknown batch run fields: {sorted(unknown)}")
        with self._tx() as db:
            cols = ", ".join(f"{key} = ?" for key in fields)
            db.execute(f"UPDATE batch_runs SET {cols} WHERE batch_id = ? AND idx = ?",
                       (*fields.values(), batch_id, idx))
            self._event(db, fields.get("run_id"), "batch_run",
                        {"batch_id": batch_id, "idx": idx, **fields})

    def runs_of_batch(self, batch_id: str) -> list[dict[str, Any]]:
        """Every run (each attempt) started for the batch."""
        return self._query("SELECT * FROM runs WHERE batch_id = ? ORDER BY created_at, run_id",
                           (batch_id,))
