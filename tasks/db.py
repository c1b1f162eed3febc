"""The SQL store of the batch pattern: its tables, its engine, and the migrations that build them.

MySQL or MariaDB (`mysql+pymysql://...`) in production, SQLite as the embedded default. The schema is
made and upgraded by Alembic (`python -m tasks.db upgrade`, which `make run` does before it starts
anything); the migrations live in `tasks/migrations/` and run on both.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from tasks.config import TaskSettings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MYSQL = ("mysql", "mariadb")

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite makes only INTEGER keys row ids
Time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), *MYSQL)
Json = sa.Text().with_variant(mysql.MEDIUMTEXT(), *MYSQL)
"""A prediction or an error: JSON text, up to 16 MiB on MySQL."""
Input = sa.Text().with_variant(mysql.LONGTEXT(), *MYSQL)
"""An instance as a client sends it (an encoded image included)."""
Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), *MYSQL)

metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
})

items = sa.Table(
    "batch_items", metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(100), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("input", Input, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("prediction", Json),
    sa.Column("error", Json),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("run_id", Id),
    sa.Column("claim", sa.String(36)),
    sa.Column("leased_until", Time),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("started_at", Time),
    sa.Column("finished_at", Time),
    sa.Index(None, "model", "status", "id"),
    sa.Index(None, "created_at"),
)
"""One row per item to predict; `claim` and `leased_until` hold it while a chunk task runs it. One
secondary index serves every query the runs make (claims, counts, leases: a model has one run at a time);
each more index on a column they change would cost every claim and write-back a second index update. The
other, on `created_at`, which never changes, finds the oldest rows for the retention purge."""

runs = sa.Table(
    "batch_runs", metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(100), nullable=False),
    sa.Column("triggered_by", sa.String(200), nullable=False),
    sa.Column("period", sa.String(64)),
    sa.Column("active", sa.String(100), unique=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("high_water", Id),
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", Json),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("started_at", Time),
    sa.Column("updated_at", Time),
    sa.Column("finished_at", Time),
    sa.Column("reconciled_at", Time),
    sa.UniqueConstraint("model", "period"),
    sa.Index(None, "model", "id"),
)
"""One row per run. `active` holds the model's name while the run is queued or running, and is unique,
so a model never has two runs at once; (`model`, `period`) is unique, so a schedule fires once a period.
`reconciled_at` is when beat's reconciler last looked at the run while it was live."""


data = sa.Table(
    "data_items", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("content", Blob, nullable=False),
    sa.Column("content_type", sa.String(100), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Index(None, "created_at"),
)
"""Raw inputs of the data-cache pattern, by random id: an encoded image, or the JSON of one instance."""

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("scopes", sa.String(100), nullable=False),
    sa.Column("rate_limit", sa.String(64)),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("revoked_at", Time),
)
"""API keys of the web API: the SHA-256 of each token's secret (never the token), its space-separated
scopes, and its rate (`limits` notation; NULL: the server's default). A token names its row's id."""

prediction_log = sa.Table(
    "prediction_log", metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("uid", sa.String(24), nullable=False, unique=True),
    sa.Column("model", sa.String(100), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("source", sa.String(8), nullable=False),
    sa.Column("request_id", sa.String(100), nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("latency_ms", sa.Double),
    sa.Column("row_count", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(40), nullable=False),
    sa.Column("inputs", Json),
    sa.Column("outputs", Json, nullable=False),
    sa.Column("outlier", sa.Boolean, nullable=False),
    sa.Column("outliers", Json),
    sa.Index(None, "model", "created_at"),
    sa.Index(None, "created_at"),
    sa.Index(None, "request_id"),
)
"""Sampled predictions (sync, job, batch), one row per request, job or item: when and how fast, the input features
(JSON, or NULL when only their digest is kept), the outputs, and the rows flagged as outliers. `uid` is made with
the record, so a record written twice (drained again after a worker was lost) is stored once."""

drift_checks = sa.Table(
    "drift_checks", metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(100), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("row_count", sa.Integer, nullable=False),
    sa.Column("threshold", sa.Double, nullable=False),
    sa.Column("psi", Json, nullable=False),
    sa.Column("worst", sa.Double, nullable=False),
    sa.Column("alert", sa.Boolean, nullable=False),
    sa.Column("checked_at", Time, nullable=False),
    sa.Index(None, "model", "version", "id"),
    sa.Index(None, "checked_at"),
)
"""One row per drift check of a model version: the rows compared, the PSI of each feature (JSON), the worst of
them, and whether it passed the spec's threshold."""


def create_engine(url: str, timeout_s: float | None = None) -> sa.Engine:
    """An engine for `url`: read-committed on MySQL, WAL and a busy timeout on SQLite.

    A MySQL connection waits at most `timeout_s` (DATABASE_TIMEOUT_S) on any reply and 10 s to connect, so
    a server gone silent fails a statement instead of hanging its process; pooled connections are pinged
    before use, so one the server dropped is replaced rather than failing the next statement.
    """
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    timeout_s = TaskSettings.from_env().database_timeout_s if timeout_s is None else timeout_s
    waits = {"connect_timeout": min(timeout_s, 10), "read_timeout": timeout_s, "write_timeout": timeout_s}
    return sa.create_engine(url, pool_pre_ping=True, pool_recycle=3600, isolation_level="READ COMMITTED",
                            connect_args=waits)


def _sqlite_pragmas(connection: object, _: object) -> None:
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def page(engine: sa.Engine, table: sa.Table, columns: tuple, where: list, number: int,
         per_page: int) -> tuple[list[sa.Row], int]:
    """Page `number` of the rows of `table` matching `where`, newest id first; and how many match in all."""
    query = sa.select(*columns).where(*where).order_by(table.c.id.desc())
    with engine.connect() as connection:
        rows = connection.execute(query.limit(per_page).offset((number - 1) * per_page)).all()
        total = connection.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
    return rows, total


def now() -> datetime.datetime:
    """The current time as the tables store it: naive UTC."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def iso(value: datetime.datetime | None) -> str | None:
    """A stored time as the API shows it."""
    return None if value is None else value.replace(tzinfo=datetime.UTC).isoformat(timespec="milliseconds")


def alembic_config(url: str) -> object:
    """Alembic's configuration for the migrations of this package, against `url`."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Create or upgrade the schema at `url` to `revision`; a SQLite file's folder is made if missing."""
    from alembic import command

    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Take the schema at `url` back to `revision`."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def main(argv: list[str]) -> int:
    """`python -m tasks.db upgrade|downgrade [revision]` against DATABASE_URL."""
    if not argv or argv[0] not in ("upgrade", "downgrade"):
        print("usage: python -m tasks.db upgrade|downgrade [revision]", file=sys.stderr)
        return 2
    url = TaskSettings.from_env().database_url
    (upgrade if argv[0] == "upgrade" else downgrade)(url, *argv[1:2])
    print(f"db: {argv[0]} done on {sa.make_url(url).render_as_string(hide_password=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
