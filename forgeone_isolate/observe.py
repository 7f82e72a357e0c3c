"""What the parent sees of a running child, read from /proc (never the child's word).

Also the seccomp kill witness: the kernel's audit record (type 1326) in /dev/kmsg names the
syscall that killed a process.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import re
import socket
import sys
import time
from typing import Any

from forgeone_isolate import seccomp_filter
from forgeone_isolate.ns import PROC_NS_NAMES

_STATUS_KEYS = (
    "Uid",
    "Gid",
    "Groups",
    "NoNewPrivs",
    "Seccomp",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NSpid",
)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def proc_status(pid: int) -> dict[str, str]:
    """Selected fields of /proc/<pid>/status."""
    out: dict[str, str] = {}
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_KEYS:
            out[key] = value.strip()
    return out


def namespaces(pid: int) -> dict[str, dict[str, Any]]:
    """For each namespace: the child's inode, ours, and whether they differ."""
    out: dict[str, dict[str, Any]] = {}
    for name, proc_name in PROC_NS_NAMES.items():
        proc = "pid" if name == "pid" else proc_name  # the child's own pid ns
        try:
            child = os.readlink(f"/proc/{pid}/ns/{proc}")
            host = os.readlink(f"/proc/self/ns/{proc}")
        except OSError:
            continue
        out[name] = {"child": child, "host": host, "unshared": child != host}
    return out


def interfaces(pid: int) -> list[str]:
    """Network interfaces visible in the child's net namespace."""
    text = _read(f"/proc/{pid}/net/dev") or ""
    return [line.split(":", 1)[0].strip() for line in text.splitlines()[2:] if ":" in line]


def mounts(pid: int) -> list[str]:
    """Mount points in the child's mount namespace (relative to its root)."""
    text = _read(f"/proc/{pid}/mountinfo") or ""
    return [line.split()[4] for line in text.splitlines() if len(line.split()) > 4]


def confinement(pid: int, status: dict[str, str] | None = None) -> dict[str, Any]:
    """Seccomp mode, no_new_privs and the five capability sets of /proc/<pid>/status."""
    status = proc_status(pid) if status is None else status
    return {
        "seccomp": int(status.get("Seccomp", "-1") or -1),
        "no_new_privs": int(status.get("NoNewPrivs", "-1") or -1),
        "cap_eff": status.get("CapEff", ""),
        "cap_prm": status.get("CapPrm", ""),
        "cap_inh": status.get("CapInh", ""),
        "cap_bnd": status.get("CapBnd", ""),
        "cap_amb": status.get("CapAmb", ""),
    }


def observe(pid: int) -> dict[str, Any]:
    """The ``isolation`` block of the launch report, read from /proc/<pid>."""
    status = proc_status(pid)
    nss = namespaces(pid)
    return {
        "pid": pid,
        "namespaces": {k: v["unshared"] for k, v in nss.items()},
        "namespace_inodes": {k: v["child"] for k, v in nss.items()},
        **confinement(pid, status),
        "uid": status.get("Uid", ""),
        "gid": status.get("Gid", ""),
        "groups": status.get("Groups", ""),
        "uid_map": (_read(f"/proc/{pid}/uid_map") or "").split(),
        "gid_map": (_read(f"/proc/{pid}/gid_map") or "").split(),
        "cgroup": (_read(f"/proc/{pid}/cgroup") or "").split(),
        "interfaces": interfaces(pid),
        "mounts": mounts(pid),
    }


_AUDIT_RE = re.compile(r"\bpid=(\d+) .*?\bsyscall=(\d+)")


NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1
AUDIT_SECCOMP = 1326
_NLMSG_HDR = 16


#: the name a kill gets when no witness saw its record
UNKNOWN_SYSCALL = "unknown syscall"

#: seccomp kills a witness remembers (pid -> syscall), the latest ones
MAX_WITNESSED = 4096


class SeccompWitness:
    """Reads the kernel's seccomp audit records (type 1326) written after it was opened,
    and remembers which syscall each killed process made (the latest MAX_WITNESSED).

    First choice: the audit netlink multicast group (read-only log, needs CAP_AUDIT_READ),
    which is not rate-limited the way printk is. Fallback: /dev/kmsg, where the kernel
    prints audit records when no audit daemon listens, at most ten per five seconds for
    the whole machine. Open it before forking the child. ``listen=False`` opens nothing:
    for a plugin host, whose service keeps the one witness (and names the syscall); one
    multicast socket per plugin would take a copy of every audit record each, and fill.
    A long-lived holder polls :meth:`fds` and calls :meth:`collect` when they are ready.
    """

    def __init__(self, listen: bool = True) -> None:
        self._nl: socket.socket | None = None
        self._kmsg: int | None = None
        self._seen: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
        if not listen:
            return
        try:
            nl = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_AUDIT
            )
            nl.bind((0, AUDIT_NLGRP_READLOG))
            nl.setblocking(False)
            self._nl = nl
        except OSError:
            self._nl = None
        try:
            self._kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self._kmsg, 0, os.SEEK_END)
        except OSError:
            self._kmsg = None

    def fds(self) -> list[int]:
        """The descriptors that are readable when records wait."""
        return [
            fd for fd in (self._nl.fileno() if self._nl else None, self._kmsg) if fd is not None
        ]

    def collect(self) -> None:
        """Read every record waiting; remember the seccomp kills among them."""
        now = time.monotonic()
        for pid, name in (*self._read_netlink(), *self._read_kmsg()):
            self._seen[pid] = (name, now)
            self._seen.move_to_end(pid)
        while len(self._seen) > MAX_WITNESSED:
            self._seen.popitem(last=False)

    def syscall_for(self, pid: int, wait_s: float = 0.5, since: float = 0.0) -> str | None:
        """The name of the syscall that killed ``pid``, if the kernel logged it (a record
        read at or after ``since``, monotonic: not one of an earlier process's).

        kauditd delivers records asynchronously, so this polls for up to ``wait_s``.
        """
        if not self.fds() and pid not in self._seen:
            return None  # nothing to read it from
        deadline = time.monotonic() + wait_s
        while True:
            self.collect()
            found = self._seen.get(pid)
            if found is not None and found[1] >= since:
                return found[0]
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def _read_netlink(self) -> list[tuple[int, str]]:
        if self._nl is None:
            return []
        found: list[tuple[int, str]] = []
        while True:
            try:
                data = self._nl.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS: records were dropped; keep what follows
                continue
            off = 0
            while off + _NLMSG_HDR <= len(data):
                length, kind = (
                    int.from_bytes(data[off : off + 4], sys.byteorder),
                    int.from_bytes(data[off + 4 : off + 6], sys.byteorder),
                )
                if length < _NLMSG_HDR:
                    break
                if kind == AUDIT_SECCOMP:
                    parsed = self._parse(data[off + _NLMSG_HDR : off + length])
                    if parsed is not None:
                        found.append(parsed)
                off += (length + 3) & ~3
        return found

    def _read_kmsg(self) -> list[tuple[int, str]]:
        if self._kmsg is None:
            return []
        found: list[tuple[int, str]] = []
        while True:
            try:
                record = os.read(self._kmsg, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records overwritten; keep reading
                    continue
                break
            if not record:
                break
            if b"type=1326" in record:
                parsed = self._parse(record)
                if parsed is not None:
                    found.append(parsed)
        return found

    @staticmethod
    def _parse(record: bytes) -> tuple[int, str] | None:
        """(pid, syscall name) of one seccomp audit record, or None."""
        m = _AUDIT_RE.search(record.decode("utf-8", "replace"))
        if m is None:
            return None
        return int(m.group(1)), seccomp_filter.syscall_name(int(m.group(2)))

    def close(self) -> None:
        """Release the sockets."""
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        if self._kmsg is not None:
            with contextlib.suppress(OSError):
                os.close(self._kmsg)
            self._kmsg = None
