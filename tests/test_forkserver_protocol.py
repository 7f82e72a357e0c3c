"""The service's side of the fork server protocol, against a scripted server: a late
reply is never taken for the next request's, and a released pidfd is never replaced by
the bare pid."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import threading

import pytest

from forgeone_isolate.forkserver import ForkServer, ForkServerError, Spawned


def _reply(sock: socket.socket, obj: dict[str, object], fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([json.dumps(obj).encode()], anc)


def test_a_late_spawn_reply_is_dropped_and_its_channel_closed() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    events, events_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    late_host_end, late_service_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    next_host_end, next_service_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    first_seen = threading.Event()
    answer_first = threading.Event()
    seen: list[dict[str, object]] = []

    def server() -> None:
        first = json.loads(theirs.recv(65536))
        seen.append(first)
        first_seen.set()
        answer_first.wait(10)
        second = json.loads(theirs.recv(65536))
        seen.append(second)
        # the first request's answer, late, then the second's
        _reply(theirs, {"ok": True, "pid": 1111, "id": first["id"]}, [late_service_end.fileno()])
        _reply(theirs, {"ok": True, "pid": 2222, "id": second["id"]}, [next_service_end.fileno()])

    t = threading.Thread(target=server, daemon=True)
    t.start()
    fs = ForkServer(0, ours, events)
    with pytest.raises(ForkServerError, match="does not answer"):
        fs.spawn({"name": "slow"}, timeout=0.3)
    assert first_seen.is_set()
    answer_first.set()
    spawned = fs.spawn({"name": "next"}, timeout=10)
    t.join(10)
    assert spawned.pid == 2222
    assert [r["spec"] for r in seen] == [{"name": "slow"}, {"name": "next"}]
    assert seen[0]["id"] != seen[1]["id"]
    # the late host's channel was closed by the service: its end reads EOF
    late_service_end.close()
    late_host_end.settimeout(5)
    assert late_host_end.recv(16) == b""
    # the one taken is the second host's
    next_service_end.close()
    spawned.channel.send(b"hello")
    next_host_end.settimeout(5)
    assert next_host_end.recv(16) == b"hello"
    spawned.close()
    for s in (ours, theirs, events, events_peer, late_host_end, next_host_end):
        s.close()


def test_a_released_pidfd_is_not_replaced_by_the_pid() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        a, b = socket.socketpair()
        spawned = Spawned(proc.pid, a, os.pidfd_open(proc.pid))
        assert spawned.signal(0) is True
        spawned.close_pidfd()
        # (the host was reaped, say): its pid may be another process's by now
        assert spawned.signal(signal.SIGKILL) is False
        assert proc.poll() is None  # not signalled by pid
        spawned.close()
        b.close()
    finally:
        proc.kill()
        proc.wait()
