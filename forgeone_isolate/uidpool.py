"""Host uids for plugins: a distinct one per concurrently running plugin.

A lease is an exclusive ``flock`` on ``<dir>/<uid>.lock``; the kernel drops it when the
holder dies, so a crashed supervisor never leaks a uid. Works across processes (several
one-shot ``launch`` commands, or the service).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Final

from forgeone_isolate.errors import SetupError

DEFAULT_FIRST: Final = 3_000_000_000 // 2  # far above any distribution's subuid ranges
DEFAULT_COUNT: Final = 65536


def run_dir() -> Path:
    """The machine-wide runtime directory (``FORGEONE_RUN_DIR``, default /run/forgeone).

    Uid leases live here, not in a state directory: two supervisors with different state
    directories must still never hand the same host uid (or address) to two plugins.
    """
    return Path(os.environ.get("FORGEONE_RUN_DIR", "/run/forgeone"))


def default_lease_dir() -> Path:
    """Where :func:`lease_uid` keeps its lock files by default."""
    return run_dir() / "uids"


class UidLease:
    """One leased host uid; release it with :meth:`release` or a ``with`` block."""

    def __init__(self, uid: int, fd: int, path: Path, index: int = 0) -> None:
        self.uid = uid
        #: the uid's place counted from DEFAULT_FIRST, whatever range it was leased from:
        #: picks the plugin's network addresses (modulo the pool's size), so that two
        #: supervisors with different ranges (a service, a one-shot launch) pick different
        #: links for uids leased at once, as long as those lie within one pool's size
        self.index = index
        self._fd: int | None = fd
        self._path = path

    def release(self) -> None:
        """Give the uid back."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> UidLease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def lease_uid(
    directory: Path,
    first: int = DEFAULT_FIRST,
    count: int = DEFAULT_COUNT,
    hint: int | None = None,
) -> UidLease:
    """Take a free uid in [first, first+count): the first free one from ``hint`` (a uid
    in the range; default ``first``), wrapping around. Raises: SetupError."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise SetupError("uid-lease", e.errno or 0, f"cannot create {directory}") from None
    start = hint - first if hint is not None and first <= hint < first + count else 0
    for offset in range(count):
        uid = first + (start + offset) % count
        path = directory / f"{uid}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise SetupError("uid-lease", e.errno or 0, f"cannot open {path}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # The file may have been unlinked by its previous holder between open and flock.
        if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)
            continue
        return UidLease(uid, fd, path, uid - DEFAULT_FIRST)
    raise SetupError("uid-lease", 0, f"all {count} uids from {first} are in use")
