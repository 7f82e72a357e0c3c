"""The seccomp witness: reading the kernel's audit records of seccomp kills (no root for
these; the real records are read by the death tests, as root)."""

from __future__ import annotations

import socket
import struct
import sys
import time
from typing import Any

from forgeone_isolate import service
from forgeone_isolate.observe import AUDIT_SECCOMP, MAX_WITNESSED, SeccompWitness


def audit_message(pid: int, syscall: int, kind: int = AUDIT_SECCOMP) -> bytes:
    """One netlink message as kauditd multicasts it (header + the record's text)."""
    text = (
        f"audit(1795625632.434:581): auid=4294967295 uid=1500000000 gid=1500000000 "
        f'ses=4294967295 pid={pid} comm="python" exe="/usr/bin/python3" sig=31 '
        f"arch=c000003e syscall={syscall} compat=0 ip=0x7fc60af16090 code=0x80000000"
    ).encode()
    order = "<" if sys.byteorder == "little" else ">"
    header = struct.pack(f"{order}IHHII", 16 + len(text), kind, 0, 0, 0)
    return header + text + b"\0" * (-len(text) % 4)


def fed_witness() -> tuple[SeccompWitness, socket.socket]:
    """A witness whose "netlink" socket is one end of a datagram pair we write to."""
    w = SeccompWitness(listen=False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.setblocking(False)
    w._nl = theirs
    return w, ours


def test_a_witness_that_does_not_listen_opens_nothing_and_answers_at_once() -> None:
    w = SeccompWitness(listen=False)
    assert w.fds() == []
    started = time.monotonic()
    assert w.syscall_for(1234) is None
    assert time.monotonic() - started < 0.1  # (no polling for records that cannot come)


def test_kills_are_remembered_by_pid_and_other_records_ignored() -> None:
    w, feed = fed_witness()
    with feed:
        before = time.monotonic()
        feed.send(audit_message(4242, 59) + audit_message(7, 2, kind=1300))  # and a SYSCALL
        feed.send(audit_message(4343, 41))
        assert w.fds()  # readable when records wait: the service polls it
        w.collect()
        assert w.syscall_for(4242, wait_s=0) == "execve"
        assert w.syscall_for(4343, wait_s=0) == "socket"
        assert w.syscall_for(7, wait_s=0) is None  # not a seccomp record
        # a record read before the process in question started is not its own
        assert w.syscall_for(4242, wait_s=0, since=time.monotonic() + 1) is None
        assert w.syscall_for(4242, wait_s=0, since=before) == "execve"
    w.close()


def test_the_witness_remembers_a_bounded_number_of_kills() -> None:
    w, feed = fed_witness()
    with feed:
        for pid in range(1, MAX_WITNESSED + 11):
            feed.send(audit_message(pid, 0))
            if pid % 100 == 0:
                w.collect()
        w.collect()
        assert len(w._seen) == MAX_WITNESSED
        assert w.syscall_for(1, wait_s=0) is None  # the oldest went first
        assert w.syscall_for(MAX_WITNESSED + 10, wait_s=0) == "read"
    w.close()


class _Witness:
    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.asked: list[tuple[int, float]] = []

    def syscall_for(self, pid: int, wait_s: float = 0.5, since: float = 0.0) -> str | None:
        self.asked.append((pid, since))
        return self.names.get(pid)


def test_the_service_names_the_syscall_its_hosts_could_not() -> None:
    w: Any = _Witness({77: "ptrace"})
    killed = {"ev": "exit", "status": "killed", "reason": service.UNNAMED_SECCOMP_KILL}
    assert service.name_seccomp_kill(killed, 77, w, 5.0)["reason"] == "seccomp: ptrace"
    assert w.asked == [(77, 5.0)]
    # not logged (yet): the host's words stay; other exits are left alone, unasked (the
    # status a host reports is its own reaping of PID 1: the kernel's)
    assert service.name_seccomp_kill(killed, 78, w, 5.0) == killed
    other = {"ev": "exit", "status": "killed", "reason": "timeout"}
    assert service.name_seccomp_kill(other, 77, w, 5.0) == other
    assert service.name_seccomp_kill(killed, None, w, 5.0) == killed
    assert service.name_seccomp_kill(killed, 77, None, 5.0) == killed
    assert len(w.asked) == 2
