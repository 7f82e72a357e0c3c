"""Opening a file strictly beneath a directory, for the broker (parent side).

openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_XDEV resolves the path in the kernel, in one step, against a descriptor of the
granted root: no ``..`` above it, no symlink anywhere on the path (so one swapped in during
the call cannot redirect it), no /proc magic links, no other mount. The result must be a
regular file; it is opened O_NONBLOCK so a FIFO planted in the root cannot block the broker.
No policy here: the caller says which root and which mode.
"""

from __future__ import annotations

import enum
import os
import stat

from forgeone_isolate._sys import libc

RESOLVE = (
    libc.RESOLVE_BENEATH
    | libc.RESOLVE_NO_SYMLINKS
    | libc.RESOLVE_NO_MAGICLINKS
    | libc.RESOLVE_NO_XDEV
)
CREATE_MODE = 0o640


class Mode(enum.IntEnum):
    """ABI v1 ``fs_open`` flags."""

    READ = 0
    WRITE = 1  # an existing file, for writing (no truncation)
    CREATE = 2  # create (or truncate) for writing


#: Write handles are O_DSYNC: each fd_write reaches the disk before it returns, submitted
#: by the plugin's own process, so the io_bps limit of its cgroup paces it on every host
#: (cgroup v1 blkio cannot throttle buffered writeback, which the kernel's flusher threads
#: do outside the plugin's cgroup), and a plugin's write is durable when it is told so.
_FLAGS = {
    Mode.READ: os.O_RDONLY,
    Mode.WRITE: os.O_WRONLY | os.O_DSYNC,
    Mode.CREATE: os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DSYNC,
}


def open_beneath(root: str, relative: str, mode: Mode) -> int:
    """Open ``relative`` beneath the directory ``root``; return a descriptor (O_CLOEXEC).

    Raises: OSError (ELOOP for a symlink, EXDEV for an escape or another mount, EISDIR or
    EINVAL for something that is not a regular file, ENOENT, EACCES ...).
    """
    if not relative or relative.startswith("/") or "\x00" in relative:
        raise OSError(22, "relative path required")
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        flags = _FLAGS[mode] | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK | os.O_NOFOLLOW
        fd = libc.openat2(
            dirfd, relative, flags, CREATE_MODE if mode is Mode.CREATE else 0, RESOLVE
        )
    finally:
        os.close(dirfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(21 if stat.S_ISDIR(st.st_mode) else 22, "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
