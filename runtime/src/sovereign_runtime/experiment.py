"""A/B experiment records (docs/adr/1420-experiment-records.md): which arm answered each request, and the outcomes
callers post for request ids, in a SQLite database (WAL) that outlives restarts. ``sovereign-ops experiment report``
reads both colors' databases and joins them.

Switched on by ``--experiment-dir DIR`` (the role gives each color its own state directory):

* ``DIR/experiment.json`` (written by playbooks/experiment.yml, removed at its end) names the running experiment,
  ``{"name": "churn-v3-v4", "started": <epoch s>, "ends": <epoch s, optional>, ...}``. While it does, every infer
  answer between ``started`` and ``ends`` is recorded (both colors start and stop at the same instant):
  experiment, request id, color, model name and version, time, status, latency. Without it nothing is recorded;
  the file is looked at every ``INTERVAL`` seconds, so an experiment starts and stops without a restart.
* ``POST /v2/outcomes`` takes ``{"id": "<request id>", "value": <number or true/false>}`` or
  ``{"outcomes": [{"id": ..., "value": ...}, ...]}``: the true label or business value of an earlier request,
  answered 202. Outcomes are kept whether or not an experiment runs (labels arrive late); the report joins them to
  assignments by request id, whichever color the outcome reached.
* ``GET /v2/experiment``: the running experiment and this color's counts (what the playbook waits on: after the
  end, ``experiment`` null and ``pending_rows`` 0 - ``pending`` also counts outcomes, which callers keep posting).
* An experiment whose ``expires`` (epoch s; the playbook writes its planned end plus a grace) has passed is no
  longer recorded, even while its experiment.json is still there: a killed ``playbooks/experiment.yml`` never removed
  it (docs/adr/1422). ``GET /v2/experiment`` then says ``"expired": NAME``; ``experiment.yml -e
  experiment_action=stop`` removes the file and the split.
* Old experiments are pruned: the database keeps the records of the last ``keep`` experiments
  (``--experiment-keep``, default 20) and the outcomes no kept experiment can join (older than the oldest one's
  start), checked when the writer starts, when an experiment starts, and every ``PRUNE_INTERVAL`` seconds.

The hot path never touches the disk: an answer appends one tuple to a deque (~0.7 us); a writer thread drains it
every ``INTERVAL`` seconds in one transaction. A crash (SIGKILL, power) loses at most the last interval's rows;
SIGTERM flushes them. Beyond ``MAX_PENDING`` unwritten rows (a stuck disk) rows are dropped and counted
(``sovereign_runtime_experiment_rows_dropped``), never the request.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .logs import log_event
from .request_id import HEADER

CONTROL_FILE = "experiment.json"
DB_FILE = "experiments.sqlite"
INTERVAL = 0.25
MAX_PENDING = 200_000
MAX_OUTCOMES_PER_POST = 10_000
MAX_ID = 256
KEEP = 20  # experiments whose records the database keeps (--experiment-keep)
PRUNE_INTERVAL = 3600.0
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS assignments (
    experiment TEXT NOT NULL, request_id TEXT, color TEXT NOT NULL, model_name TEXT NOT NULL,
    model_version TEXT NOT NULL, t REAL NOT NULL, status INTEGER NOT NULL, latency_ms REAL NOT NULL);
CREATE INDEX IF NOT EXISTS assignments_by_experiment ON assignments (experiment, t);
CREATE TABLE IF NOT EXISTS outcomes (request_id TEXT NOT NULL, value REAL NOT NULL, t REAL NOT NULL,
    color TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS outcomes_by_request ON outcomes (request_id);
CREATE TABLE IF NOT EXISTS experiments (name TEXT PRIMARY KEY, definition TEXT NOT NULL, seen REAL NOT NULL);
"""

_ACCEPTED = (b"content-type", b"application/json")


def read_control(path: Path) -> dict[str, Any] | None:
    """The control file's experiment, or None (absent, unreadable, or not naming a valid experiment: logged)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log_event("experiment_control_unreadable", logging.WARNING, path=str(path), error=str(exc)[:200])
        return None
    name = doc.get("name") if type(doc) is dict else None
    if type(name) is not str or not NAME.match(name):
        log_event("experiment_control_invalid", logging.WARNING, path=str(path), name=str(name)[:80])
        return None
    return doc


def _time(value: Any, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def parse_outcomes(body: bytes) -> list[tuple[str, float]]:
    """``(request id, value)`` pairs of a POST /v2/outcomes body; ValueError names what is wrong."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise ValueError('body must be {"id": ..., "value": ...} or {"outcomes": [...]}')
    items = doc.get("outcomes") if "outcomes" in doc else [doc]
    if type(items) is not list or not items:
        raise ValueError("'outcomes' must be a non-empty list")
    if len(items) > MAX_OUTCOMES_PER_POST:
        raise ValueError(f"at most {MAX_OUTCOMES_PER_POST} outcomes per request, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        where = "" if "outcomes" not in doc else f"outcomes[{i}]: "
        if type(item) is not dict:
            raise ValueError(f'{where}each outcome must be an object {{"id": ..., "value": ...}}')
        rid, value = item.get("id"), item.get("value")
        if type(rid) is not str or not 0 < len(rid) <= MAX_ID:
            raise ValueError(f"{where}'id' must be the request id (a string of 1 to {MAX_ID} characters)")
        if type(value) is bool or (type(value) in (int, float) and math.isfinite(value)):
            value = float(value)
        else:
            raise ValueError(f"{where}'value' must be a finite number or true/false, got {value!r:.40}")
        out.append((rid, value))
    return out


class ExperimentStore:
    """One color's records. ``record`` and ``add_outcomes`` run on the event loop; everything else on the writer."""

    def __init__(
        self, directory: str | Path, color: str, model: Callable[[], tuple[str, str]], keep: int = KEEP
    ) -> None:
        self.dir = Path(directory)
        self.control = self.dir / CONTROL_FILE
        self.db_path = self.dir / DB_FILE
        self.color = color
        self.model = model  # () -> (name, version) of the loaded model ("", "" while loading)
        self.active: str | None = None  # the experiment being recorded (read on the loop, set by the writer)
        self.started = 0.0
        self.window = (0.0, math.inf)  # record answers from ``started`` until ``ends`` (epoch seconds)
        self.expires = math.inf  # the active experiment's expiry (epoch seconds): not recorded after it
        self.rows: deque = deque()
        self.outcomes: deque = deque()
        self.dropped = 0
        self.requests = 0  # rows of the active experiment in the database (this color)
        self.outcome_count = 0  # outcomes received here since the active experiment started
        self._control_stamp: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self.error = ""
        self.keep = max(1, int(keep))
        self.expired: str | None = None  # an experiment whose expiry passed while its control file stayed
        self._prune_due = True  # at the writer's start, then on each new experiment and every PRUNE_INTERVAL
        self._pruned_at = 0.0

    # ------------------------------------------------------------------------------------------------ event loop

    def record(self, headers: list | None, status: int, latency: float) -> None:
        name = self.active
        if name is None:
            return
        t = time.time()
        start, end = self.window
        if not start <= t < end:  # both colors start and stop at the same instant, whenever each read the file
            return
        if len(self.rows) >= MAX_PENDING:
            self.dropped += 1
            return
        rid = headers[0][1] if headers and headers[0][0] == HEADER else None
        self.rows.append((name, rid, status, latency, t))

    def add_outcomes(self, pairs: list[tuple[str, float]]) -> int:
        room = MAX_PENDING - len(self.outcomes)
        if room < len(pairs):
            self.dropped += len(pairs) - max(room, 0)
            pairs = pairs[: max(room, 0)]
        now = time.time()
        self.outcomes.extend((rid, value, now) for rid, value in pairs)
        return len(pairs)

    def status(self) -> dict[str, Any]:
        name, version = self.model()
        return {
            "experiment": self.active,
            "started": self.started or None,
            "color": self.color,
            "model_name": name,
            "model_version": version,
            "requests": self.requests,
            "outcomes": self.outcome_count,
            "pending": len(self.rows) + len(self.outcomes),
            # Assignment rows alone: 0 soon after an experiment ends, while outcomes (late labels) keep arriving.
            "pending_rows": len(self.rows),
            "dropped": self.dropped,
            "database": str(self.db_path),
            "keep": self.keep,
            **({"expired": self.expired} if self.expired else {}),
            **({"error": self.error} if self.error else {}),
        }

    # ------------------------------------------------------------------------------------------------ writer

    def start(self) -> None:
        self._open()  # in the caller: a database that cannot be opened fails the start, not a request later
        self.poll_control()  # a restart inside an experiment records from its first request, not the first poll
        self._thread = threading.Thread(target=self._run, name="experiment-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.db_path, timeout=10, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed batch survives a process crash
        db.executescript(SCHEMA)
        self._db = db

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(INTERVAL)
            try:
                self.poll_control()
                self.flush()
                self.check_expiry()
                if self._prune_due or time.monotonic() - self._pruned_at >= PRUNE_INTERVAL:
                    self.prune()
                self.error = ""
            except sqlite3.Error as exc:  # a full or read-only disk: say so, keep serving, retry next interval
                if not self.error:
                    log_event("experiment_write_failed", logging.ERROR, database=str(self.db_path), error=str(exc))
                self.error = f"{type(exc).__name__}: {exc}"
            if stopping:
                break
        if self._db is not None:
            self._db.close()

    def poll_control(self) -> None:
        try:
            st = self.control.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._control_stamp:
            return
        self._control_stamp = stamp
        doc = read_control(self.control) if stamp else None
        name = doc["name"] if doc else None
        db = self._db
        assert db is not None
        if name is not None:  # the definition (arms, split, metric) stays with the records: the report reads it
            db.execute("INSERT OR REPLACE INTO experiments VALUES (?, ?, ?)", (name, json.dumps(doc), time.time()))
        if name is not None and name == self.active:  # the same experiment, rewritten (its end set): new window
            self.expires = _time(doc.get("expires"), self.expires)
            self.window = (self.started, min(_time(doc.get("ends"), math.inf), self.expires))
            return
        self.expired = None
        if name == self.active:
            return
        if self.active is not None:
            self.flush()  # the old experiment's rows go in under its name
        started = _time(doc.get("started"), time.time()) if doc else 0.0
        self.expires = _time(doc.get("expires"), math.inf) if doc else math.inf
        self.window = (started, min(_time(doc.get("ends"), math.inf), self.expires) if doc else math.inf)
        if name is not None:
            self.requests = db.execute("SELECT count(*) FROM assignments WHERE experiment = ?", (name,)).fetchone()[0]
            self.outcome_count = db.execute("SELECT count(*) FROM outcomes WHERE t >= ?", (started,)).fetchone()[0]
        self.started = started
        self.active = name
        if name is not None:
            self._prune_due = True
        log_event("experiment_started" if name else "experiment_stopped", experiment=name, database=str(self.db_path))

    def check_expiry(self) -> None:
        """Stop recording an experiment whose expiry passed (its playbook was killed: the file is still there)."""
        if self.active is None or time.time() < self.expires:
            return
        self.flush()
        name, self.active, self.expired = self.active, None, self.active
        log_event(
            "experiment_expired",
            logging.WARNING,
            experiment=name,
            control=str(self.control),
            fix="ansible-playbook playbooks/experiment.yml -e experiment_action=stop (removes it and the split)",
        )

    def prune(self) -> dict[str, int]:
        """Drop the records of all but the last ``keep`` experiments (by when they were last seen), and the outcomes
        older than the oldest kept experiment's start (no report can join them). Returns the rows deleted."""
        db = self._db
        assert db is not None
        self._prune_due, self._pruned_at = False, time.monotonic()
        kept = db.execute(
            "SELECT name, definition FROM experiments ORDER BY seen DESC LIMIT ?", (self.keep,)
        ).fetchall()
        names = [name for name, _definition in kept]
        if self.active is not None and self.active not in names:
            names.append(self.active)
        starts = []
        for _name, definition in kept:
            try:
                starts.append(float(json.loads(definition).get("started")))
            except (TypeError, ValueError, AttributeError):
                continue
        first = db.execute(
            f"SELECT min(t) FROM assignments WHERE experiment IN ({','.join('?' * len(names))})", names
        ).fetchone()[0]
        if first is not None:
            starts.append(float(first))
        # No experiment left to join them: outcomes before now (a later experiment joins only its own) go too.
        cutoff = min(starts) if starts else (self.started or time.time())
        marks = ",".join("?" * len(names))
        db.execute("BEGIN")
        try:
            done = {
                "assignments": db.execute(f"DELETE FROM assignments WHERE experiment NOT IN ({marks})", names).rowcount,
                "experiments": db.execute(f"DELETE FROM experiments WHERE name NOT IN ({marks})", names).rowcount,
                "outcomes": db.execute("DELETE FROM outcomes WHERE t < ?", (cutoff,)).rowcount,
            }
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            raise
        if any(done.values()):
            log_event(
                "experiment_records_pruned", keep=self.keep, kept=sorted(names), database=str(self.db_path), **done
            )
        return done

    def flush(self) -> None:
        rows, outcomes = self.rows, self.outcomes
        if not rows and not outcomes:
            return
        name, version = self.model()
        color = self.color
        n, m = len(rows), len(outcomes)
        batch = []
        for _ in range(n):
            exp, rid, status, latency, t = rows.popleft()
            rid_text = rid.decode() if rid is not None else None
            batch.append((exp, rid_text, color, name, version, t, status, latency * 1e3))
        outs = [(*outcomes.popleft(), color) for _ in range(m)]
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO assignments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)
            db.executemany("INSERT INTO outcomes VALUES (?, ?, ?, ?)", outs)
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            rows.extendleft(reversed([(b[0], b[1].encode() if b[1] else None, b[6], b[7] / 1e3, b[5]) for b in batch]))
            outcomes.extendleft(reversed([o[:3] for o in outs]))
            raise
        active = self.active
        self.requests += sum(1 for b in batch if b[0] == active)
        if active is not None:
            self.outcome_count += sum(1 for o in outs if o[2] >= self.started)


def install(app: Any, color: str, directory: str, keep: int = KEEP) -> ExperimentStore:
    """Wire a store into the ASGI app: the infer hook, ``POST /v2/outcomes``, ``GET /v2/experiment``, metrics."""
    from .app import BodyTooLarge  # here: ``python -m sovereign_runtime.experiment`` (dump) needs no torch
    from .protocol import dumps, error_body

    engine = app.engine

    def model() -> tuple[str, str]:
        m = engine.model
        return (m.name, m.version) if m is not None else ("", "")

    store = ExperimentStore(directory, color, model, keep)
    store.start()
    app.on_infer = store.record

    async def outcomes(scope: dict, receive: Callable, send: Callable, method: str) -> None:
        if method != "POST":
            refused = error_body(f"{method} not allowed on /v2/outcomes")
            await app._reply(send, "outcomes", 405, refused, [(b"allow", b"POST")])
            return
        try:
            body = await app._read_body(scope, receive)
        except BodyTooLarge:
            await app._reply(send, "outcomes", 413, error_body(f"request body larger than {app.max_body} bytes"))
            return
        if body is None:
            return
        try:
            pairs = parse_outcomes(body)
        except ValueError as exc:
            await app._reply(send, "outcomes", 400, error_body(str(exc)))
            return
        accepted = store.add_outcomes(pairs)
        status = 202 if accepted == len(pairs) else 503
        await app._reply(send, "outcomes", status, dumps({"accepted": accepted, "received": len(pairs)}))

    async def experiment(send: Callable, method: str) -> None:
        await app._reply(send, "experiment", 200, dumps(store.status()), None, method)

    app.post_routes["/v2/outcomes"] = outcomes
    app._exact["/v2/experiment"] = experiment  # GET/HEAD, like the health endpoints
    m = engine.metrics
    m.gauge("experiment_active", "1 while an A/B experiment is being recorded", lambda: 1.0 if store.active else 0.0)
    m.gauge("experiment_rows_pending", "Experiment rows not yet written", lambda: len(store.rows) + len(store.outcomes))
    m.gauge("experiment_rows_dropped", "Experiment rows dropped (writer behind)", lambda: store.dropped)
    m.gauge("experiment_write_error", "1 while the experiment database fails", lambda: 1.0 if store.error else 0.0)
    return store


def dump(directory: str | Path, name: str) -> dict[str, Any]:
    """One color's records of experiment ``name``, as ``sovereign-ops experiment report`` and playbooks/experiment.yml
    read them: ``python -m sovereign_runtime.experiment DIR NAME`` prints this as JSON (read-only; the runtime may
    be writing: WAL readers do not block it). Outcomes: every one received since the experiment started (an
    outcome may reach another color or host than its request; the report joins them all)."""
    path = Path(directory) / DB_FILE
    doc: dict[str, Any] = {"database": str(path), "definition": None, "assignments": [], "outcomes": []}
    if not path.exists():
        return doc
    db = sqlite3.connect(path, timeout=10)
    try:
        row = db.execute("SELECT definition FROM experiments WHERE name = ?", (name,)).fetchone()
        doc["definition"] = json.loads(row[0]) if row else None
        doc["assignments"] = db.execute(
            "SELECT request_id, color, model_name, model_version, t, status, latency_ms FROM assignments"
            " WHERE experiment = ? ORDER BY t",
            (name,),
        ).fetchall()
        first = db.execute("SELECT min(t) FROM assignments WHERE experiment = ?", (name,)).fetchone()[0]
        known = [x for x in (first, (doc["definition"] or {}).get("started")) if x is not None]
        if known:
            started = min(known)
            doc["outcomes"] = db.execute(
                "SELECT request_id, value, t FROM outcomes WHERE t >= ? ORDER BY t", (float(started),)
            ).fetchall()
    finally:
        db.close()
    return doc


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m sovereign_runtime.experiment EXPERIMENT_DIR NAME")
    json.dump(dump(sys.argv[1], sys.argv[2]), sys.stdout, separators=(",", ":"))
