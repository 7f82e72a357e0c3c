"""Each plugin identity's persistent key-value store: SQLite in the state directory.

One database (WAL mode) for all plugins; rows are keyed by the identity the parent bound to
the channel (``signer/plugin``), so a plugin sees only its own keys and keeps them across
launches. A quota bounds the total bytes (keys + values) per identity.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    owner TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (owner, key)
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
        """Bytes (keys + values) the owner holds."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(key) + LENGTH(value)), 0) FROM kv WHERE owner=?", (owner,)
        ).fetchone()
        return int(row[0])

    def set(self, owner: str, key: bytes, value: bytes, quota: int) -> None:
        """Store ``value`` under ``key``. Raises: QuotaExceeded."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            old = self.get(owner, key)
            total = self.used(owner) - (len(key) + len(old) if old is not None else 0)
            if total + len(key) + len(value) > quota:
                raise QuotaExceeded(f"kv quota of {quota} bytes exceeded")
            self._db.execute(
                "INSERT INTO kv(owner, key, value) VALUES(?,?,?) "
                "ON CONFLICT(owner, key) DO UPDATE SET value=excluded.value",
                (owner, key, value),
            )

    def close(self) -> None:
        """Close the database."""
        self._db.close()
