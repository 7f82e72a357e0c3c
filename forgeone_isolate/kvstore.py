"""Each plugin identity's persistent key-value store: SQLite in the state directory.

One database (WAL mode) for all plugins; rows are keyed by the identity the parent bound to
the channel (``signer/plugin``), so a plugin sees only its own keys and keeps them across
launches. A quota bounds what each identity holds: its keys and values, plus
:data:`KEY_COST` bytes per key (what a row costs the database beyond them: without it,
a million one-byte keys would be "1 MB" and take 30 times that on disk). What an identity
holds is kept in a row of its own, updated in the same transaction as the value, so a
``set`` costs the same whatever the identity holds (a sum over its rows, in the write
transaction every plugin shares, let one plugin with many keys hold the lock).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

#: bytes charged per key on top of its key and value
KEY_COST = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    owner TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (owner, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_usage (
    owner TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
"""


class QuotaExceeded(Exception):
    """Raised by :meth:`KvStore.set` when the owner's total would pass its quota."""


class KvStore:
    """The SQLite store; one connection, used from one thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def get(self, owner: str, key: bytes) -> bytes | None:
        """The value, or None."""
        row = self._db.execute(
            "SELECT value FROM kv WHERE owner=? AND key=?", (owner, key)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def used(self, owner: str) -> int:
        """Bytes charged to the owner: its keys and values, and KEY_COST per key."""
        row = self._db.execute("SELECT bytes FROM kv_usage WHERE owner=?", (owner,)).fetchone()
        if row is not None:
            return int(row[0])
        # (a store from before kv_usage, or an owner with nothing yet: counted once)
        row = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(key) + LENGTH(value) + ?), 0) FROM kv WHERE owner=?",
            (KEY_COST, owner),
        ).fetchone()
        return int(row[0])

    def set(self, owner: str, key: bytes, value: bytes, quota: int) -> None:
        """Store ``value`` under ``key``. Raises: QuotaExceeded, sqlite3.Error."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            old = self._db.execute(
                "SELECT LENGTH(value) FROM kv WHERE owner=? AND key=?", (owner, key)
            ).fetchone()
            held = self.used(owner)
            total = held - (len(key) + int(old[0]) + KEY_COST if old is not None else 0)
            total += len(key) + len(value) + KEY_COST
            if total > quota:
                raise QuotaExceeded(f"kv quota of {quota} bytes exceeded")
            self._db.execute(
                "INSERT INTO kv(owner, key, value) VALUES(?,?,?) "
                "ON CONFLICT(owner, key) DO UPDATE SET value=excluded.value",
                (owner, key, value),
            )
            self._db.execute(
                "INSERT INTO kv_usage(owner, bytes) VALUES(?,?) "
                "ON CONFLICT(owner) DO UPDATE SET bytes=excluded.bytes",
                (owner, total),
            )

    def close(self) -> None:
        """Close the database."""
        self._db.close()
