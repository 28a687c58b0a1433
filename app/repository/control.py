"""The control plane's desired state, in an SQLite file beside the artifacts (``<engines_dir>/.control.db``).

Every worker process of every server on this machine reads and writes the same file: which models are wanted
loaded, which one is the default, a generation counter bumped on every change (workers poll it and reconcile), what
each worker has actually loaded (for the admin view), and the build jobs. SQLite in WAL mode from the standard
library: no server to run, readers never block the writer, and a process killed mid-transaction leaves the last
committed state (its journal is rolled back by the next opener). Each change is one short transaction.
"""

import json
import os
import socket
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import Conflict, NotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS wanted (name TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    host TEXT NOT NULL, pid INTEGER NOT NULL, model TEXT NOT NULL, state TEXT NOT NULL, error TEXT,
    memory_bytes INTEGER, generation INTEGER, serving TEXT, updated REAL NOT NULL, device_bytes INTEGER,
    PRIMARY KEY (host, pid, model));
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, name TEXT NOT NULL, command TEXT NOT NULL,
    request TEXT, state TEXT NOT NULL, progress TEXT NOT NULL DEFAULT '[]', error TEXT,
    submitter_pid INTEGER, owner_pid INTEGER, owner_host TEXT, child_pid INTEGER,
    created REAL NOT NULL, started REAL, finished REAL);
"""
PROGRESS_TAIL = 200  # progress lines kept per job
HOST = socket.gethostname()
ACTIVE_JOB_STATES = ("queued", "running")


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine is alive (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class Desired:
    """What every worker should serve: the default, and every model wanted loaded (the default among them)."""
    generation: int
    changed_at: float
    default: str | None
    loaded: frozenset[str]


class ControlStore:
    """The desired-state database. Safe to use from any thread and any process: each call opens its own
    connection (cheap for SQLite) and runs one transaction."""

    def __init__(self, path: Path, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        with self.transaction() as db:  # a store written before workers reported GPU memory
            if "device_bytes" not in {r[1] for r in db.execute("PRAGMA table_info(workers)")}:
                db.execute("ALTER TABLE workers ADD COLUMN device_bytes INTEGER")

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self):
        """One write transaction (``BEGIN IMMEDIATE``: takes the write lock up front, so no upgrade deadlock)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ---- desired state -------------------------------------------------------------------------------------

    @staticmethod
    def _get(db, key: str, default=None):
        row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @staticmethod
    def _set(db, key: str, value) -> None:
        db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                   "excluded.value", (key, None if value is None else str(value)))

    def _bump(self, db) -> None:
        self._set(db, "generation", int(self._get(db, "generation", 0)) + 1)
        self._set(db, "changed_at", repr(time.time()))

    def generation(self) -> int:
        """The change counter: workers compare it with the one they last applied (one indexed read)."""
        with self._connect() as db:
            return int(self._get(db, "generation", 0))

    def desired(self) -> Desired:
        with self._connect() as db:
            db.execute("BEGIN")  # one consistent snapshot
            default = self._get(db, "default")
            loaded = {r[0] for r in db.execute("SELECT name FROM wanted")}
            generation, changed = int(self._get(db, "generation", 0)), float(self._get(db, "changed_at", 0))
            db.execute("COMMIT")
        return Desired(generation, changed, default, frozenset(loaded | ({default} if default else set())))

    def choose_default(self, configured: str, available: list[str]) -> tuple[str | None, str]:
        """At start-up: the model to serve by default, and why (for the log); ``available``: the repository's
        model names.

        The configured model (``SEGMENT_MODEL``) wins at the first start and whenever the operator changes it;
        otherwise the default set through the API persists across restarts. A default that no longer exists
        falls back to the configured model; a configured model that is gone falls back to the persisted default.
        None when neither exists (the server then says, not ready, what to configure)."""
        with self.transaction() as db:
            default, last_configured = self._get(db, "default"), self._get(db, "configured")
            if configured != last_configured and configured in available:
                choice, why = configured, f"the configured model {configured!r} (SEGMENT_MODEL)"
            elif default in available:
                choice, why = default, f"the persisted default {default!r}"
            elif configured in available:
                choice, why = configured, f"the configured model {configured!r}"
            else:
                choice, why = None, ""
            self._set(db, "configured", configured)
            if choice != default:
                self._set(db, "default", choice)
                self._bump(db)
        return choice, why

    def set_default(self, name: str) -> None:
        """Serve ``name`` by default (it is wanted loaded from then on too)."""
        with self.transaction() as db:
            self._set(db, "default", name)
            db.execute("INSERT OR IGNORE INTO wanted (name, since) VALUES (?, ?)", (name, time.time()))
            self._bump(db)

    def load(self, name: str) -> None:
        """Want ``name`` loaded in every worker."""
        with self.transaction() as db:
            if db.execute("INSERT OR IGNORE INTO wanted (name, since) VALUES (?, ?)", (name, time.time())).rowcount:
                self._bump(db)

    def unload(self, name: str) -> None:
        """Want ``name`` unloaded everywhere; :class:`Conflict` for the default."""
        with self.transaction() as db:
            if self._get(db, "default") == name:
                raise Conflict(f"{name!r} is the default model; make another model the default first "
                               f"(POST /models/OTHER/default)")
            if db.execute("DELETE FROM wanted WHERE name = ?", (name,)).rowcount:
                self._bump(db)

    # ---- what each worker has ------------------------------------------------------------------------------

    def report(self, pid: int, rows: dict[str, dict], generation: int, serving: str | None) -> None:
        """Replace what worker ``pid`` of this host reports: {model: {state, error, memory_bytes (host RSS growth),
        device_bytes (GPU memory)}}, the generation it has applied and the default it serves (a row named "" when it
        has no model at all)."""
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM workers WHERE host = ? AND pid = ?", (HOST, pid))
            db.executemany(
                "INSERT INTO workers (host, pid, model, state, error, memory_bytes, device_bytes, generation, serving, "
                "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(HOST, pid, name, r["state"], r.get("error"), r.get("memory_bytes"), r.get("device_bytes"), generation,
                  serving, now) for name, r in (rows or {"": {"state": "none"}}).items()])

    def forget_worker(self, pid: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM workers WHERE host = ? AND pid = ?", (HOST, pid))

    def workers(self) -> list[dict]:
        """Every live worker's models (rows of dead workers of this host are dropped on the way)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM workers ORDER BY pid, model")]
        dead = {r["pid"] for r in rows if r["host"] == HOST and not pid_alive(r["pid"])}
        for pid in dead:
            self.forget_worker(pid)
        return [r for r in rows if not (r["host"] == HOST and r["pid"] in dead)]

    # ---- build jobs ----------------------------------------------------------------------------------------

    @staticmethod
    def _refuse_busy(db, name: str) -> None:
        busy = db.execute("SELECT id, state FROM jobs WHERE name = ? AND state IN ('queued', 'running')",
                          (name,)).fetchone()
        if busy:
            raise Conflict(f"a build of {name!r} is already {busy[1]} (job {busy[0]}); wait for it to finish")

    def check_not_building(self, name: str) -> None:
        """:class:`Conflict` while a build of ``name`` is queued or running (checked again, atomically, when
        the job is added)."""
        with self._connect() as db:
            self._refuse_busy(db, name)

    def add_job(self, name: str, command: list[str], request: str | None = None) -> str:
        """Queue a job; :class:`Conflict` while a build of the same name is queued or running."""
        job_id = uuid.uuid4().hex
        with self.transaction() as db:
            self._refuse_busy(db, name)
            db.execute("INSERT INTO jobs (id, name, command, request, state, submitter_pid, created) VALUES "
                       "(?, ?, ?, ?, 'queued', ?, ?)", (job_id, name, json.dumps(command), request, os.getpid(),
                                                        time.time()))
        return job_id

    def job(self, job_id: str) -> dict:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        job = dict(row)
        job["progress"], job["command"] = json.loads(job["progress"]), json.loads(job["command"])
        return job

    def claim_next_job(self, pid: int) -> dict | None:
        """Mark the oldest queued job running, owned by ``pid`` of this host (call it holding the build lock)."""
        with self.transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', owner_pid = ?, owner_host = ?, started = ? WHERE id = ?",
                       (pid, HOST, time.time(), row[0]))
        return self.job(row[0])

    def set_child(self, job_id: str, pid: int) -> None:
        """Record the build's child process (for the operator, and for tests that kill it)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET child_pid = ? WHERE id = ?", (pid, job_id))

    def has_queued_jobs(self) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is not None

    def add_progress(self, job_id: str, lines: list[str]) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT progress FROM jobs WHERE id = ?", (job_id,)).fetchone()
            tail = (json.loads(row[0]) + lines)[-PROGRESS_TAIL:]
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(tail), job_id))

    def finish_job(self, job_id: str, error: str | None, only_if: tuple[str, ...] = ("running",)) -> bool:
        """Mark a job succeeded (``error`` None) or failed, if it is still in one of ``only_if`` states."""
        with self.transaction() as db:
            marks = ",".join("?" * len(only_if))
            return bool(db.execute(
                f"UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ? AND state IN ({marks})",
                ("failed" if error else "succeeded", error, time.time(), job_id, *only_if)).rowcount)

    def fail_orphaned_jobs(self) -> list[str]:
        """Fail every job marked running by a process of this host that is gone (killed, server restarted)."""
        with self._connect() as db:
            rows = db.execute("SELECT id, owner_pid FROM jobs WHERE state = 'running' AND owner_host = ?",
                              (HOST,)).fetchall()
        failed = []
        for job_id, pid in rows:
            if not pid_alive(pid) and self.finish_job(
                    job_id, f"the builder died (worker process {pid} is gone: killed or the server restarted); "
                            "queue the build again"):
                failed.append(job_id)
        return failed

    def fail_queued_jobs_of(self, pid: int, reason: str) -> None:
        """Fail the jobs still queued that worker ``pid`` submitted (it is stopping)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'failed', error = ?, finished = ? WHERE state = 'queued' AND "
                       "submitter_pid = ?", (reason, time.time(), pid))
