"""Database engine and sessions, the metadata naming convention, and the column types we share."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event, func, select, text
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from koolbase_ota.clock import utcnow
from koolbase_ota.errors import DatabaseUnavailable, InvalidInput

__all__ = ["Base", "Database", "UTCDateTime", "database_now", "utcnow"]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores UTC without a zone (SQLite has none) and always hands back aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC)


def normalise_url(url: str) -> str:
    """Accept the plain URL a provider hands out and pick our driver for it."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def create_db_engine(
    url: str, *, timeout_seconds: float = 10.0, connections: int | None = None
) -> Engine:
    """Build the engine; SQLite gets WAL, a busy timeout and write transactions that lock first.

    `connections` bounds the pool: by default 30 on PostgreSQL, 40 on SQLite. It grows with
    demand up to that, and keeps up to 10 (PostgreSQL) or 20 (SQLite) open when idle.

    A URL that cannot be used is one clear `InvalidInput` naming no part of it: it may hold
    a password.
    """
    try:
        return _create_db_engine(
            normalise_url(url), timeout_seconds=timeout_seconds, connections=connections
        )
    except (ArgumentError, ValueError, ImportError):
        raise InvalidInput(
            "the database URL is not one koolbase-ota can use: expected"
            " postgresql://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:///PATH"
        ) from None
    except OSError as exc:
        raise InvalidInput(f"cannot create the database's directory: {exc.strerror}") from None


def _create_db_engine(url: str, *, timeout_seconds: float, connections: int | None) -> Engine:
    parsed = make_url(url)
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ValueError("no such port")
    if "@" in (parsed.host or "") or "@" in (parsed.username or ""):
        # `user:p@ss@host`: the password ended at its first @, the rest of it became the host,
        # and the driver's error named it ("failed to resolve host 'ss@host'"); an @ in the
        # query made the user name run into the host the same way.
        raise InvalidInput(
            "the database URL has an @ besides the one before its host (in the user name,"
            " the password or the query): write it as %40"
        )
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": timeout_seconds, "check_same_thread": False},
            pool_timeout=timeout_seconds,
            **_pool(most=connections or 40, idle=20),
        )
        _configure_sqlite(engine)
        return engine
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_timeout=timeout_seconds,
        **_pool(most=connections or 30, idle=10),
        connect_args={
            "connect_timeout": max(1, int(timeout_seconds)),
            # No server-side prepared statements (psycopg prepares a statement run five times
            # on a connection): behind a pooler in transaction mode (PgBouncer before 1.21, or
            # without `max_prepared_statements`) the next transaction may run on a server
            # connection that has not got it, or has another client's of the same name.
            "prepare_threshold": None,
        },
    )
    _configure_postgres(engine, timeout_seconds=timeout_seconds)
    return engine


def _pool(*, most: int, idle: int) -> dict[str, int]:
    """A pool that opens at most `most` connections and keeps up to `idle` of them open."""
    return {"pool_size": min(most, idle), "max_overflow": most - min(most, idle)}


#: How much longer than the statement timeout a connection waits for the server's answer:
#: a server that is up answers a statement it cancels well within it.
ANSWER_GRACE_SECONDS = 2.0


def _configure_postgres(engine: Engine, *, timeout_seconds: float) -> None:
    import psycopg

    statement_timeout_ms = int(timeout_seconds * 1000)
    answer_timeout = timeout_seconds + ANSWER_GRACE_SECONDS

    @event.listens_for(engine, "connect", insert=True)
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        _answer_within(dbapi_connection, answer_timeout, psycopg)
        # A statement that hangs fails after the timeout rather than holding a request forever.
        # Set once a connection is open, not sent with the connection's start-up parameters
        # (`options=-c statement_timeout=...`): PgBouncer refuses every connection that sends
        # a start-up parameter it does not track, and no connection could be made through it.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(f"SET statement_timeout = {statement_timeout_ms}")
        finally:
            dbapi_connection.autocommit = autocommit


def _answer_within(connection: Any, seconds: float, psycopg: Any) -> None:
    """Make the psycopg `connection` wait at most `seconds` for the server's answer.

    The statement timeout is the server's: a server that does not answer at all (frozen, or
    cut off by a network that drops its packets, as in a failover, or a pooler queueing the
    connection) held a request, a check's lookup or `/readyz` until it came back, however long.
    Every wait of a connection for the server goes through its `wait` (connecting has its own
    `connect_timeout`). The one that runs out closes the connection, whose state is then
    unknown; SQLAlchemy drops it from the pool, and the request fails with 503 as for a
    database that is down. (A COMMIT abandoned so may have been written: as for a connection
    that drops before its answer, which the bundle routes already allow for.) One wait is one
    statement's answer, or a batch's that psycopg sends at once (`executemany`: the server
    answers it whole at its end), so a batch must finish within `seconds` too. A wait given
    a timeout of its own (psycopg's `notifies`) is psycopg's, as it was.
    """
    wait = type(connection).wait
    this: weakref.ref[Any] = weakref.ref(connection)  # no cycle: a dropped one is freed

    def wait_for_an_answer(gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        connection: Any = this()  # alive: it is what calls this
        if timeout is not None:
            return wait(connection, gen, interval, timeout)
        try:
            return wait(connection, gen, interval, seconds)
        except psycopg.errors._WaitTimeout:
            connection.pgconn.finish()
            raise psycopg.OperationalError(
                "the database did not answer in time; the connection was closed"
            ) from None

    connection.wait = wait_for_an_answer


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Write transactions BEGIN IMMEDIATE: they take the write lock up front, so two writers
        # queue on the busy timeout instead of one failing with "database is locked" when it
        # upgrades a read lock. Reads stay deferred and run beside a writer under WAL.
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def database_now(session: Session) -> dt.datetime:
    """Now by the database's clock on PostgreSQL, which every host shares; by this host's on
    SQLite, whose file only its own host uses. For times that hosts other than the writer's
    compare (`koolbase-ota gc` ageing an upload's record)."""
    if session.get_bind().dialect.name != "postgresql":
        return utcnow()
    now: dt.datetime = session.execute(select(func.now())).scalar_one()
    return now.astimezone(dt.UTC)


class Database:
    """The engine plus the two kinds of transaction services open: read and write."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(
            engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False
        )

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A transaction that only reads; rolled back at the end."""
        with self._read() as session:
            yield session  # closing the session rolls the read transaction back

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction committed when the block ends without an exception."""
        with self._write() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


@contextlib.contextmanager
def migration_lock(engine: Engine, lock_dir: Path) -> Iterator[None]:
    """Serialise schema migrations and first-run set-up across processes starting at once."""
    if is_sqlite(engine):
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / ".migrate.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with engine.connect() as connection:
        # Any constant works; it only has to be the same in every process of this server.
        connection.execute(text("SELECT pg_advisory_lock(7405331)"))
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(7405331)"))
            connection.commit()


def alembic_config(connection: Any = None) -> Any:
    """Alembic's config for the migrations shipped inside the package."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "koolbase_ota:migrations")
    config.attributes["connection"] = connection
    return config


class DatabaseUnreachable(DatabaseUnavailable):
    """No connection to the database could be made: it may be starting, or out of reach."""


class SchemaTooNew(DatabaseUnavailable):
    """The database was migrated by a newer koolbase-ota than this one."""

    default_code = "schema_too_new"


def upgrade_schema(engine: Engine, *, lock_dir: Path) -> str | None:
    """Bring the schema to the newest migration; safe when several processes start at once.

    Returns the revision migrated to, or None when the schema was already up to date. A
    database that cannot be reached, or that a newer version migrated (an older process
    started after an upgrade), is one `DatabaseUnavailable` the command line reports on one
    line, not a traceback.
    """
    try:
        with engine.connect() as connection:
            if _revision(connection) == SCHEMA_HEAD:
                # The common case, on every start and every command: nothing to lock, nothing
                # to log, and Alembic not imported (a fifth of a command's time).
                return None
        return _upgrade_schema(engine, lock_dir=lock_dir)
    except (OperationalError, InterfaceError) as exc:
        # The driver's first line says what went wrong (refused, unknown host, bad password,
        # a timeout) and never holds the password itself.
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else "unknown"
        # No statement: no connection was made; unless libpq refused the URL's options (an
        # sslmode it does not know) before it tried any server. (psycopg says "connection is
        # bad" for those, and for a server libpq failed at once: no socket file, no route.)
        unreachable = exc.statement is None and (
            not reason.startswith("connection is bad")
            or "connection to server" in reason
            or "resolve host" in reason
        )
        raise (DatabaseUnreachable if unreachable else DatabaseUnavailable)(
            f"cannot use the database: {reason}"
        ) from None


#: The newest migration's revision (`migrations/versions`); a test holds the two together.
SCHEMA_HEAD = "0006"


def _revision(connection: Connection) -> str | None:
    """The schema's one revision as Alembic records it; None when there is no such table (a
    new database) or not exactly one row (Alembic refuses more than one head)."""
    try:
        rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    except ProgrammingError:  # PostgreSQL: no such table
        return None
    except OperationalError as exc:
        if "no such table" in str(exc.orig):  # SQLite
            return None
        raise  # a timeout, a lost connection: reported once, not waited for twice
    return str(rows[0][0]) if len(rows) == 1 else None


def _upgrade_schema(engine: Engine, *, lock_dir: Path) -> str | None:
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        if current == head:
            return None
    if current is not None and current not in {r.revision for r in script.walk_revisions()}:
        raise SchemaTooNew(
            f"the database schema is at revision {current}, which this version of"
            f" koolbase-ota does not know (its newest is {head}); a newer version migrated"
            " it, so run that one"
        )
    with migration_lock(engine, lock_dir), engine.begin() as connection:
        # Processes started at once all found it behind, and each said it had migrated it:
        # all but the first find it migrated once they hold the lock.
        if MigrationContext.configure(connection).get_current_revision() == head:
            return None
        command.upgrade(alembic_config(connection), "head")
    return head
