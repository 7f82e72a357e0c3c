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
from helpers import make_plan  # tests/ is on sys.path

from forgeone_isolate import caps, child, fds, markers, mounts, ns
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
    task_count,
)
from forgeone_isolate.kernel import RecordingKernel
from forgeone_isolate.plan import SandboxPlan

HOST_UID = 1_500_000_000
DEVNULL_FD = 77  # the kernel is a recording: this number is only ever recorded
NS_ALL_BUT_CGROUP = (
    CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
)
VM_SIZE = 123 * 4096  # what the parent read in /proc/<pid 1>/status, sent with PLACED


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

    markers.send(ch.ctl_peer, markers.PLACED, vm_size=VM_SIZE)
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
        # securebits locked and the bounding set emptied while the parent places us
        ("set_securebits", (caps.SECUREBITS_LOCKED,)),
        *[("capbset_drop", (cap,)) for cap in range(last + 1)],
        # READY -> PLACED: now in its cgroup, PID 1 roots a cgroup namespace there
        ("unshare", (CLONE_NEWCGROUP,)),
        # rlimits from the plan, then the address space last
        ("setrlimit", (resource.RLIMIT_CORE, 0, 0)),
        ("setrlimit", (resource.RLIMIT_NOFILE, 16, 16)),
        ("setrlimit", (resource.RLIMIT_MEMLOCK, 0, 0)),
        ("setrlimit", (resource.RLIMIT_MSGQUEUE, 0, 0)),
        ("setrlimit", (resource.RLIMIT_CPU, plan.timeout_s + 1, plan.timeout_s + 2)),
        as_limit,
        # capabilities: ambient, then effective, permitted and inheritable
        ("clear_ambient_caps", ()),
        ("capset_clear", ()),
        ("set_no_new_privs", ()),
        ("load_seccomp", ()),
    ]
    assert k.calls == expected
    assert k.names()[-1] == "load_seccomp"

    # The address-space limit is the size the parent read, the headroom and the guest memory.
    _, soft, hard = as_limit[1]
    assert soft == hard
    assert soft == VM_SIZE + plan.as_headroom + plan.memory_bytes

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


@pytest.mark.parametrize(
    "placed", [None, {"vm_size": VM_SIZE}, {}, {"vm_size": -1}, {"vm_size": "1"}, {"vm_size": True}]
)
def test_no_placed_or_observed_reply_means_no_payload(
    channels: Channels, placed: dict[str, Any] | None
) -> None:
    """Without the parent's PLACED (with a positive int vm_size), or then its OBSERVED, the
    plugin exits with EXIT_PROTOCOL and its payload never runs."""
    if placed is not None:
        markers.send(channels.ctl_peer, markers.PLACED, **placed)
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


@dataclass
class KeeperRun:
    got: list[dict[str, Any]]  # the markers received
    report: dict[str, Any]  # what PID 1 said on the broker channel ({} if it never ran)
    status: int  # the keeper's wait status
    keeper_cgroup: str  # its cgroup v2 path, read while it waited for MAPPED
    placed: bool  # fork_keeper said it was born in the cgroup directory given
    pid1_parent: int = 0  # PID 1's parent, read in /proc (the keeper made it ours)
    pid1_status: int | None = None  # PID 1's wait status: ours to reap


def _v2_cgroup(pid: int | str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next((ln.split(":", 2)[2].strip() for ln in f if ln.startswith("0::")), "")


def _in_a_one_thread_process(cgroup_dir: str) -> KeeperRun:
    """_run_keeper(cgroup_fd=...) in a forked child: the raw clone3 is only for a process
    of one thread (as fork_children ensures), which this test process may not be."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the one-thread child
        try:
            fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            assert task_count() == 1
            run = _run_keeper(cgroup_fd=fd)
            os.write(w, json.dumps(run.__dict__).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    assert data, "the one-thread child reported nothing"
    return KeeperRun(**json.loads(data))


def _run_keeper(
    flags: int = NS_ALL_BUT_CGROUP,
    reply: str = markers.MAPPED,
    parent_pid: int | None = None,
    pid1_exit: int = 0,
    cgroup_fd: int = -1,
) -> KeeperRun:
    """Fork the real (C) keeper; play the supervisor (write its id maps, answer MAPPED with
    ``reply``). PID 1 reports what it sees on the broker channel and exits ``pid1_exit``."""
    from forgeone_isolate._sys import _keeper

    ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    brk_parent, brk_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    unrelated = os.open(os.devnull, os.O_RDONLY)  # not for PID 1: the keeper closes it
    keeper, placed = _keeper.fork_keeper(
        ctl_child.fileno(),
        brk_child.fileno(),
        os.getpid() if parent_pid is None else parent_pid,
        flags,
        (),
        False,
        cgroup_fd,
    )
    if keeper == 0:  # pragma: no cover - PID 1
        try:
            report = {
                "pid": os.getpid(),
                "uid": os.getuid(),
                "steps": _keeper.keeper_steps(),
                "parent_ends_open": [_fd_open(ctl_parent.fileno()), _fd_open(brk_parent.fileno())],
                "unrelated_open": _fd_open(unrelated),
                "cgroup": _v2_cgroup("self"),
            }
            os.write(brk_child.fileno(), json.dumps(report).encode())
        finally:
            os._exit(pid1_exit)
    os.close(unrelated)
    ctl_child.close()
    brk_child.close()
    run = KeeperRun([], {}, 0, "", placed)
    finished = False
    try:
        while True:
            msg = _recv_within(ctl_parent)
            if msg is None:
                break
            run.got.append(msg)
            if msg["m"] == markers.UNSHARED:
                # seen from outside: the keeper is in new user, mount, net... namespaces
                for name in ("user", "mnt", "net", "ipc", "uts"):
                    assert os.readlink(f"/proc/{keeper}/ns/{name}") != os.readlink(
                        f"/proc/self/ns/{name}"
                    ), name
                # (its new PID namespace shows in PID 1, which reports pid 1)
                run.keeper_cgroup = _v2_cgroup(keeper)
                ns.parent_write_id_maps(keeper, HOST_UID, HOST_UID)
                markers.send(ctl_parent, reply)
            elif msg["m"] == markers.STEP_FAILED:
                break
        if select.select([brk_parent], [], [], 2.0)[0]:
            data = brk_parent.recv(1 << 16)
            run.report = json.loads(data) if data else {}
        pid1 = next((m["pid"] for m in run.got if m["m"] == markers.PID1), None)
        if pid1 is not None:  # our child (CLONE_PARENT), alive or a zombie until reaped
            with open(f"/proc/{pid1}/status") as f:
                run.pid1_parent = int(next(ln for ln in f if ln.startswith("PPid:")).split()[1])
            _, run.pid1_status = os.waitpid(pid1, 0)
        finished = True
    finally:
        if not finished:
            os.kill(keeper, signal.SIGKILL)
        _, run.status = os.waitpid(keeper, 0)
        ctl_parent.close()
        brk_parent.close()
    return run


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.requires_root
def test_keeper_unshares_is_mapped_forks_pid1_and_reports_its_status() -> None:
    run = _run_keeper(pid1_exit=5)
    got, report, status = run.got, run.report, run.status
    assert run.placed is False  # no cgroup directory given
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    assert [m["m"] for m in got] == [markers.UNSHARED, markers.PID1]
    # PID 1 is our child (the keeper made it with CLONE_PARENT): its status is ours to reap
    assert run.pid1_parent == os.getpid()
    # PID 1 of the new PID namespace, root there (mapped to HOST_UID), without the
    # parent's ends of the channels; the keeper's step timings came along.
    assert report["pid"] == 1
    assert report["uid"] == 0
    assert report["parent_ends_open"] == [False, False]
    assert report["unrelated_open"] is False  # of the parent's descriptors PID 1 has none
    assert set(report["steps"]) == {
        f"keeper-{name}" for name in ("pdeathsig", "setgroups", "unshare", "setresuid", "fork-pid1")
    }
    assert all(v >= 0 for v in report["steps"].values())
    assert got[1]["pid"] > 1  # its pid on the host
    assert run.pid1_status is not None
    assert os.WIFEXITED(run.pid1_status)
    assert os.WEXITSTATUS(run.pid1_status) == 5


@pytest.mark.requires_root
def test_keeper_reports_a_failed_unshare() -> None:
    run = _run_keeper(flags=0x1)
    got, report, status = run.got, run.report, run.status  # not a namespace flag: EINVAL
    assert report == {}
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == markers.EXIT_SETUP_FAILED
    # the step and the errno (the parent words the message: nothing locale-bound in C)
    assert got == [{"m": markers.STEP_FAILED, "step": "unshare", "errno": errno.EINVAL}]


@pytest.mark.requires_root
@pytest.mark.parametrize("reply", [markers.PLACED, "MAPPED ", "mapped"])
def test_keeper_without_mapped_exits_without_a_pid1(reply: str) -> None:
    run = _run_keeper(reply=reply)
    got, report, status = run.got, run.report, run.status
    assert [m["m"] for m in got] == [markers.UNSHARED]
    assert report == {}
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == markers.EXIT_PROTOCOL


@pytest.mark.requires_root
def test_keeper_of_a_parent_already_gone_does_nothing() -> None:
    run = _run_keeper(parent_pid=1)
    got, report, status = run.got, run.report, run.status  # "our parent" is not who it names
    assert got == []
    assert report == {}
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == markers.EXIT_PARENT_GONE


def test_fork_lean_forks_without_the_interpreters_after_fork_hooks() -> None:
    """The fork server forks plugin hosts with fork_lean: a real fork (own pid, the child's
    exit status reaches the parent) in which Python's after-fork hooks do not run."""
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


def _cgroup2_mount() -> str | None:
    """Where a cgroup2 hierarchy is mounted (here: the hybrid host's /sys/fs/cgroup/unified;
    on a pure v2 host: /sys/fs/cgroup), or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    return None


@pytest.mark.requires_root
def test_keeper_is_born_in_a_cgroup_v2_directory_and_pid1_with_it() -> None:
    """With a cgroup v2 directory fd the keeper is cloned into it (CLONE_INTO_CGROUP): no
    attach. Seen from outside in /proc/<pid>/cgroup, for the keeper and for PID 1."""
    mount = _cgroup2_mount()
    if mount is None:
        if os.environ.get("FORGEONE_MUST_ISOLATE") == "1":
            pytest.fail("no cgroup2 hierarchy mounted (FORGEONE_MUST_ISOLATE=1 forbids skipping)")
        pytest.skip("no cgroup2 hierarchy mounted")
    own = _v2_cgroup("self")
    base = os.path.join(mount, own.lstrip("/"), "forgeone")
    made_base = not os.path.isdir(base)
    leaf = os.path.join(base, f"keeper-test-{os.getpid()}")
    os.makedirs(leaf)
    relative = "/" + os.path.relpath(leaf, mount)
    try:
        run = _in_a_one_thread_process(leaf)
    finally:
        os.rmdir(leaf)
        if made_base:
            os.rmdir(base)
    assert run.placed is True
    assert run.keeper_cgroup == relative
    assert run.report["cgroup"] == relative
    assert os.WIFEXITED(run.status)
    assert os.WEXITSTATUS(run.status) == 0
    assert [m["m"] for m in run.got] == [markers.UNSHARED, markers.PID1]


def _under_the_keeper_filter(action: str) -> tuple[int, bytes]:
    """Fork a child that loads the keeper's own filter (``_keeper.keeper_filter``) and then
    does ``action``; returns its wait status and what it wrote to its channel."""
    import ctypes

    from forgeone_isolate._sys import _keeper

    ours, chan = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    other_r, other_w = os.pipe()
    program = _keeper.keeper_filter(chan.fileno())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    filt = ctypes.create_string_buffer(program, len(program))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(program) // 8, ctypes.addressof(filt))
    msg = ctypes.create_string_buffer(b"ok")
    sys_write, sys_getpid, sys_wait4 = 1, 39, 61  # x86_64
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the filtered child
        try:
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
                os._exit(3)
            if action == "write ctl":
                libc.syscall(sys_write, chan.fileno(), msg, 2)
            elif action == "write ctl, high bits":
                libc.syscall(sys_write, ctypes.c_long((1 << 32) | chan.fileno()), msg, 2)
            elif action == "write other":
                libc.syscall(sys_write, other_w, msg, 2)
            elif action == "wait4":
                libc.syscall(sys_wait4, -1, None, 0, None)  # (refused: it has no child)
            elif action == "getpid":
                libc.syscall(sys_getpid)
        finally:
            os._exit(0)
    chan.close()
    os.close(other_w)
    _, status = os.waitpid(pid, 0)
    with ours:
        ours.setblocking(False)
        try:
            said = ours.recv(16)
        except BlockingIOError:
            said = b""
    os.close(other_r)
    return status, said


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers of x86_64")
@pytest.mark.parametrize(
    ("action", "allowed"),
    [
        ("write ctl", True),
        ("wait4", False),  # (PID 1 is not its child: the supervisor reaps it)
        ("write ctl, high bits", False),
        ("write other", False),
        ("getpid", False),
    ],
)
def test_the_keepers_own_filter_allows_its_channel_and_exit_only(
    action: str, allowed: bool
) -> None:
    """The keeper shares PID 1's memory until it exits, so its filter is what holds a
    keeper a plugin might steer: write to its setup channel only (all 64 bits of the fd
    compared), exit. Loaded here in a child of the test's own, as the kernel runs it."""
    status, said = _under_the_keeper_filter(action)
    if allowed:
        assert os.WIFEXITED(status), status
        assert os.WEXITSTATUS(status) == 0
        assert said == (b"ok" if action == "write ctl" else b"")
    else:
        assert os.WIFSIGNALED(status), status
        assert os.WTERMSIG(status) == signal.SIGSYS
