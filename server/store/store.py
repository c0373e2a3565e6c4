"""RunStore: what a run did, for the console and `consortia runs`, in one SQL database.

Writers (the simulation runner today, the deployed server later) call `start_run`,
`record_round`, `record_checkpoint`, `finish_run`; the console and the CLI read and may
`request_stop`, which the round workflow checks after every round. Every write is one
short transaction. On SQLite the file is in WAL mode, so readers never block the writer;
writes begin with BEGIN IMMEDIATE so two writers queue on the lock (busy timeout) rather
than fail halfway through a transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import case, create_engine, delete, event, func, inspect, null, select
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from consortia.server.store.models import (
    RUN_STATUSES,
    AuditEvent,
    Base,
    CheckpointRecord,
    Participation,
    Round,
    Run,
)

log = logging.getLogger("consortia.store")

STORE_FILE = "store.db"
SQLITE_BUSY_TIMEOUT_MS = 10_000
ACCEPTED = "a sqlite:///PATH or postgresql://USER@HOST/DB URL, a .db file, or a results directory"

# The metrics.jsonl keys that have a typed column of their own in `rounds`.
ROUND_COLUMNS = ("accuracy", "loss", "duration_s", "clients_sampled", "clients_trained",
                 "clients_refused", "clients_rejected", "clients_failed", "epsilon_max",
                 "epsilon_mean", "user_epsilon", "secagg_status", "secagg_dropped",
                 "secagg_reason", "checkpoint_sha256")
PARTICIPATION_COLUMNS = ("epsilon", "epsilon_budget", "noise_multiplier", "sample_rate", "steps",
                         "num_examples")


class StoreError(ValueError):
    """A store URL that cannot be opened; the message names the value."""


class UnknownRun(KeyError):
    def __init__(self, run_id: str, detail: str = ""):
        super().__init__(run_id)
        self.run_id = run_id
        self.detail = detail or f"no run {run_id!r} in the store"

    def __str__(self) -> str:
        return self.detail


class AmbiguousRun(UnknownRun):
    """A run id prefix that more than one run starts with."""

    def __init__(self, prefix: str, matches: list[str]):
        super().__init__(prefix, f"{prefix!r} matches {len(matches)} runs: "
                                 f"{', '.join(matches)}; give more of the run id")
        self.matches = matches


def _sqlite_url(path: Path) -> str:
    """The URL of the SQLite file at `path`, whatever its name holds: '?', '#', '%' or '@'
    in a folder name are escaped (pasted into the URL as they were, 'results/q?1' put the
    store in a file 'results/q' and 'p%41' named the folder 'pA')."""
    return URL.create("sqlite", database=str(path.resolve())).render_as_string(hide_password=False)


def default_store_url(out_dir: str | Path) -> str:
    """The default store: a SQLite file inside the run's results directory."""
    return _sqlite_url(Path(out_dir) / STORE_FILE)


def resolve_store_url(value: str | Path) -> str:
    """Turn what an operator typed into a SQLAlchemy URL, or say why it cannot be one.

    Accepted: a sqlite:// or postgresql[+driver]:// URL, a path to a SQLite file, or a
    results directory (its `store.db`).
    """
    text = str(value).strip()
    if not text:
        raise StoreError(f"empty store URL; accepted: {ACCEPTED}")
    if "://" not in text:
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / STORE_FILE
        return _sqlite_url(path)
    try:
        url = make_url(text)
    except ArgumentError:
        raise StoreError(f"store URL {text!r} cannot be parsed; accepted: {ACCEPTED}") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"store URL {_masked(url)!r} names the database "
                         f"{url.get_backend_name()!r}; accepted: {ACCEPTED}")
    return text


def _masked(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The Python driver's own transaction handling is off: SQLAlchemy's begin event below
    # emits BEGIN (readers) or BEGIN IMMEDIATE (writers) itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; WAL keeps it safe
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# SQLite's result codes for a file that is not a database (26) or is one damaged (11):
# the primary code is the low byte of an extended one.
_DAMAGED_CODES = (11, 26)


def is_damaged(err: BaseException) -> bool:
    """Whether `err` (a DBAPIError, or the sqlite3 error inside one) says the SQLite file
    is damaged or not a database, rather than busy, read-only or gone."""
    orig = getattr(err, "orig", err)
    code = getattr(orig, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in _DAMAGED_CODES


def damaged_advice(path: Path | str) -> str:
    """What an operator does about a damaged store file: it holds only copies of the runs'
    results files, so a new one is recorded from them."""
    return (f"the store file {path} is damaged: move it aside (mv {path} {path}.damaged), "
            "then record each of its runs in a new store from the run's results directory "
            "with --resume (consortia sim run CONFIG --out DIR --resume, or consortia server "
            "start --config FILE --resume; a finished run is recorded again without running "
            "a round)")


def _sqlite_intact(path: Path) -> str | None:
    """SQLite's own PRAGMA quick_check of the file at `path` (read-only): None when it
    passes or there is no file yet, else what it found."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        found = [row for (row,) in conn.execute("PRAGMA quick_check(5)")]
    return None if found == ["ok"] else "; ".join(" ".join(f.split()) for f in found)


def _sqlite_tables(path: Path) -> list[str]:
    """The tables in a SQLite file, read without writing to it (read-only connection)."""
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        return [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]


def _sqlite_engine(url: URL, begin: str, create: bool = True) -> Engine:
    memory = url.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False,
                                               "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}}
    if memory:
        kwargs["poolclass"] = StaticPool
    else:
        kwargs.update(pool_size=8, max_overflow=32)
    if not memory and not create:
        # A reader's connections open the file only if it is there (mode=rw): a store
        # removed while the console runs was made anew, empty, by its next connection.
        uri = f"{Path(url.database).resolve().as_uri()}?mode=rw"
        kwargs["creator"] = lambda: sqlite3.connect(uri, uri=True, check_same_thread=False,
                                                    timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    engine = create_engine(url, **kwargs)
    event.listen(engine, "connect", _sqlite_pragmas)

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


class RunStore:
    """The run store behind one SQLAlchemy URL (see `resolve_store_url`).

    ``create=False`` opens a store that must already exist (what the operator's `runs` and
    `console` commands read): a database without the store's tables is refused instead of
    being given them, so pointing them at the wrong file changes nothing in it."""

    def __init__(self, url: str | Path, *, create: bool = True):
        self.url = resolve_store_url(url)
        parsed = make_url(self.url)
        self.display_url = _masked(parsed)
        try:
            if parsed.get_backend_name() == "sqlite":
                if parsed.database not in (None, "", ":memory:"):
                    folder = Path(parsed.database).parent
                    if not folder.is_dir():
                        raise StoreError(f"store URL {self.display_url!r}: folder {folder} "
                                         "does not exist")
                    if not create:  # before the engine's pragmas write to the file
                        self._require_tables(_sqlite_tables(Path(parsed.database)))
                    else:  # a writer: a damaged file fails here, before the run, not in it
                        found = _sqlite_intact(Path(parsed.database))
                        if found is not None:
                            raise StoreError(f"cannot open store {self.display_url!r}: SQLite's "
                                             f"quick_check found: {found}; "
                                             + damaged_advice(parsed.database))
                self._read_engine = _sqlite_engine(parsed, "BEGIN", create)
                self._write_engine = (self._read_engine if parsed.database in (None, "", ":memory:")
                                      else _sqlite_engine(parsed, "BEGIN IMMEDIATE", create))
            else:
                self._read_engine = self._write_engine = create_engine(parsed, pool_pre_ping=True)
            if create:
                Base.metadata.create_all(self._write_engine)
            else:
                self._require_tables(inspect(self._read_engine).get_table_names())
        except (NoSuchModuleError, ModuleNotFoundError) as err:
            raise StoreError(f"store URL {self.display_url!r} needs a database driver that is "
                             f"not installed ({err}); for PostgreSQL: pip install 'psycopg[binary]'"
                             ) from None
        except StoreError:
            raise
        except (DBAPIError, sqlite3.Error) as err:
            # connection refused, bad credentials; a file that is not a database or damaged
            # (the read-only look at a SQLite file raises sqlite3's own errors)
            raise StoreError(f"cannot open store {self.display_url!r}: "
                             f"{getattr(err, 'orig', err)}"
                             + (f"; {damaged_advice(parsed.database)}" if is_damaged(err) else "")
                             ) from None
        except Exception as err:
            raise StoreError(f"cannot open store {self.display_url!r}: {err}") from None
        self._reader = sessionmaker(self._read_engine, expire_on_commit=False)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)
        self._stats_lock = threading.Lock()
        self.write_count = 0
        self.longest_write_s = 0.0

    def _require_tables(self, tables: list[str]) -> None:
        missing = set(Base.metadata.tables) - set(tables)
        if missing:
            raise StoreError(f"{self.display_url!r} is not a consortia run store (it has no "
                             f"{', '.join(sorted(missing))} table); a run writes its store to "
                             "DIR/store.db, or to the URL in [store] url")

    def unusable(self, err: DBAPIError, used: str = "read") -> str:
        """Why a read or write (`used`) of the store failed, and, for a damaged SQLite
        file, what to do about it."""
        text = f"the run store {self.display_url} cannot be {used}: {err.orig}"
        database = make_url(self.url).database
        if is_damaged(err) and database not in (None, "", ":memory:"):
            text += f"; {damaged_advice(database)}"
        return text

    def close(self) -> None:
        self._read_engine.dispose()
        if self._write_engine is not self._read_engine:
            self._write_engine.dispose()

    def __repr__(self) -> str:
        return f"RunStore({self.display_url!r})"

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Session]:
        started = time.perf_counter()
        with self._writer.begin() as session:
            yield session
        elapsed = time.perf_counter() - started
        with self._stats_lock:
            self.write_count += 1
            self.longest_write_s = max(self.longest_write_s, elapsed)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    @staticmethod
    def _run(session: Session, run_id: str) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise UnknownRun(run_id)
        return run

    @staticmethod
    def _audit(session: Session, run_id: str | None, event_name: str, detail: str = "", *,
               actor: str = "server", kind: str = "protocol", round: int | None = None,
               at: float | None = None) -> None:
        session.add(AuditEvent(run_id=run_id, at=at or time.time(), kind=kind, actor=actor,
                               event=event_name, round=round, detail=detail))

    # -- writes (the server side) --------------------------------------------------------

    def start_run(self, run_id: str, *, task: str, rounds_total: int, config: dict[str, Any],
                  out_dir: str | Path | None = None, kind: str = "simulation") -> None:
        """Register a run as running: a new one, or one that resumes (its stop request cleared)."""
        now = time.time()
        with self._write() as s:
            run = s.get(Run, run_id)
            if run is None:
                s.add(Run(id=run_id, kind=kind, task=task, status="running",
                          rounds_total=rounds_total, rounds_completed=0,
                          out_dir=str(out_dir) if out_dir is not None else None,
                          config=_redacted(config),
                          created_at=now, updated_at=now))
                self._audit(s, run_id, "run-started",
                            f"{kind} of {task}, {rounds_total} rounds", at=now)
            else:
                previous = run.status
                run.status, run.rounds_total = "running", rounds_total
                run.config = _redacted(config)
                if out_dir is not None:  # a results directory moved before --resume
                    run.out_dir = str(out_dir)
                run.updated_at, run.finished_at = now, None
                run.stop_requested_at = run.stop_requested_by = None
                self._audit(s, run_id, "run-resumed", f"was {previous}", at=now)

    def replace_rounds(self, run_id: str, last_round: int, rows: list[dict[str, Any]],
                       participation: list[dict[str, Any]]) -> None:
        """Make the run's rounds exactly `rows`, and drop checkpoints after `last_round`
        (a resume keeps what was recorded up to the checkpoint it continues from)."""
        with self._write() as s:
            run = self._run(s, run_id)
            # A kept round keeps when it was recorded (the clients' "last seen", and whether
            # it came before a stop request, are read from it); only a round the store did
            # not have is recorded now.
            recorded = dict(s.execute(select(Round.round, Round.recorded_at)
                                      .where(Round.run_id == run_id)).all())
            now = time.time()
            s.execute(delete(Round).where(Round.run_id == run_id))
            s.execute(delete(Participation).where(Participation.run_id == run_id))
            s.execute(delete(CheckpointRecord).where(CheckpointRecord.run_id == run_id,
                                                     CheckpointRecord.round > last_round))
            for row in rows:
                s.add(self._round(run_id, row, recorded.get(row["round"], now)))
            s.add_all(self._participation(run_id, p) for p in participation)
            run.rounds_completed = len(rows)
            run.updated_at = time.time()

    def record_round(self, run_id: str, row: dict[str, Any],
                     participation: list[dict[str, Any]]) -> None:
        """One round as written to metrics.jsonl (`row`) and participation.jsonl."""
        server_round = row["round"]
        with self._write() as s:
            run = self._run(s, run_id)
            now = _now_in_lock_order()
            s.add(self._round(run_id, row, now))
            s.add_all(self._participation(run_id, p) for p in participation)
            run.rounds_completed = max(run.rounds_completed, server_round)
            run.updated_at = now
            for p in participation:
                event_name = {"rejected": "update-rejected", "failed": "client-failed",
                              "refused-budget": "client-refused",
                              "refused-policy": "client-refused"}.get(p["status"])
                if event_name:
                    detail = f"client {p['client_id']}: {p['status']}"
                    if p.get("reason"):
                        detail += f": {p['reason']}"
                    self._audit(s, run_id, event_name, detail, round=server_round, at=now)
            if row.get("secagg_status") == "aborted":
                self._audit(s, run_id, "secagg-aborted", row.get("secagg_reason", ""),
                            round=server_round, at=now)
            elif row.get("secagg_dropped"):
                self._audit(s, run_id, "secagg-dropouts-recovered",
                            f"{row['secagg_dropped']} dropped client(s) unmasked from shares",
                            round=server_round, at=now)

    def record_checkpoint(self, run_id: str, server_round: int, sha256: str,
                          parent_sha256: str | None, path: str | Path | None,
                          created_at: float | None = None) -> None:
        with self._write() as s:
            self._run(s, run_id)
            s.merge(CheckpointRecord(run_id=run_id, round=server_round, sha256=sha256,
                                     parent_sha256=parent_sha256,
                                     path=str(path) if path is not None else None,
                                     created_at=created_at or time.time()))

    def finish_run(self, run_id: str, status: str, detail: str = "") -> None:
        if status not in RUN_STATUSES or status == "running":
            raise ValueError(f"finish_run status {status!r}; accepted: completed, stopped, failed")
        with self._write() as s:
            run = self._run(s, run_id)
            now = _now_in_lock_order()
            run.status, run.finished_at, run.updated_at = status, now, now
            self._audit(s, run_id, f"run-{status}",
                        detail or f"after round {run.rounds_completed} of {run.rounds_total}", at=now)

    def heartbeat(self, run_id: str) -> None:
        """The running run's process is alive (see `Heartbeat`)."""
        with self._write() as s:
            run = self._run(s, run_id)
            if run.status == "running":
                run.updated_at = _now_in_lock_order()

    def request_stop(self, run_id: str, actor: str) -> dict[str, Any]:
        """Ask the server to stop after the current round (recorded in the audit log)."""
        with self._write() as s:
            run = self._run(s, run_id)
            now = _now_in_lock_order()
            if _shown_status(run) != "running":
                raise RunNotRunning(run_id, _shown_status(run))
            if run.stop_requested_at is None:
                run.stop_requested_at, run.stop_requested_by = now, actor
                self._audit(s, run_id, "stop-requested",
                            f"stop after the current round (round {run.rounds_completed + 1})",
                            actor=actor, kind="operator", at=now)
            return _run_dict(run)

    def audit(self, run_id: str | None, event_name: str, detail: str = "", *,
              actor: str = "server", kind: str = "protocol", round: int | None = None) -> None:
        with self._write() as s:
            self._audit(s, run_id, event_name, detail, actor=actor, kind=kind, round=round)

    @staticmethod
    def _round(run_id: str, row: dict[str, Any], now: float) -> Round:
        typed = {k: row.get(k) for k in ROUND_COLUMNS}
        for count in ("clients_sampled", "clients_trained", "clients_refused", "clients_rejected",
                      "clients_failed"):
            typed[count] = typed[count] or 0
        return Round(run_id=run_id, round=row["round"], recorded_at=now, metrics=row, **typed)

    @staticmethod
    def _participation(run_id: str, p: dict[str, Any]) -> Participation:
        return Participation(
            run_id=run_id, round=p["round"], client_id=str(p["client_id"]),
            node_id=str(p["node_id"]) if p.get("node_id") is not None else None,
            status=p["status"], reason=p.get("reason") or "", report=p,
            **{k: p.get(k) for k in PARTICIPATION_COLUMNS})

    # -- reads (the console and the CLI) -------------------------------------------------

    def stop_requested(self, run_id: str) -> bool:
        with self._read() as s:
            return self._run(s, run_id).stop_requested_at is not None

    def list_runs(self) -> list[dict[str, Any]]:
        with self._read() as s:
            runs = s.scalars(select(Run).order_by(Run.created_at.desc())).all()
            return [_run_dict(r, with_config=False) for r in runs]

    def resolve_run(self, run_id_or_prefix: str) -> str:
        """The run whose id is this, or the only one starting with it."""
        if not run_id_or_prefix:  # every id starts with "": it would pick a lone run
            raise UnknownRun("", "no run id given; accepted: a run id or a unique prefix of one")
        with self._read() as s:
            if s.get(Run, run_id_or_prefix) is not None:
                return run_id_or_prefix
            escaped = run_id_or_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            ids = s.scalars(select(Run.id).where(Run.id.like(f"{escaped}%", escape="\\"))).all()
        if len(ids) == 1:
            return ids[0]
        if ids:
            raise AmbiguousRun(run_id_or_prefix, sorted(ids))
        raise UnknownRun(run_id_or_prefix)

    def get_run(self, run_id: str) -> dict[str, Any]:
        with self._read() as s:
            run = self._run(s, run_id)
            result = _run_dict(run)
            last = s.scalars(select(Round).where(Round.run_id == run_id)
                             .order_by(Round.round.desc()).limit(1)).first()
            result["last_round"] = _round_dict(last) if last else None
            return result

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        """Per round, the typed view the console draws."""
        with self._read() as s:
            self._run(s, run_id)
            rows = s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round))
            return [_round_dict(r) for r in rows]

    def metrics_rows(self, run_id: str) -> list[dict[str, Any]]:
        """The run's metrics.jsonl, rendered from the store."""
        with self._read() as s:
            self._run(s, run_id)
            return list(s.scalars(select(Round.metrics).where(Round.run_id == run_id)
                                  .order_by(Round.round)))

    def participation_rows(self, run_id: str, server_round: int | None = None
                           ) -> list[dict[str, Any]]:
        """The run's participation.jsonl (or one round of it), rendered from the store."""
        with self._read() as s:
            self._run(s, run_id)
            query = select(Participation.report).where(Participation.run_id == run_id)
            if server_round is not None:
                query = query.where(Participation.round == server_round)
            return list(s.scalars(query.order_by(Participation.id)))

    def clients(self, run_id: str) -> list[dict[str, Any]]:
        """Per client: latest status, rounds joined, last seen, ε spent against its budget."""
        fallback = Participation.report["epsilon_if_secagg_fails"].as_float()
        # The δ of the client's ε: its own ledger's (a partner's site.toml may set another
        # than the run's privacy.delta), so each ε is shown with its δ.
        delta = Participation.report["delta"].as_float()
        loose: Any = null()  # the whole report, where SQL cannot read it
        if self._read_engine.dialect.name == "sqlite":
            # A report holding NaN or Infinity (a diverging client's train_loss: Python's
            # json writes them, as participation.jsonl has them) is malformed JSON to
            # SQLite's json_extract, which would fail the whole query: such a row's report
            # comes back whole, to be read in Python.
            valid = func.json_valid(Participation.report) == 1
            fallback = case((valid, fallback), else_=None)
            delta = case((valid, delta), else_=None)
            loose = case((valid, null()), else_=Participation.report)
        with self._read() as s:
            self._run(s, run_id)
            rows = s.execute(
                select(Participation.client_id, Participation.round, Participation.status,
                       Participation.reason, Participation.epsilon, Participation.epsilon_budget,
                       Round.recorded_at, fallback, delta, loose)
                .join(Round, (Round.run_id == Participation.run_id)
                      & (Round.round == Participation.round), isouter=True)
                .where(Participation.run_id == run_id).order_by(Participation.id)).all()
        clients: dict[str, dict[str, Any]] = {}
        for client_id, rnd, status, reason, eps, budget, seen_at, eps_fallback, eps_delta, \
                report in rows:
            if report is not None:
                eps_fallback, eps_delta = report.get("epsilon_if_secagg_fails"), report.get("delta")
            c = clients.setdefault(client_id, {
                "client_id": client_id, "status": None, "reason": "", "rounds_joined": 0,
                "rounds_seen": 0, "last_seen_round": None, "last_seen_at": None,
                "epsilon": None, "epsilon_budget": None, "epsilon_if_secagg_fails": None,
                "delta": None})
            if eps_fallback is not None:  # distributed DP's second guarantee
                c["epsilon_if_secagg_fails"] = eps_fallback
            if eps_delta is not None:
                c["delta"] = eps_delta
            c["status"], c["reason"] = status, reason
            c["rounds_seen"] += 1
            c["rounds_joined"] += status == "trained"
            c["last_seen_round"], c["last_seen_at"] = rnd, seen_at
            if eps is not None:
                c["epsilon"] = eps
            if budget is not None:
                c["epsilon_budget"] = budget
        return sorted(clients.values(), key=lambda c: _natural_key(c["client_id"]))

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        with self._read() as s:
            self._run(s, run_id)
            rows = s.scalars(select(CheckpointRecord).where(CheckpointRecord.run_id == run_id)
                             .order_by(CheckpointRecord.round))
            return [{"round": c.round, "sha256": c.sha256, "parent_sha256": c.parent_sha256,
                     "created_at": c.created_at, "available": bool(c.path) and Path(c.path).is_file()}
                    for c in rows]

    def checkpoint_file(self, run_id: str, server_round: int) -> tuple[Path, str] | None:
        """The weights file of a checkpoint and the SHA-256 recorded for it, or None when
        the store has no such checkpoint (or no file for it)."""
        with self._read() as s:
            self._run(s, run_id)
            c = s.get(CheckpointRecord, (run_id, server_round))
            return (Path(c.path), c.sha256) if c is not None and c.path else None

    def audit_log(self, run_id: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """Newest first."""
        with self._read() as s:
            query = select(AuditEvent)
            if run_id is not None:
                self._run(s, run_id)
                query = query.where(AuditEvent.run_id == run_id)
            rows = s.scalars(query.order_by(AuditEvent.id.desc()).limit(limit))
            return [{"id": e.id, "run_id": e.run_id, "at": e.at, "kind": e.kind, "actor": e.actor,
                     "event": e.event, "round": e.round, "detail": e.detail} for e in rows]

    def count_runs(self) -> int:
        with self._read() as s:
            return s.scalar(select(func.count()).select_from(Run)) or 0

    def journal_mode(self) -> str | None:
        """SQLite's journal mode ('wal'), or None for another database."""
        if self._read_engine.dialect.name != "sqlite":
            return None
        with self._read_engine.connect() as conn:
            return conn.exec_driver_sql("PRAGMA journal_mode").scalar()


def _now_in_lock_order() -> float:
    """The time, taken once the write lock is held (the transaction's first statement ran):
    on SQLite, timestamps then follow the order in which writes commit, so "this round was
    recorded after the stop request" can be read from the times."""
    return time.time()


# A running run's process touches its row every HEARTBEAT_S (`Heartbeat`); a reader that
# sees no touch for LOST_AFTER_S calls the run "lost": its process ended without recording
# how (SIGKILL, an out-of-memory kill, a machine that went down). Derived when read, never
# stored: a resume makes the run running again. The margin allows for a loaded machine
# and for clocks of a writer and a reader on different machines a little apart.
HEARTBEAT_S = 10.0
LOST_AFTER_S = 60.0


class Heartbeat:
    """While the `with` block runs, touch the run's row every `interval` seconds from a
    daemon thread (a store write failing is logged and retried at the next beat)."""

    def __init__(self, store: RunStore, run_id: str, interval: float = HEARTBEAT_S):
        self.store, self.run_id, self.interval = store, run_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"consortia-heartbeat-{run_id}")

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.heartbeat(self.run_id)
            except Exception as err:  # a busy or briefly unreachable store: the next beat
                log.warning("run store heartbeat failed: %s", err)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def mark_interrupted(store_url: str, run_id: str, resume_with: str) -> None:
    """The process running `run_id` was stopped (SIGTERM or Ctrl-C) before the run could
    record how it ended: record it as stopped, with the command that continues it. A run
    that ended keeps how it ended; one the store never saw is left alone."""
    store = RunStore(store_url)
    try:
        if store.get_run(run_id)["status"] in ("running", "lost"):
            store.finish_run(run_id, "stopped", f"stopped by SIGTERM or Ctrl-C; continue with "
                                                f"{resume_with}")
    except KeyError:  # stopped before the run was registered
        pass
    finally:
        store.close()


class RunNotRunning(ValueError):
    def __init__(self, run_id: str, status: str):
        why = (" (its process stopped without recording how: killed, or its machine went "
               "down; continue it with --resume)" if status == "lost" else "")
        super().__init__(f"run {run_id} is {status}, not running{why}: there is nothing to stop")
        self.run_id, self.status = run_id, status


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the store URL's password (the console shows the config)."""
    url = (config.get("store") or {}).get("url")
    if not url or "://" not in url:
        return config
    try:
        shown = _masked(make_url(url))
    except ArgumentError:
        shown = "***"
    return {**config, "store": {**config["store"], "url": shown}}


def _shown_status(run: Run) -> str:
    """The stored status, or "lost" for a running run whose process stopped beating."""
    if run.status == "running" and time.time() - run.updated_at > LOST_AFTER_S:
        return "lost"
    return run.status


def _run_dict(run: Run, with_config: bool = True) -> dict[str, Any]:
    d = {"run_id": run.id, "kind": run.kind, "task": run.task, "status": _shown_status(run),
         "rounds_total": run.rounds_total, "rounds_completed": run.rounds_completed,
         "out_dir": run.out_dir, "created_at": run.created_at, "updated_at": run.updated_at,
         "finished_at": run.finished_at, "stop_requested_at": run.stop_requested_at,
         "stop_requested_by": run.stop_requested_by}
    if with_config:
        d["config"] = run.config
    return d


def _round_dict(r: Round) -> dict[str, Any]:
    return {"round": r.round, **{k: getattr(r, k) for k in ROUND_COLUMNS},
            "secagg_participants": r.metrics.get("secagg_participants"),
            "recorded_at": r.recorded_at}


def _natural_key(client_id: str) -> tuple:
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)
