"""What the parent sees of a running child, read from /proc (never the child's word).

Also the seccomp kill witness: the kernel's audit record (type 1326) in /dev/kmsg names the
syscall that killed a process.
"""

from __future__ import annotations

import contextlib
import os
import re
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


def observe(pid: int) -> dict[str, Any]:
    """The ``isolation`` block of the launch report, read from /proc/<pid>."""
    status = proc_status(pid)
    cap_eff = status.get("CapEff", "")
    nss = namespaces(pid)
    return {
        "pid": pid,
        "namespaces": {k: v["unshared"] for k, v in nss.items()},
        "namespace_inodes": {k: v["child"] for k, v in nss.items()},
        "seccomp": int(status.get("Seccomp", "-1") or -1),
        "no_new_privs": int(status.get("NoNewPrivs", "-1") or -1),
        "cap_eff": cap_eff,
        "cap_prm": status.get("CapPrm", ""),
        "cap_inh": status.get("CapInh", ""),
        "cap_bnd": status.get("CapBnd", ""),
        "cap_amb": status.get("CapAmb", ""),
        "uid": status.get("Uid", ""),
        "gid": status.get("Gid", ""),
        "groups": status.get("Groups", ""),
        "uid_map": (_read(f"/proc/{pid}/uid_map") or "").split(),
        "gid_map": (_read(f"/proc/{pid}/gid_map") or "").split(),
        "cgroup": (_read(f"/proc/{pid}/cgroup") or "").split(),
        "interfaces": interfaces(pid),
        "mounts": mounts(pid),
    }


_AUDIT_RE = re.compile(r"type=1326 .*? pid=(\d+) .*? syscall=(\d+)")


class SeccompWitness:
    """Reads the kernel's seccomp audit records written after it was opened."""

    def __init__(self) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            self.close()

    def syscall_for(self, pid: int, wait_s: float = 0.5) -> str | None:
        """The name of the syscall that killed ``pid``, if the kernel logged it.

        kauditd writes the record asynchronously, so this polls for up to ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        while True:
            found = self._scan(pid)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(0.01)

    def _scan(self, pid: int) -> str | None:
        if self._fd is None:
            return None
        found: str | None = None
        while True:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == 32:  # EPIPE: records overwritten; keep reading
                    continue
                break
            if not record:
                break
            m = _AUDIT_RE.search(record.decode("utf-8", "replace"))
            if m and int(m.group(1)) == pid:
                found = seccomp_filter.syscall_name(int(m.group(2)))
        return found

    def close(self) -> None:
        """Release /dev/kmsg."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
