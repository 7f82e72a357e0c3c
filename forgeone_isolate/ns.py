"""Namespaces: the child's unshare, and the parent's user-namespace id maps.

Child half: :func:`flags_for`, the mask the keeper (``_sys/_keeper.c``) unshares in one
call. Parent half: :func:`parent_write_id_maps`, which writes ``setgroups`` = deny, then
``uid_map`` and ``gid_map`` of the child (only a process with CAP_SETUID/CAP_SETGID in the
parent namespace may map arbitrary host ids).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from forgeone_isolate._sys.libc import NAMESPACE_FLAGS

#: the names /proc/<pid>/ns/ uses for each namespace we unshare
PROC_NS_NAMES = {
    "user": "user",
    "mnt": "mnt",
    "pid": "pid_for_children",
    "net": "net",
    "ipc": "ipc",
    "uts": "uts",
    "cgroup": "cgroup",
}


def flags_for(names: Iterable[str]) -> int:
    """The CLONE_NEW* mask for namespace names. Raises: KeyError on an unknown name."""
    mask = 0
    for name in names:
        mask |= NAMESPACE_FLAGS[name]
    return mask


def parent_write_id_maps(pid: int, host_uid: int, host_gid: int) -> None:
    """Parent: map uid/gid 0 inside the child's user namespace to one host uid/gid.

    Raises: OSError.
    """
    base = f"/proc/{pid}"
    _write(f"{base}/setgroups", "deny")
    _write(f"{base}/uid_map", f"0 {host_uid} 1\n")
    _write(f"{base}/gid_map", f"0 {host_gid} 1\n")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
