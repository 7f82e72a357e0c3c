"""A tamper-evident, append-only audit log: one JSON line per broker decision.

Line format: canonical JSON (sorted keys, ``,``/``:`` separators, ASCII only, so one record
is always one line) followed by ``\\n``. :meth:`AuditLog.append` adds three fields to the
caller's record:

- ``seq``: 1 for the first line of the log, then +1 per line (so ``seq`` is the line number,
  counting the lines of the files rotated away before this one);
- ``prev``: the sha256 (hex) of the previous line's bytes, without its newline; 64 zeros on
  the first line. Editing, deleting or reordering a line breaks the next line's ``prev``;
- ``hash``: the sha256 (hex) of the line's own canonical JSON without the ``hash`` field.
  It makes an edit of the *last* line (which no later ``prev`` covers) detectable too.

:func:`verify` (``python -m forgeone_isolate audit verify FILE``) checks every line and names
the first bad one. What a hash chain cannot tell from the file alone: the removal of whole
lines *at the end* (the file is then a valid, shorter log) and a rewrite of the entire chain
by someone who recomputes every hash; compare ``records`` with a copy kept elsewhere for that.

Durability: ``append(..., durable=True)`` writes and fsyncs before it returns (the broker
uses it for denials, so the record is on disk before the answer goes back). Other appends
are written at once (visible to readers) but fsynced in batches: every ``fsync_every``
appends and on :meth:`AuditLog.close`; a power loss can lose at most the last batch of
allows, never a denial.

Several writers (several launches) may share one file: each append takes an exclusive
``flock`` and, when the file grew since this writer's own last append, chains onto the
last line another writer wrote.

Rotation: a log is bounded. An append that would take the file past ``max_bytes`` first
starts a new file: its first line is an ``audit_rotated`` record that continues the chain
(its ``seq`` and ``prev`` follow the old file's last line), the old file becomes
``<name>.1`` (older ones ``.2`` ... up to ``keep``; the oldest is deleted), and the new
one takes the name in one rename, so the name always holds a whole log. A writer that
finds the name on another file than its own reopens it. :func:`verify` accepts a file
that starts with an ``audit_rotated`` record (its ``seq`` is then the line number plus
the records before it) and checks its ``prev`` against ``<name>.1`` when that is kept. A
forged rotation record cannot hide a removed beginning: the next line's ``prev`` names the
real line before it.

Records must never carry file contents or secrets; that is the caller's job, and
:func:`summarize` shows a value's size and a digest instead of its bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from forgeone_isolate.errors import IsolateError

ZERO_HASH: Final = "0" * 64
#: a log file is rotated before it grows past this many bytes
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
#: rotated files kept (``<name>.1`` the newest ... ``<name>.<keep>``)
DEFAULT_KEEP: Final = 8
ROTATED_OP: Final = "audit_rotated"
#: the longest line ``append`` writes; ``verify`` calls a longer line tampering.
MAX_LINE_BYTES: Final = 64 * 1024
RESERVED_FIELDS: Final = frozenset({"seq", "prev", "hash"})


class AuditError(IsolateError):
    """Raised when the audit log cannot be opened, chained onto or written."""


def canonical(record: dict[str, Any]) -> bytes:
    """The one serialisation of a record. Raises: TypeError/ValueError for non-JSON data."""
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal(record: dict[str, Any], seq: int, prev: str) -> bytes:
    """The line (without newline) for ``record`` at ``seq`` after a line hashing to ``prev``."""
    body = {**record, "seq": seq, "prev": prev}
    body["hash"] = _sha256(canonical(body))
    return canonical(body)


def summarize(value: bytes | str, limit: int = 64) -> str:
    """A safe stand-in for a value in an audit record.

    Bytes are never shown: their length and a sha256 prefix are. A string of at most
    ``limit`` characters is shown as is; a longer one is cut and carries its length and
    digest prefix.
    """
    if isinstance(value, bytes):
        return f"<{len(value)} bytes sha256:{_sha256(value)[:16]}>"
    if len(value) <= limit:
        return value
    digest = _sha256(value.encode("utf-8", "surrogatepass"))[:16]
    return f"{value[:limit]}…<{len(value)} chars sha256:{digest}>"


def _mkdirs_private(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700 (existing ones untouched)."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)


class AuditLog:
    """An append-only writer of one audit log file (see the module docstring).

    Raises: AuditError from the constructor when the file cannot be opened safely.
    """

    def __init__(
        self,
        path: Path,
        fsync_every: int = 64,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
    ) -> None:
        if fsync_every < 1:
            raise ValueError("fsync_every must be at least 1")
        if max_bytes < 2 * MAX_LINE_BYTES or keep < 1:
            raise ValueError(f"max_bytes must be at least {2 * MAX_LINE_BYTES}, keep at least 1")
        self.path = path
        self.fsync_every = fsync_every
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._unsynced = 0
        self._known_size = -1  # forces a read of the tail before the first append
        self._prev = ZERO_HASH
        self._seq = 0
        try:
            _mkdirs_private(path.parent)
            self._fd, created = self._open(path)
        except OSError as e:
            raise AuditError(f"audit log {path}: cannot open: {e.strerror or e}") from None
        if created:
            _fsync_dir(path.parent)

    @staticmethod
    def _open(path: Path) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(3):
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(path, flags)
                except FileNotFoundError:  # removed between the two opens: try again
                    continue
                created = False
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file")
            return fd, created
        raise OSError(errno.EAGAIN, "the file keeps disappearing")

    def append(self, record: dict[str, Any], *, durable: bool) -> None:
        """Chain and write one record; fsync now when ``durable``, else in batches.

        Raises: ValueError for a record that is not JSON data, uses a reserved field
        (``seq``, ``prev``, ``hash``) or is too long; AuditError when the log cannot be
        written or its last line cannot be chained onto.
        """
        reserved = RESERVED_FIELDS.intersection(record)
        if reserved:
            raise ValueError(f"audit record may not set {sorted(reserved)}")
        try:
            canonical(record)  # refuse non-JSON data before taking the lock
        except TypeError as e:
            raise ValueError(f"audit record is not JSON data: {e}") from None
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"audit log {self.path}: closed")
            try:
                self._lock_current()
                try:
                    self._append_locked(record, durable)
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError as e:
                raise AuditError(
                    f"audit log {self.path}: cannot append: {e.strerror or e}"
                ) from None

    def _lock_current(self) -> None:
        """flock our file, first moving to the one the name holds if another writer
        rotated it away meanwhile (checked under the old file's lock, which the rotating
        writer holds until the new file is in place)."""
        for _ in range(8):
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                named = os.lstat(self.path)
            except FileNotFoundError:
                named = None
            mine = os.fstat(self._fd)
            if named is not None and (named.st_ino, named.st_dev) == (mine.st_ino, mine.st_dev):
                return
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            if self._unsynced:
                os.fsync(self._fd)
                self._unsynced = 0
            fd, _created = self._open(self.path)
            os.close(self._fd)
            self._fd = fd
            self._known_size = -1  # chain onto what the new file holds
        raise OSError(errno.EAGAIN, "the log keeps being rotated away")

    def _append_locked(self, record: dict[str, Any], durable: bool) -> None:
        size = os.fstat(self._fd).st_size
        if size != self._known_size:  # first append, or another writer appended
            self._seq, self._prev = self._read_tail(size)
        line = seal(record, self._seq + 1, self._prev)
        if len(line) + 1 > MAX_LINE_BYTES:
            raise ValueError(f"audit record is {len(line)} bytes, more than {MAX_LINE_BYTES}")
        if size > 0 and size + len(line) + 1 + MAX_LINE_BYTES > self.max_bytes:
            self._rotate(size)  # (room for the rotation record: MAX_LINE_BYTES at most)
            size = self._known_size
            line = seal(record, self._seq + 1, self._prev)
        data = line + b"\n"
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        self._known_size = size + len(data)
        self._seq += 1
        self._prev = _sha256(line)
        self._unsynced += 1
        if durable or self._unsynced >= self.fsync_every:
            os.fsync(self._fd)
            self._unsynced = 0

    def _rotate(self, size: int) -> None:
        """Start a new file under the name, whose first line continues the chain; the old
        one becomes ``<name>.1``. Called with our (current) file locked."""
        path = self.path
        new = path.with_name(path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new)  # a rotation that died half-way (we hold the lock: nobody else)
        fd = os.open(
            new,
            os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # others, once they see it, wait for our append
            mark = seal(
                {
                    "time": time.time(),
                    "op": ROTATED_OP,
                    "previous": f"{path.name}.1",
                    "previous_bytes": size,
                },
                self._seq + 1,
                self._prev,
            )
            os.write(fd, mark + b"\n")
            os.fsync(fd)
            if self._unsynced:
                os.fsync(self._fd)
                self._unsynced = 0
            _shift_rotated(path, self.keep)
            os.link(path, _rotated(path, 1))
            os.replace(new, path)
            _fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(new)
            raise
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = fd
        self._seq += 1
        self._prev = _sha256(mark)
        self._known_size = len(mark) + 1

    def _read_tail(self, size: int) -> tuple[int, str]:
        """(seq, sha256) of the file's last line; (0, zeros) for an empty file."""
        if size == 0:
            return 0, ZERO_HASH
        start = max(0, size - MAX_LINE_BYTES - 1)
        tail = os.pread(self._fd, size - start, start)
        if not tail.endswith(b"\n"):
            raise AuditError(
                f"audit log {self.path}: the last line is incomplete (a torn write?);"
                " move the log aside after `audit verify` to start a new one"
            )
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut < 0 and start > 0:
            raise AuditError(f"audit log {self.path}: the last line is too long to chain onto")
        line = tail[cut + 1 : -1]
        try:
            seq = json.loads(line)["seq"]
        except (ValueError, TypeError, KeyError):
            seq = None
        if type(seq) is not int or seq < 1:
            raise AuditError(f"audit log {self.path}: the last line is not an audit record")
        return seq, _sha256(line)

    def close(self) -> None:
        """Fsync any batched appends and close the file. Idempotent."""
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            try:
                if self._unsynced:
                    os.fsync(fd)
                    self._unsynced = 0
            finally:
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _rotated(path: Path, k: int) -> Path:
    return path.with_name(f"{path.name}.{k}")


def _shift_rotated(path: Path, keep: int) -> None:
    """``<name>.k`` -> ``<name>.k+1`` from the oldest kept down; the oldest is deleted."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_rotated(path, keep))
    for k in range(keep - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(_rotated(path, k), _rotated(path, k + 1))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`: ``records`` intact lines before ``line`` (the first bad
    one, from 1), or all of them when ``ok``."""

    ok: bool
    records: int
    line: int | None
    reason: str


def verify(path: Path) -> VerifyResult:
    """Check every line of the audit log at ``path``; stop at the first bad one.

    Detects an edited line (its ``hash``, its canonical form, or the next line's ``prev``),
    a deleted or reordered line (``seq`` and ``prev``), a truncated last line (no newline),
    a line that is not JSON (or nested too deeply to check), and a broken ``seq``.

    Raises: OSError when the file cannot be read, is a symbolic link (never followed, as
    :class:`AuditLog` never follows one) or is not a regular file.
    """
    prev = ZERO_HASH
    n = 0
    before = 0  # records in the files rotated away before this one
    note = ""
    with os.fdopen(open_log(path), "rb") as f:
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            n += 1
            if n == 1:
                start = _rotation_start(raw)
                if start is not None:
                    before, prev = start
                    link = _check_link(path, prev)
                    if link is not None:
                        return VerifyResult(False, 0, 1, link)
                    note = f" (continuing {_predecessor(path).name} after record {before})"
            bad = _check_line(raw, n + before, prev)
            if bad is not None:
                return VerifyResult(False, n - 1, n, bad)
            prev = _sha256(raw[:-1])
    return VerifyResult(True, n, None, f"{n} records, hash chain intact{note}")


def _rotation_start(raw: bytes) -> tuple[int, str] | None:
    """(records before, their last line's hash) when ``raw`` is a rotation record whose
    fields are well-formed; None otherwise (then it is checked as a first line)."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("op") != ROTATED_OP:
        return None
    seq, prev = obj.get("seq"), obj.get("prev")
    if type(seq) is not int or seq < 2 or not isinstance(prev, str):
        return None
    return seq - 1, prev


def _predecessor(path: Path) -> Path:
    """The file rotated away just before ``path``: ``<name>.1`` for the log itself,
    ``<name>.k+1`` for ``<name>.k``."""
    stem, dot, k = path.name.rpartition(".")
    if dot and k.isdigit() and stem:
        return path.with_name(f"{stem}.{int(k) + 1}")
    return _rotated(path, 1)


def _check_link(path: Path, prev: str) -> str | None:
    """Whether the file before ``path``, when kept, ends with the line ``prev`` names."""
    older = _predecessor(path)
    try:
        fd = open_log(older)
    except FileNotFoundError:
        return None  # rotated away for good: the chain is checked from here
    with os.fdopen(fd, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - MAX_LINE_BYTES - 1)
        f.seek(start)
        tail = f.read()
    cut = tail.rfind(b"\n", 0, len(tail) - 1)
    last = tail[cut + 1 :]
    if not last.endswith(b"\n") or _sha256(last[:-1]) != prev:
        return f"the rotation record's prev is not the last line of {older.name}"
    return None


def open_log(path: Path) -> int:
    """A read-only descriptor on the regular file at ``path``, the link itself not followed.

    Raises: OSError, with a plain reason for a symbolic link or a non-regular file.
    """
    # O_NOFOLLOW: the same file AuditLog would open, not one a link points at.
    # O_NONBLOCK: a FIFO must not hang `audit verify`; the fstat refuses it next.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as e:
        # ELOOP also means a loop among the directories; only a final link gets this reason.
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise OSError(errno.ELOOP, "a symbolic link (not followed)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError:
        os.close(fd)
        raise
    return fd


def _check_line(raw: bytes, n: int, prev: str) -> str | None:
    if len(raw) > MAX_LINE_BYTES:
        return f"line longer than {MAX_LINE_BYTES} bytes"
    if not raw.endswith(b"\n"):
        return "incomplete last line (no newline): truncated"
    line = raw[:-1]
    if not line:
        return "empty line"
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return "not valid JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    seq, line_prev, digest = obj.get("seq"), obj.get("prev"), obj.get("hash")
    if type(seq) is not int or not isinstance(line_prev, str) or not isinstance(digest, str):
        return "missing seq, prev or hash"
    body = {k: v for k, v in obj.items() if k != "hash"}
    try:
        if canonical(obj) != line:
            return "not in canonical form (edited)"
        body_digest = _sha256(canonical(body))
    except ValueError:
        return "not in canonical form (edited)"
    except RecursionError:  # json.loads took it, but re-encoding it goes deeper
        return "nested too deeply to check (edited)"
    if body_digest != digest:
        return "hash does not match the record (edited)"
    if seq != n:
        return f"seq is {seq}, expected {n} (a line was deleted, inserted or moved)"
    if line_prev != prev:
        return "prev does not match the previous line (a line was edited, deleted or moved)"
    return None


__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_MAX_BYTES",
    "MAX_LINE_BYTES",
    "ROTATED_OP",
    "ZERO_HASH",
    "AuditError",
    "AuditLog",
    "VerifyResult",
    "canonical",
    "open_log",
    "seal",
    "summarize",
    "verify",
]
