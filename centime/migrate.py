"""Forward-only migrations: the numbered .sql files in migrations/, each
applied once in its own transaction and recorded with its checksum."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import asyncpg
import msgspec

from centime.sql import load_queries

Q = load_queries("centime", "queries/queries.sql")
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class Migration(msgspec.Struct, frozen=True):
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    pass


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must run 1..n without gaps, found {versions}")
    return migrations


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply what is missing. Safe to run concurrently: an advisory lock
    serialises runs. Refuses if an applied file was edited since."""
    migrations = discover(directory)
    await conn.execute(Q["migrations_lock"])
    try:
        await conn.execute(Q["migrations_table"])
        applied = {row["version"]: row for row in await conn.fetch(Q["migrations_applied"])}
        done = []
        for migration in migrations:
            row = applied.get(migration.version)
            if row is not None:
                if row["sha256"] != migration.sha256:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was edited after it was applied; "
                        "add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(Q["migration_record"], migration.version, migration.name, migration.sha256)
            done.append(migration)
        return done
    finally:
        await conn.execute(Q["migrations_unlock"])


async def migrate_database(database_url: str, *, connect_timeout_s: float) -> list[Migration]:
    """`migrate` over a connection of its own to `database_url`."""
    conn = await asyncpg.connect(database_url, timeout=connect_timeout_s)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
