"""The child's step order through the recording kernel seam (no root needed).

``sandbox_sequence`` is run in this process with a :class:`RecordingKernel`: nothing is
mounted, dropped or filtered, but every call is recorded in order. The setup channel is a
real socketpair whose far end the test plays (PLACED and OBSERVED queued up front, FILTERED read
after). ``keeper_main`` forks, so it runs in a child process of the test, which plays the
supervisor on the channel; PID 1's payload sends back its copy of the recording (which
holds the keeper's calls before its fork, then its own) over the broker socket.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import select
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from forgeone_isolate import caps, child, fds, markers, mounts, policy
from forgeone_isolate._sys.libc import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)
from forgeone_isolate.kernel import RecordingKernel
from forgeone_isolate.manifest import Limits, Manifest, Permissions
from forgeone_isolate.plan import SandboxPlan, build_plan
from forgeone_isolate.semver import Version

HOST_UID = 1_500_000_000
DEVNULL_FD = 77  # the kernel is a recording: this number is only ever recorded


def make_plan() -> SandboxPlan:
    manifest = Manifest(
        name="seq",
        version=Version.parse("1.0.0"),
        abi=1,
        entry="plugin.wasm",
        files={"plugin.wasm": "0" * 64},
        permissions=Permissions(),
        limits=Limits(memory_mb=16, timeout_s=5),
    )
    return build_plan(manifest, "f" * 64, HOST_UID, ("start",), policy.Effective())


@dataclass
class Channels:
    """Both ends of the two socketpairs; ``chans`` is the child's view."""

    chans: child.ChildChannels
    ctl_peer: socket.socket
    brk_peer: socket.socket


@pytest.fixture
def channels() -> Iterator[Channels]:
    ctl_peer, ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    brk_peer, brk = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield Channels(child.ChildChannels(ctl, brk, DEVNULL_FD), ctl_peer, brk_peer)
    for s in (ctl_peer, brk_peer, ctl, brk):
        s.close()


class _OsCloseRecorder:
    """Stands in for ``child.os``: records ``close`` (of the fixed control fd, which in
    this process is not ours to close), delegates everything else."""

    def __init__(self) -> None:
        self.closed: list[int] = []

    def close(self, fd: int) -> None:
        self.closed.append(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def run_sequence(
    monkeypatch: pytest.MonkeyPatch,
    k: RecordingKernel,
    ch: Channels,
    plan: SandboxPlan,
    factory: Callable[[], Callable[[], int]] | None = None,
) -> tuple[Callable[[], int], list[int]]:
    """Run sandbox_sequence with the PLACED and OBSERVED replies queued; return the payload and the
    descriptors it closed. The control socket is detached by the sequence: close it here."""
    recorder = _OsCloseRecorder()
    monkeypatch.setattr(child, "os", recorder)

    def payload() -> int:
        return 0

    def default_factory() -> Callable[[], int]:
        k.calls.append(("payload_factory", ()))
        return payload

    markers.send(ch.ctl_peer, markers.PLACED)
    markers.send(ch.ctl_peer, markers.OBSERVED)
    ctl_fd = ch.chans.control.fileno()
    try:
        result = child.sandbox_sequence(k, plan, ch.chans, factory or default_factory)
    finally:
        if ch.chans.control.fileno() == -1:  # detached by the sequence
            os.close(ctl_fd)
    return result, recorder.closed


def test_sandbox_sequence_exact_order(monkeypatch: pytest.MonkeyPatch, channels: Channels) -> None:
    plan = make_plan()
    k = RecordingKernel()
    broker_fd = channels.chans.broker.fileno()
    control_fd = channels.chans.control.fileno()
    payload, closed = run_sequence(monkeypatch, k, channels, plan)

    last = caps.last_cap()
    assert last >= 37  # CAP_CHECKPOINT_RESTORE exists on every supported kernel
    tmpfs_flags = mounts.ROOT_FLAGS
    as_limit = next(c for c in k.calls if c[0] == "setrlimit" and c[1][0] == resource.RLIMIT_AS)
    expected: list[tuple[str, tuple[Any, ...]]] = [
        ("set_pdeathsig", ("SIGKILL",)),
        # mounts: private, tmpfs, pivot, detach the old root, read-only
        ("mount", (None, "/", None, MS_REC | MS_PRIVATE, None)),
        ("mount", ("forgeone", "/tmp", "tmpfs", tmpfs_flags, "size=16k,nr_inodes=4,mode=0555")),
        ("chdir", ("/tmp",)),
        ("pivot_root", (".", ".")),
        ("umount2", (".", MNT_DETACH)),
        ("chdir", ("/",)),
        ("mount", (None, "/", None, MS_REMOUNT | MS_RDONLY | tmpfs_flags, None)),
        ("sethostname", ("forgeone",)),
        ("set_interface_up", ("lo",)),
        # fds: channels parked high, then to 3 and 4, stdio to /dev/null, the rest closed
        ("dup2", (broker_fd, 100 + fds.BROKER_FD)),
        ("dup2", (control_fd, 100 + fds.CONTROL_FD)),
        ("dup2", (100 + fds.BROKER_FD, fds.BROKER_FD)),
        ("dup2", (100 + fds.CONTROL_FD, fds.CONTROL_FD)),
        ("dup2", (DEVNULL_FD, 0)),
        ("dup2", (DEVNULL_FD, 1)),
        ("dup2", (DEVNULL_FD, 2)),
        ("close_range", (fds.CONTROL_FD + 1,)),
        # the payload is prepared (with its channels in place) before any door closes
        ("payload_factory", ()),
        # READY -> PLACED: now in its cgroup, PID 1 roots a cgroup namespace there
        ("unshare", (CLONE_NEWCGROUP,)),
        # rlimits from the plan, then the address space last
        ("setrlimit", (resource.RLIMIT_CORE, 0, 0)),
        ("setrlimit", (resource.RLIMIT_NOFILE, 16, 16)),
        ("setrlimit", (resource.RLIMIT_MEMLOCK, 0, 0)),
        ("setrlimit", (resource.RLIMIT_MSGQUEUE, 0, 0)),
        ("setrlimit", (resource.RLIMIT_CPU, plan.timeout_s + 1, plan.timeout_s + 2)),
        as_limit,
        # capabilities: securebits locked, bounding set cap by cap, ambient, the rest
        ("set_securebits", (caps.SECUREBITS_LOCKED,)),
        *[("capbset_drop", (cap,)) for cap in range(last + 1)],
        ("clear_ambient_caps", ()),
        ("capset_clear", ()),
        ("set_no_new_privs", ()),
        ("load_seccomp", ()),
    ]
    assert k.calls == expected
    assert k.names()[-1] == "load_seccomp"

    # The address-space limit covers the current size, the headroom and the guest memory.
    _, soft, hard = as_limit[1]
    assert soft == hard
    assert soft > plan.as_headroom + plan.memory_bytes

    # READY went out before confinement, FILTERED only after the filter; the payload has
    # not run yet.
    ready = markers.recv(channels.ctl_peer)
    assert ready == {"m": markers.READY}
    filtered = markers.recv(channels.ctl_peer)
    assert filtered is not None
    assert filtered["m"] == markers.FILTERED
    # it carries PID 1's own timing of each step, for the launch report and the benchmark
    assert {"mounts", "capabilities", "seccomp"} <= set(filtered["steps"])
    assert closed == [fds.CONTROL_FD]
    assert payload() == 0


def test_securebits_lock_every_bit_the_kernel_checks() -> None:
    bits = caps.SECUREBITS_LOCKED
    for flag in (
        caps.SECBIT_NOROOT,
        caps.SECBIT_NOROOT_LOCKED,
        caps.SECBIT_NO_SETUID_FIXUP,
        caps.SECBIT_NO_SETUID_FIXUP_LOCKED,
        caps.SECBIT_KEEP_CAPS_LOCKED,
        caps.SECBIT_NO_CAP_AMBIENT_RAISE,
        caps.SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED,
    ):
        assert bits & flag


#: each kernel call of the sequence, and the step a failure in it must be reported as
STEP_OF_CALL = [
    ("set_pdeathsig", "pdeathsig"),
    ("mount", "mounts"),
    ("chdir", "mounts"),
    ("pivot_root", "mounts"),
    ("umount2", "mounts"),
    ("sethostname", "hostname"),
    ("set_interface_up", "network"),
    ("dup2", "fds"),
    ("close_range", "fds"),
    ("setrlimit", "rlimits"),
    ("set_securebits", "capabilities"),
    ("capbset_drop", "capabilities"),
    ("clear_ambient_caps", "capabilities"),
    ("capset_clear", "capabilities"),
    ("set_no_new_privs", "no_new_privs"),
    ("load_seccomp", "seccomp"),
]


@pytest.mark.parametrize(("call", "step"), STEP_OF_CALL)
def test_a_failing_call_names_its_step_and_stops(
    monkeypatch: pytest.MonkeyPatch, channels: Channels, call: str, step: str
) -> None:
    k = RecordingKernel(fail={call: errno.EPERM})
    with pytest.raises(child.StepFailed) as info:
        run_sequence(monkeypatch, k, channels, make_plan())
    assert info.value.step == step
    assert info.value.errno == errno.EPERM
    assert os.strerror(errno.EPERM) in info.value.message
    # Nothing after the failing call ran, and the plugin never said FILTERED (only READY,
    # for steps that come after the placement).
    assert k.names()[-1] == call
    assert k.names().count(call) == 1
    channels.ctl_peer.setblocking(False)
    said = []
    while True:
        try:
            said.append(json.loads(channels.ctl_peer.recv(markers.MAX_MESSAGE))["m"])
        except BlockingIOError:
            break
    assert markers.FILTERED not in said
    assert said in ([], [markers.READY])


def test_pivot_root_eperm_is_a_mounts_failure(
    monkeypatch: pytest.MonkeyPatch, channels: Channels
) -> None:
    k = RecordingKernel(fail={"pivot_root": errno.EPERM})
    with pytest.raises(child.StepFailed) as info:
        run_sequence(monkeypatch, k, channels, make_plan())
    assert (info.value.step, info.value.errno) == ("mounts", errno.EPERM)
    assert str(info.value).startswith("mounts: ")
    assert "capbset_drop" not in k.names()
    assert "load_seccomp" not in k.names()


def test_a_failing_payload_factory_is_the_prepare_step(
    monkeypatch: pytest.MonkeyPatch, channels: Channels
) -> None:
    def factory() -> Callable[[], int]:
        raise OSError(errno.ENOMEM, "no memory for the engine")

    k = RecordingKernel()
    with pytest.raises(child.StepFailed) as info:
        run_sequence(monkeypatch, k, channels, make_plan(), factory)
    assert (info.value.step, info.value.errno) == ("prepare", errno.ENOMEM)
    assert k.names()[-1] == "close_range"


def test_an_unknown_syscall_in_the_allow_list_is_the_prepare_step(
    monkeypatch: pytest.MonkeyPatch, channels: Channels
) -> None:
    from dataclasses import replace

    plan = replace(make_plan(), seccomp_allow=("read", "no_such_syscall"))
    k = RecordingKernel()
    with pytest.raises(child.StepFailed) as info:
        run_sequence(monkeypatch, k, channels, plan)
    assert info.value.step == "prepare"
    assert info.value.errno == errno.EINVAL
    assert "no_such_syscall" in info.value.message
    assert "load_seccomp" not in k.names()


@pytest.mark.parametrize("placed", [False, True])
def test_no_placed_or_observed_reply_means_no_payload(channels: Channels, placed: bool) -> None:
    """Without the parent's PLACED, or then its OBSERVED, the plugin exits with
    EXIT_PROTOCOL and its payload never runs."""
    if placed:
        markers.send(channels.ctl_peer, markers.PLACED)
    markers.send(channels.ctl_peer, markers.MAPPED)  # anything but the expected reply
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            child.sandbox_sequence(RecordingKernel(), make_plan(), channels.chans, lambda: _boom)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == markers.EXIT_PROTOCOL


def _boom() -> int:  # pragma: no cover - must never run
    os._exit(98)


# ----------------------------------------------------------------- keeper_main, end to end


def _recv_within(sock: socket.socket, timeout: float = 10.0) -> dict[str, Any] | None:
    """One marker, or None at EOF; fails the test if nothing comes within ``timeout``."""
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, f"no marker within {timeout} s"
    return markers.recv(sock)


def _run_keeper(k: RecordingKernel) -> tuple[list[dict[str, Any]], list[list[Any]] | None, int]:
    """Fork a keeper running on ``k``; play the supervisor. Returns the markers received,
    the recording PID 1's payload sent back, and the keeper's wait status."""
    ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    brk_parent, brk_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    devnull = os.open(os.devnull, os.O_RDWR)
    plan = make_plan()

    def factory() -> Callable[[], int]:
        def payload() -> int:
            os.write(fds.BROKER_FD, json.dumps(k.calls).encode())
            return 0

        return payload

    keeper = os.fork()
    if keeper == 0:  # pragma: no cover - child
        try:
            ctl_parent.close()
            brk_parent.close()
            # PID 1 (a real fork) closes the real fd 4 after FILTERED and writes to fd 3:
            # make those the channels, since the recording kernel moves nothing.
            brk_high = fcntl.fcntl(brk_child.fileno(), fcntl.F_DUPFD, 10)
            ctl_high = fcntl.fcntl(ctl_child.fileno(), fcntl.F_DUPFD, 10)
            os.dup2(brk_high, fds.BROKER_FD)
            os.dup2(ctl_high, fds.CONTROL_FD)
            chans = child.ChildChannels(
                socket.socket(fileno=os.dup(fds.CONTROL_FD)), brk_child, devnull
            )
            child.keeper_main(plan, chans, os.getppid(), factory, kernel=k)
        finally:
            os._exit(99)
    ctl_child.close()
    brk_child.close()
    os.close(devnull)
    got: list[dict[str, Any]] = []
    recording: list[list[Any]] | None = None
    finished = False
    try:
        while True:
            msg = _recv_within(ctl_parent)
            if msg is None:
                break
            got.append(msg)
            if msg["m"] == markers.UNSHARED:
                markers.send(ctl_parent, markers.MAPPED)
            elif msg["m"] == markers.READY:
                markers.send(ctl_parent, markers.PLACED)
            elif msg["m"] == markers.FILTERED:
                markers.send(ctl_parent, markers.OBSERVED)
            elif msg["m"] in (markers.EXITED, markers.STEP_FAILED):
                break
        if select.select([brk_parent], [], [], 0.5)[0]:
            data = brk_parent.recv(1 << 20)
            recording = json.loads(data) if data else None
        finished = True
    finally:
        if not finished:
            os.kill(keeper, signal.SIGKILL)
        _, status = os.waitpid(keeper, 0)
        ctl_parent.close()
        brk_parent.close()
    return got, recording, status


def test_keeper_then_pid1_order() -> None:
    k = RecordingKernel()
    got, recording, status = _run_keeper(k)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    kinds = [m["m"] for m in got]
    assert kinds[0] == markers.UNSHARED
    # PID1 (from the keeper) may come anywhere before FILTERED; READY precedes FILTERED
    assert sorted(kinds[1:4]) == sorted([markers.PID1, markers.READY, markers.FILTERED])
    assert kinds.index(markers.READY) < kinds.index(markers.FILTERED)
    assert kinds[4:] == [markers.EXITED]
    assert os.WIFEXITED(got[-1]["status"])
    assert os.WEXITSTATUS(got[-1]["status"]) == 0
    assert recording is not None
    names = [c[0] for c in recording]
    unshare_all_but_cgroup = (
        CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    )
    assert [tuple(c) for c in recording[:6]] == [
        ("set_pdeathsig", ["SIGKILL"]),
        ("setgroups", [[]]),
        ("unshare", [unshare_all_but_cgroup]),
        ("setresgid", [0]),
        ("setresuid", [0]),
        ("set_pdeathsig", ["SIGKILL"]),  # the credential change cleared it
    ]
    # then PID 1's own sequence: its cgroup namespace once placed, seccomp last
    assert names[6:8] == ["set_pdeathsig", "mount"]
    assert ("unshare", [CLONE_NEWCGROUP]) in [tuple(c) for c in recording[6:]]
    assert names[-1] == "load_seccomp"
    assert names.index("set_no_new_privs") == len(names) - 2


def test_keeper_reports_a_failed_unshare() -> None:
    k = RecordingKernel(fail={"unshare": errno.EINVAL})
    got, recording, status = _run_keeper(k)
    assert recording is None
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == markers.EXIT_SETUP_FAILED
    assert got == [
        {
            "m": markers.STEP_FAILED,
            "step": "unshare",
            "errno": errno.EINVAL,
            "message": os.strerror(errno.EINVAL),
        }
    ]


def test_pdeathsig_comes_first_in_both_children() -> None:
    """A sanity check on the recording kernel's spelling used above."""
    k = RecordingKernel()
    k.set_pdeathsig(signal.SIGKILL)
    assert k.calls == [("set_pdeathsig", ("SIGKILL",))]


def test_fork_lean_forks_without_the_interpreters_after_fork_hooks() -> None:
    """The keeper and PID 1 are forked by fork_lean: a real fork (own pid, the child's exit
    status reaches the parent) in which Python's after-fork hooks do not run."""
    from forgeone_isolate._sys import libc

    ran: list[int] = []
    os.register_at_fork(after_in_child=lambda: ran.append(1))
    r, w = os.pipe()
    pid = libc.fork_lean()
    if pid == 0:  # the child: report whether the hook ran, and our pid
        os.write(w, f"{len(ran)} {os.getpid()}".encode())
        os._exit(7)
    os.close(w)
    hooks, child_pid = os.read(r, 64).decode().split()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert int(child_pid) == pid != os.getpid()
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 7
    assert hooks == "0"  # with os.fork the registered hook would have run: "1"
