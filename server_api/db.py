"""Engine, sessions and migrations.

SQLite (the embedded default) runs in WAL mode with a busy timeout, and write transactions start with
BEGIN IMMEDIATE: a deferred transaction that reads and then writes can fail at once with SQLITE_BUSY when
another connection committed in between, whereas IMMEDIATE waits for the write lock up front. Read-only
sessions keep a plain BEGIN so that readers never queue behind writers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from server_api.driver import DriverTransaction, driver_transaction

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"
_READONLY = "facefl_readonly"


def normalize_url(url: str) -> str:
    """Accept postgresql:// and postgres:// for the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def create_db_engine(url: str) -> Engine:
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    # no pool_pre_ping: its SELECT 1 cost a round trip (and a BEGIN) on every checkout, more than a
    # check-in's own SQL; the hot paths replace a connection found dead before their first answer
    # (server_api.driver), and connections idle for a while are pinged on checkout
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_idle_connections(engine)
    return engine


#: a pooled connection unused for longer than this is pinged before it is handed out (a server restart
#: or a network device cutting idle connections is found there); busier ones are not
IDLE_PING_S = 10.0
_IDLE_SINCE = "facefl_idle_since"


def _ping_idle_connections(engine: Engine) -> None:
    """Pre-ping for idle connections only. A dead one that slips through (the server restarted less
    than IDLE_PING_S ago) fails its first statement: SQLAlchemy then discards the whole pool, and the
    driver's hot paths retry on a new connection (server_api.driver.DriverTransaction)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
            dbapi_conn.rollback()
        except engine.dialect.loaded_dbapi.Error as error:
            # the pool drops this connection and checks out another (SQLAlchemy's documented protocol)
            raise exc.DisconnectionError("idle connection is dead") from error


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (pysqlite's own is broken)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # on the driver's connection: exec_driver_sql would run SQLAlchemy's whole execution path (events,
        # result set-up), which costs more than BEGIN itself on every transaction
        begin = "BEGIN" if conn.get_execution_options().get(_READONLY) else "BEGIN IMMEDIATE"
        conn.connection.driver_connection.execute(begin)


_AFTER_COMMIT = "facefl_after_commit"


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` once the session's transaction has committed (never if it rolls back): for side
    effects such as metrics that must not count what did not happen."""
    session.info.setdefault(_AFTER_COMMIT, []).append(fn)


def _run_after_commit(session: Session) -> None:
    for fn in session.info.pop(_AFTER_COMMIT, []):
        fn()


def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)


class Database:
    """Holds the engine and the two session factories (read-write and read-only)."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = create_db_engine(self.url)
        self._rw = sessionmaker(self.engine, expire_on_commit=False)
        self._ro = sessionmaker(self.engine.execution_options(**{_READONLY: True}), expire_on_commit=False)
        event.listen(self._rw, "after_commit", _run_after_commit)
        event.listen(self._rw, "after_rollback", _drop_after_commit)
        # SQLite has one writer: queueing writers on a lock here is fairer and faster than SQLite's
        # busy handler, whose back-off sleeps grow to 100 ms under contention (p99 tails of ~1 s).
        self._write_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        )

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def serial_writes(self) -> bool:
        """Hot-path write transactions run on one thread (server_api.threads.run_write): SQLite."""
        return self.is_sqlite

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception."""
        with self._write_lock, self._rw() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._ro() as session, session.begin():
            yield session

    # The hot paths (check-in, authentication, upload intake) run prepared Core statements on the
    # driver's connection (server_api.driver): same transactions and locks as write()/read().

    def driver_write(self) -> AbstractContextManager[DriverTransaction]:
        """A write transaction (BEGIN IMMEDIATE on SQLite) that commits on success."""
        begin = ("BEGIN IMMEDIATE",) if self.is_sqlite else ()
        return driver_transaction(self.engine, self._write_lock, begin)

    def driver_read(self) -> AbstractContextManager[DriverTransaction]:
        """One read statement (plain BEGIN on SQLite: readers never queue behind writers; on PostgreSQL
        the statement runs in autocommit, its own transaction, without BEGIN and COMMIT round trips).
        Statements that must see one snapshot together belong in a write() or read() transaction."""
        if self.is_sqlite:
            return driver_transaction(self.engine, contextlib.nullcontext(), ("BEGIN",))
        return self.driver_statement()

    def driver_statement(self) -> AbstractContextManager[DriverTransaction]:
        """Not SQLite: statements in autocommit, each its own transaction (no BEGIN and COMMIT round
        trips); for one statement that reads or writes all it needs."""
        assert not self.is_sqlite
        return driver_transaction(self.engine, contextlib.nullcontext(), (), autocommit=True)

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    if not (ALEMBIC_DIR / "env.py").is_file():
        raise RuntimeError(
            f"Alembic migrations not found at {ALEMBIC_DIR}; install facefl from a source checkout"
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


@contextmanager
def scratch_database(server_url: str, prefix: str = "facefl_scratch") -> Iterator[str]:
    """A new, uniquely named PostgreSQL database on the server of ``server_url`` (dropped on exit).

    For tests and benchmarks that need an empty database without touching the one they were given.
    """
    import uuid

    from sqlalchemy import text

    admin_url = make_url(normalize_url(server_url))
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()
