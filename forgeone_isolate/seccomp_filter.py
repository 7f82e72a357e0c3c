"""The seccomp filter: an allow-list compiled with libseccomp (pyseccomp).

Default action: kill the whole process. Architecture: native only, any other architecture
(i386 via int 0x80, x32) hits the bad-architecture action, also kill. ``read``/``write``
(and their socket forms, and ``close``) are limited to descriptors ``min_fd``..``max_fd``:
0-2 point at /dev/null and are never the child's to use; everything above is the broker
socket, the setup channel or a descriptor the broker passed (RLIMIT_NOFILE caps them). Built in the
child before capabilities are gone (building allocates and reads nothing from disk), loaded
last of all the sandbox steps: after it, even a bug in our own code cannot widen anything.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import pyseccomp

#: syscalls whose first argument is a file descriptor that must be in the allowed set
FD_GUARDED = frozenset({"read", "write", "sendto", "recvfrom", "sendmsg", "recvmsg", "close"})


def build_filter(allow: Iterable[str], min_fd: int, max_fd: int) -> Any:
    """A loadable pyseccomp filter allowing ``allow``; fd-taking calls only on the fds
    ``min_fd``..``max_fd``.

    Each allowed fd is its own EQ rule: seccomp compares all 64 bits of an argument while
    the kernel reads an fd from the low 32, so a range test (GE) would let
    ``write((1 << 32) | 1, ...)`` through to fd 1.

    Raises: ValueError for a syscall name libseccomp does not know.
    """
    f = pyseccomp.SyscallFilter(defaction=pyseccomp.KILL_PROCESS)
    f.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for name in sorted(set(allow)):
        try:
            number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
        except Exception:
            raise ValueError(f"unknown syscall {name!r}") from None
        if number < 0:
            raise ValueError(f"unknown syscall {name!r}")
        if name in FD_GUARDED:
            for fd in range(min_fd, max_fd + 1):
                f.add_rule(pyseccomp.ALLOW, name, pyseccomp.Arg(0, pyseccomp.EQ, fd))
        else:
            f.add_rule(pyseccomp.ALLOW, name)
    return f


@functools.lru_cache(maxsize=8)
def filter_for(allow: tuple[str, ...], min_fd: int, max_fd: int) -> Any:
    """:func:`build_filter`, built once per allow-list and kept: the parent builds it before
    the fork, and every child loads its own copy of the same (unconsumed) program."""
    return build_filter(allow, min_fd, max_fd)


def syscall_name(number: int) -> str:
    """The native-architecture name of syscall ``number``, or ``syscall <n>``."""
    try:
        name = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number)
    except Exception:
        return f"syscall {number}"
    if isinstance(name, bytes):
        return name.decode()
    return str(name) if name else f"syscall {number}"


def describe(allow: Iterable[str], min_fd: int, max_fd: int) -> dict[str, Any]:
    """A plan-friendly description of a filter."""
    return {
        "default": "kill_process",
        "bad_arch": "kill_process",
        "allow": sorted(set(allow)),
        "fd_guarded": sorted(FD_GUARDED & set(allow)),
        "fd_guard": f"first argument (all 64 bits) one of {min_fd}..{max_fd}",
    }
