"""API keys: issued once as `msp_<id>_<secret>`, kept as the SHA-256 of the secret in the SQL store.

`python -m webapp.keys create --scope predict [--scope ...] [--name NAME] [--rate "100/second"]` prints a
new key's token, once; `list` shows the keys without their tokens; `revoke ID` refuses a key from then on.
The id in a token finds its row by primary key, so a check is one indexed lookup and one constant-time
comparison of digests. The secret is 256 random bits, so a plain SHA-256 of it cannot be reversed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass

import limits
import sqlalchemy as sa

from tasks import db

SCOPES = ("predict", "submit", "batch", "data", "admin")
ADMIN = "admin"
"""The scope that allows every other."""
PREFIX = "msp"
TOKEN = re.compile(rf"{PREFIX}_([1-9][0-9]{{0,17}})_([A-Za-z0-9_-]{{43}})")


@dataclass(frozen=True)
class ApiKey:
    """A key as the store shows it: never its token or its digest."""

    id: int
    name: str
    scopes: frozenset[str]
    rate_limit: str | None
    """Requests allowed per window (`limits` notation, e.g. `100/second`); None: the server's default."""
    revoked: bool = False


def digest(secret: str) -> str:
    """The stored form of a token's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[int, str] | None:
    """The key id and secret of a well-formed token, or None."""
    match = TOKEN.fullmatch(token)
    return None if match is None else (int(match[1]), match[2])


def check_scopes(scopes: list[str]) -> frozenset[str]:
    """The scopes asked for, refused (ValueError) if none or one is unknown."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}, not {unknown or 'none'}")
    return frozenset(scopes)


def check_rate(rate: str | None) -> str | None:
    """A rate in `limits` notation (`100/second`, `10 per minute`), refused (ValueError) if it is not one."""
    if rate is not None:
        limits.parse(rate)
    return rate


class KeyStore:
    """The `api_keys` table on one engine."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def create(self, scopes: list[str], name: str = "", rate_limit: str | None = None) -> tuple[ApiKey, str]:
        """Record a new key; answer it and its token, which is never stored and cannot be shown again."""
        secret = secrets.token_urlsafe(32)
        row = {"name": name, "scopes": " ".join(sorted(check_scopes(scopes))), "rate_limit": check_rate(rate_limit),
               "token_hash": digest(secret), "created_at": db.now()}
        with self.engine.begin() as connection:
            key_id = connection.execute(db.api_keys.insert().values(row)).inserted_primary_key[0]
        return _key({**row, "id": key_id, "revoked_at": None}), f"{PREFIX}_{key_id}_{secret}"

    def verify(self, token: str) -> ApiKey | None:
        """The key a token belongs to, or None if it is malformed, unknown, wrong or revoked."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(db.api_keys).where(db.api_keys.c.id == parsed[0])).first()
        if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, digest(parsed[1])):
            return None
        return _key(row._asdict())

    def revoke(self, key_id: int) -> bool:
        """Refuse a key from now on; False if there is no such key or it was revoked before."""
        table = db.api_keys
        query = table.update().where(table.c.id == key_id, table.c.revoked_at.is_(None)).values(revoked_at=db.now())
        with self.engine.begin() as connection:
            return connection.execute(query).rowcount == 1

    def list(self) -> list[sa.Row]:
        """Every key, oldest first, without the digests."""
        table = db.api_keys
        columns = (table.c.id, table.c.name, table.c.scopes, table.c.rate_limit, table.c.created_at, table.c.revoked_at)
        with self.engine.connect() as connection:
            return connection.execute(sa.select(*columns).order_by(table.c.id)).all()

    def exists(self) -> bool:
        """Whether any key was ever created (revoked ones count: revoking never opens a server)."""
        with self.engine.connect() as connection:
            return connection.execute(sa.select(db.api_keys.c.id).limit(1)).first() is not None


def _key(row: dict) -> ApiKey:
    return ApiKey(row["id"], row["name"], frozenset(row["scopes"].split()), row["rate_limit"],
                  row["revoked_at"] is not None)


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m webapp.keys", description="Manage the API keys in DATABASE_URL.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print its token, once")
    create.add_argument("--scope", action="append", required=True, choices=SCOPES, help="repeat for several")
    create.add_argument("--name", default="", help="what the key is for")
    create.add_argument("--rate", help='requests allowed, e.g. "100/second" (default: RATE_LIMIT)')
    commands.add_parser("list", help="list the keys, never their tokens")
    revoke = commands.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("id", type=int)
    return parser


def _create(store: KeyStore, options: argparse.Namespace) -> int:
    try:
        key, token = store.create(options.scope, options.name, options.rate)
    except ValueError as exc:
        print(f"keys: {exc}", file=sys.stderr)
        return 2
    print(f"created key {key.id} ({key.name or 'unnamed'}): scopes {' '.join(sorted(key.scopes))}, "
          f"rate {key.rate_limit or 'default'}; store the token now, it is not shown again", file=sys.stderr)
    print(token)
    return 0


def _list(store: KeyStore) -> int:
    print(f"{'id':>6}  {'prefix':<14}  {'name':<20}  {'scopes':<32}  {'rate':<14}  {'created':<20}  revoked")
    for row in store.list():
        print(f"{row.id:>6}  {f'{PREFIX}_{row.id}_...':<14}  {row.name:<20}  {row.scopes:<32}  "
              f"{row.rate_limit or 'default':<14}  {_when(row.created_at):<20}  {_when(row.revoked_at)}")
    return 0


def _when(value: datetime.datetime | None) -> str:
    return "-" if value is None else f"{db.iso(value)[:19]}Z"


def _revoke(store: KeyStore, key_id: int) -> int:
    if store.revoke(key_id):
        print(f"revoked key {key_id}")
        return 0
    print(f"keys: no key {key_id} that is not revoked already", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    """`python -m webapp.keys create|list|revoke` against DATABASE_URL, migrated first."""
    from tasks.config import TaskSettings

    options = _arguments().parse_args(argv)
    url = TaskSettings.from_env().database_url
    db.upgrade(url)
    store = KeyStore(db.create_engine(url))
    if options.command == "create":
        return _create(store, options)
    return _list(store) if options.command == "list" else _revoke(store, options.id)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
