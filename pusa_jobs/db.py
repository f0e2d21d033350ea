"""The job database: engine, the database clock, transactions, transient errors and migrations.

SQLite (one file in WAL mode; several processes of one node) is the embedded default; PostgreSQL serves
a cluster. The same statements run on both. Reads run without a transaction (autocommit); writes run in
one transaction each, which SQLite opens with ``BEGIN IMMEDIATE`` so concurrent writers queue on the
busy timeout instead of failing when a read lock would have to be upgraded.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import Float

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Key of the PostgreSQL advisory lock that serialises migrations of replicas starting together.
_MIGRATION_LOCK = 0x7075_7361  # "pusa"
SQLITE_BUSY_TIMEOUT_S = 30.0

T = TypeVar("T")


class db_now(FunctionElement):
    """The database server's clock, in seconds since the epoch.

    Leases compare against this one clock, so runners on machines whose clocks drift apart still agree
    on when a lease has expired."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "postgresql")
def _postgres_now(element, compiler, **kw) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_now, "sqlite")
def _sqlite_now(element, compiler, **kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


# PostgreSQL SQLSTATEs worth retrying: connection exceptions (08), a transaction rolled back by a
# serialization failure or deadlock (40), the server shutting down, restarting or cancelling the statement
# (57), too many connections or out of memory (53300, 53200). Not: a full disk (53100), a read-only
# transaction (25006), a missing table (42P01) or any other statement that cannot succeed as it is.
_PG_TRANSIENT_CLASSES = ("08", "40", "57")
_PG_TRANSIENT_STATES = frozenset({"53200", "53300"})
# SQLite result codes worth retrying (primary codes): busy and locked (another writer), an I/O error or a
# file that cannot be opened now (a storage hiccup), a WAL protocol race. Not: read-only, full, corrupt,
# not a database, a missing table (SQLITE_ERROR), a constraint...
_SQLITE_TRANSIENT_CODES = frozenset({5, 6, 10, 14, 15})  # BUSY, LOCKED, IOERR, CANTOPEN, PROTOCOL


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` means the database is unreachable, restarting or busy (worth retrying), rather than
    a statement that can never succeed or a database that cannot take writes (read-only, full disk,
    missing table): those are raised at once rather than waited out."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)  # psycopg
    if sqlstate:
        return sqlstate[:2] in _PG_TRANSIENT_CLASSES or sqlstate in _PG_TRANSIENT_STATES
    code = getattr(orig, "sqlite_errorcode", None)  # sqlite3 (Python 3.11+)
    if code is not None:
        return code & 0xFF in _SQLITE_TRANSIENT_CODES
    return True  # no code: the driver could not reach the server (refused, reset, timed out)


class Database:
    """An engine on `url` (``sqlite:///path`` or ``postgresql+psycopg://...``)."""

    def __init__(self, url: str, pool_size: int = 5) -> None:
        parsed = make_url(url)
        self.url = parsed
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = create_engine(parsed, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size * 2)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One transaction, committed when the block ends (rolled back on an exception)."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection whose statements each see the latest committed state (no transaction)."""
        with self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)})"


def _sqlite_connect(dbapi_connection, _record) -> None:
    # Let SQLAlchemy's "begin" event (below) issue BEGIN, instead of pysqlite's own deferred BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process crashes, one fsync per checkpoint
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def retry_transient(fn: Callable[[], T], *, attempts: int = 5, first_delay_s: float = 0.2) -> T:
    """`fn()`, retried with doubling delays while it fails with a transient database error."""
    delay = first_delay_s
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            logger.warning("database unavailable (%s); retrying in %.1f s", type(exc).__name__, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def alembic_config(db: Database) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # (configparser reads `%` as interpolation)
    config.set_main_option("sqlalchemy.url", db.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def migrate(db: Database) -> None:
    """Bring the schema to the latest revision; safe when several replicas start at once (one
    transaction under an exclusive lock: PostgreSQL's advisory lock, SQLite's write lock)."""

    def upgrade() -> None:
        with db.write() as conn:
            if db.dialect == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            config = alembic_config(db)
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    retry_transient(upgrade)


def open_database(url: str) -> Database:
    """A `Database` on `url`, migrated to the latest schema."""
    db = Database(url)
    migrate(db)
    return db


def main(argv: list[str] | None = None) -> int:
    """`pusa-db`: migrate the job database ahead of a deploy, or print its schema revision."""
    parser = argparse.ArgumentParser(prog="pusa-db", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("command", choices=("upgrade", "current"))
    parser.add_argument("url", help="sqlite:///path or postgresql+psycopg://user@host:port/db (password from PGPASSWORD)")
    args = parser.parse_args(argv)
    try:
        db = Database(args.url)
        try:
            if args.command == "upgrade":
                migrate(db)
            with db.read() as conn:
                print(MigrationContext.configure(conn).get_current_revision() or "(empty)")
        finally:
            db.dispose()
    except Exception as exc:
        print(f"pusa-db: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
