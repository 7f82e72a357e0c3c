"""Thin ctypes bindings for the syscalls Python's os module lacks (Python 3.11).

Each binding declares its argument types and goes through :func:`_check`, which raises
``OSError(errno)``. Constants cite their kernel header. Nothing here decides anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import socket
import struct
from typing import Final

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# <linux/sched.h>
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWCGROUP: Final = 0x02000000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

NAMESPACE_FLAGS: Final = {
    "user": CLONE_NEWUSER,
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "cgroup": CLONE_NEWCGROUP,
}

# <linux/mount.h>
MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_REMOUNT: Final = 32
MS_BIND: Final = 4096
MS_REC: Final = 16384
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 2

# <linux/prctl.h>
PR_SET_SECUREBITS: Final = 28
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4

# <linux/capability.h>
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522

# <asm/unistd_64.h> (x86_64)
SYS_pivot_root: Final = 155
SYS_capset: Final = 126
SYS_close_range: Final = 436
SYS_openat2: Final = 437

# <linux/openat2.h>
RESOLVE_NO_XDEV: Final = 0x01
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08

# <linux/sockios.h>, <linux/if.h>
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1

_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.sethostname.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(_libc.unshare(flags), "unshare")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    """mount(2)."""
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            data.encode() if data is not None else None,
        ),
        f"mount {target}",
    )


def umount2(target: str, flags: int) -> None:
    """umount2(2)."""
    _check(_libc.umount2(target.encode(), flags), f"umount2 {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (no glibc wrapper)."""
    _check(
        _libc.syscall(
            SYS_pivot_root, ctypes.c_char_p(new_root.encode()), ctypes.c_char_p(put_old.encode())
        ),
        "pivot_root",
    )


def sethostname(name: str) -> None:
    """sethostname(2)."""
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def close_range(first: int, last: int = 0xFFFFFFFF) -> None:
    """close_range(2), flags 0."""
    _check(
        _libc.syscall(SYS_close_range, ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(0)),
        "close_range",
    )


def clear_ambient_caps() -> None:
    """prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)."""
    _check(
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL"
    )


def set_securebits(bits: int) -> None:
    """prctl(PR_SET_SECUREBITS) with every bit, ambient-raise ones included."""
    _check(_libc.prctl(PR_SET_SECUREBITS, bits, 0, 0, 0), "PR_SET_SECUREBITS")


class CapHeader(ctypes.Structure):
    """struct __user_cap_header_struct (<linux/capability.h>)."""

    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    """struct __user_cap_data_struct: one 32-bit word of each set (version 3 uses two)."""

    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capset_clear() -> None:
    """capset(2): effective, permitted and inheritable all empty (all 64 bits)."""
    header = CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    _check(_libc.syscall(SYS_capset, ctypes.byref(header), ctypes.byref(data)), "capset")


def set_interface_up(name: str) -> None:
    """SIOCSIFFLAGS |= IFF_UP on ``name`` (used for ``lo`` in a new net namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | IFF_UP))


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """openat2(2); returns the new descriptor."""
    how = _OpenHow(flags, mode, resolve)
    return _check(
        int(
            _libc.syscall(
                ctypes.c_long(SYS_openat2),
                ctypes.c_int(dirfd),
                ctypes.c_char_p(path.encode()),
                ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )
        ),
        "openat2",
    )


# <malloc.h>
M_ARENA_MAX: Final = -8


def set_malloc_arena_max(n: int) -> bool:
    """mallopt(M_ARENA_MAX, n); True when glibc accepted it."""
    try:
        mallopt = _libc.mallopt
    except AttributeError:  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, n))


def raw_syscall(number: int, *args: int) -> int:
    """syscall(2) with integer arguments; returns -errno instead of raising (for tests)."""
    result = int(_libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)))
    return -ctypes.get_errno() if result < 0 else result


def task_count() -> int:
    """How many threads the kernel counts in this process (native ones included); 0 when
    unknown (no /proc), which callers treat as "not single-threaded"."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


# fork(2) through glibc, holding the GIL (PyDLL does not release it around the call).
_pylibc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_pylibc.fork.argtypes = []
_pylibc.fork.restype = ctypes.c_int


def fork_lean() -> int:
    """fork(2) without CPython's after-fork work; 0 in the child, its pid in the parent.

    ``os.fork`` runs the interpreter's after-fork hooks in the child (thread states,
    ``threading``'s bookkeeping, ``random``'s reseed, the logging locks): Python code that
    writes to hundreds of inherited pages, each a copy-on-write fault, about 0.6 ms and
    ~0.3 MiB of private memory per fork here. Only for a single-threaded caller (the fork
    server, forking plugin hosts): with one thread there is no lock another thread could
    hold, and the GIL, held across the call, stays with the one thread the child has.
    ``random``'s state is not reseeded: nothing here draws secrets from it.

    Raises: OSError (EAGAIN, ENOMEM) when the kernel refuses the fork.
    """
    return _check(_pylibc.fork(), "fork")
