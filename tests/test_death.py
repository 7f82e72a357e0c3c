"""Death tests: after the whole child sequence, anything outside the allow-list kills PID 1.

Each test runs ``launch.run_plan`` in-process with a custom payload instead of wasmtime.
The payload factory runs in PID 1 before the filter (after mounts, hostname, lo, fds); the
payload it returns runs after every layer. A payload that is killed must be reported as
``killed`` with ``seccomp: <syscall>``; one that exits is reported as "plugin ended without a
result (exit N)" (it sends no DONE frame), and N carries what it found.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import socket
from collections.abc import Callable, Iterator

import pytest
from conftest import time_scale

from forgeone_isolate import cgroup, plan, policy, uidpool
from forgeone_isolate._sys import libc
from forgeone_isolate._sys.libc import CLONE_NEWNET, CLONE_NEWUSER, CapData, CapHeader
from forgeone_isolate.launch import LaunchResult, run_plan
from forgeone_isolate.plan import SandboxPlan

pytest.register_assert_rewrite("plugin_utils")
from plugin_utils import Packer  # noqa: E402

pytest_plugins = ["plugin_utils"]  # fixtures: packer, no_stray_processes

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.requires_userns,
    pytest.mark.requires_seccomp,
    pytest.mark.requires_cgroup,
    pytest.mark.usefixtures("leak_check", "no_stray_processes"),
]

Payload = Callable[[], int]
Factory = Callable[[], Payload]

# <asm/unistd_64.h> (x86_64)
SYS_ptrace = 101
SYS_getpid = 39
SYS_write = 1
SYS_mount = 165
SYS_unshare = 272
SYS_capget = 125
SYS_capset = 126
X32_SYSCALL_BIT = 0x40000000
PTRACE_TRACEME = 0
LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: a kill is reported well within this (the plan's own timeout is 5 s: never reached)
KILL_BOUND_MS = 4000 * time_scale()


@pytest.fixture
def base_plan(packer: Packer) -> Iterator[SandboxPlan]:
    """A plan for the ``noexports`` test plugin with a leased host uid."""
    pkg = packer.verified("noexports")
    with uidpool.lease_uid(uidpool.default_lease_dir()) as lease:
        yield plan.build_plan(pkg.manifest, pkg.signer, lease.uid, (), policy.Effective())


def run(p: SandboxPlan, factory: Factory) -> LaunchResult:
    return run_plan(p, factory, cgroup.detect())


def after_filter(action: Callable[[], object]) -> Factory:
    """A factory whose payload does ``action`` after the filter and then exits 0."""

    def factory() -> Payload:
        libc.raw_syscall(SYS_getpid)  # resolve the ctypes binding before the filter

        def payload() -> int:
            action()
            return 0

        return payload

    return factory


def assert_killed_by(result: LaunchResult, syscall: str) -> None:
    assert result.status == "killed", result
    assert result.reason == f"seccomp: {syscall}", result
    assert result.exit_status == 1
    assert result.metrics["wall_ms"] < KILL_BOUND_MS


def assert_exited(result: LaunchResult, code: int) -> None:
    assert result.status == "error", result
    assert result.reason == f"plugin ended without a result (exit {code})", result


# ------------------------------------------------------------------ the filter kills


def test_open_is_killed(base_plan: SandboxPlan) -> None:
    assert_killed_by(run(base_plan, after_filter(lambda: os.open("/", os.O_RDONLY))), "openat")


def test_socket_is_killed(base_plan: SandboxPlan) -> None:
    assert_killed_by(run(base_plan, after_filter(socket.socket)), "socket")


def test_ptrace_is_killed(base_plan: SandboxPlan) -> None:
    action = after_filter(lambda: libc.raw_syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0))
    assert_killed_by(run(base_plan, action), "ptrace")


def test_unshare_is_killed(base_plan: SandboxPlan) -> None:
    action = after_filter(lambda: libc.raw_syscall(SYS_unshare, CLONE_NEWUSER | CLONE_NEWNET))
    assert_killed_by(run(base_plan, action), "unshare")


def test_mount_is_killed(base_plan: SandboxPlan) -> None:
    action = after_filter(lambda: libc.raw_syscall(SYS_mount, 0, 0, 0, 0, 0))
    assert_killed_by(run(base_plan, action), "mount")


def test_x32_syscall_number_is_killed(base_plan: SandboxPlan) -> None:
    # getpid through the x32 ABI: refused as a foreign architecture, before any allow rule.
    result = run(base_plan, after_filter(lambda: libc.raw_syscall(X32_SYSCALL_BIT | SYS_getpid)))
    assert result.status == "killed", result
    assert result.reason.startswith("seccomp: "), result
    assert result.exit_status == 1


def test_write_to_stdout_is_killed(base_plan: SandboxPlan) -> None:
    # write is allowed on the broker (3) and control (4) descriptors only.
    assert_killed_by(run(base_plan, after_filter(lambda: os.write(1, b"x"))), "write")


def test_read_from_stdin_is_killed(base_plan: SandboxPlan) -> None:
    assert_killed_by(run(base_plan, after_filter(lambda: os.read(0, 1))), "read")


def test_setuid_is_killed(base_plan: SandboxPlan) -> None:
    assert_killed_by(run(base_plan, after_filter(lambda: os.setuid(0))), "setuid")


def test_execve_is_killed(base_plan: SandboxPlan) -> None:
    action = after_filter(lambda: os.execv("/bin/true", ["/bin/true"]))
    assert_killed_by(run(base_plan, action), "execve")


def test_fork_is_killed(base_plan: SandboxPlan) -> None:
    assert_killed_by(run(base_plan, after_filter(os.fork)), "clone")


# ------------------------------------------------ capabilities really gone (filter widened)


def test_privileged_operation_fails_with_eperm(base_plan: SandboxPlan) -> None:
    """sethostname needs CAP_SYS_ADMIN in the UTS namespace's owner: it must be gone."""
    widened = dataclasses.replace(
        base_plan, seccomp_allow=(*base_plan.seccomp_allow, "sethostname")
    )

    def factory() -> Payload:
        c = ctypes.CDLL(None, use_errno=True)
        sethostname = c.sethostname
        sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        sethostname.restype = ctypes.c_int

        def payload() -> int:
            rc = sethostname(b"escaped", 7)
            if rc == 0:
                return 1  # it worked: a capability survived
            return 0 if ctypes.get_errno() == errno.EPERM else 2

        return payload

    assert_exited(run(widened, factory), 0)


def test_setuid_and_capset_regain_nothing(base_plan: SandboxPlan) -> None:
    """Even with setuid/capset/capget let through, uid 0 regains no capability."""
    widened = dataclasses.replace(
        base_plan,
        seccomp_allow=(*base_plan.seccomp_allow, "setuid", "capget", "capset", "sethostname"),
    )

    def factory() -> Payload:
        c = ctypes.CDLL(None, use_errno=True)
        syscall = c.syscall
        syscall.restype = ctypes.c_long
        sethostname = c.sethostname
        sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        sethostname.restype = ctypes.c_int
        header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        full = (CapData * 2)()
        for d in full:
            d.effective = d.permitted = d.inheritable = 0xFFFFFFFF
        now = (CapData * 2)()
        hdr, full_p, now_p = ctypes.byref(header), ctypes.byref(full), ctypes.byref(now)

        def payload() -> int:
            failures = 0
            setuid_rc = syscall(ctypes.c_long(105), ctypes.c_long(0))  # setuid(0)
            if setuid_rc not in (0, -1):
                failures |= 1
            if syscall(ctypes.c_long(SYS_capset), hdr, full_p) == 0:
                failures |= 2  # raising capabilities worked
            elif ctypes.get_errno() != errno.EPERM:
                failures |= 4
            if syscall(ctypes.c_long(SYS_capget), hdr, now_p) != 0:
                failures |= 8
            elif any(d.effective or d.permitted or d.inheritable for d in now):
                failures |= 16
            if sethostname(b"escaped", 7) == 0:
                failures |= 32
            return failures

        return payload

    assert_exited(run(widened, factory), 0)


# ------------------------------------------------------- what PID 1 sees before the filter


def test_inside_view_before_the_filter(base_plan: SandboxPlan) -> None:
    """After mounts, hostname and lo (where the factory runs): an empty read-only root,
    no /proc, loopback only, our hostname, PID 1, uid 0 of its own namespace."""

    def factory() -> Payload:
        failures = 0
        if os.listdir("/") != []:
            failures |= 1
        try:
            os.mkdir("/x")
            failures |= 2
        except OSError as e:
            if e.errno != errno.EROFS:
                failures |= 2
        if os.path.exists("/proc") or os.path.exists("/etc/passwd"):
            failures |= 4
        if [name for _, name in socket.if_nameindex()] != ["lo"]:
            failures |= 8
        if socket.gethostname() != base_plan.hostname:
            failures |= 16
        if os.getpid() != 1 or os.getuid() != 0:
            failures |= 32
        return lambda: failures

    assert_exited(run(base_plan, factory), 0)


def test_plain_exit_after_the_filter(base_plan: SandboxPlan) -> None:
    """A payload that does nothing forbidden ends normally with its own status."""
    result = run(base_plan, lambda: lambda: 5)
    assert_exited(result, 5)
    assert result.isolation["seccomp"] == 2


def test_fd_guard_is_not_fooled_by_high_bits(base_plan: SandboxPlan) -> None:
    """write(2) takes an unsigned int fd: the kernel drops bits 32-63 of the register. A
    guard comparing all 64 bits (fd >= 3) would let (1 << 32) | 1 through to fd 1."""

    def factory() -> Payload:
        libc.raw_syscall(SYS_getpid)
        buf = ctypes.create_string_buffer(b"x")
        addr = ctypes.addressof(buf)

        def payload() -> int:
            rc = libc.raw_syscall(SYS_write, (1 << 32) | 1, addr, 1)
            return 0 if rc < 0 else 1  # 1: the write reached fd 1

        return payload

    assert_killed_by(run(base_plan, factory), "write")


# ------------------------------------------------------------------ memory outside the guest


def test_runtime_memory_beyond_the_sandbox_is_refused(base_plan: SandboxPlan) -> None:
    """Touching 1 GiB in PID 1 (outside wasmtime's StoreLimits) is stopped by the kernel.

    Where the plugin cgroup has a memory controller (cgroup v2 hosts, the guest kernel),
    memory.max = guest memory + the runtime allowance and the OOM killer ends the whole
    cgroup: reported ``killed: memory``. Where it has none (this hybrid host), RLIMIT_AS
    refuses the mapping and the payload sees MemoryError (exit 3).
    """

    def factory() -> Payload:
        def payload() -> int:
            # 32 MiB at a time, each written so every page is really charged: memory.max
            # (guest + runtime allowance) is hit long before RLIMIT_AS (VmSize + headroom)
            chunks = []
            try:
                for _ in range(64):
                    chunks.append(b"x" * (32 << 20))
            except MemoryError:
                return 3
            return 4 if chunks else 5

        return payload

    hosts = cgroup.detect()
    result = run_plan(base_plan, factory, hosts)
    if "memory" in hosts.available_controllers():
        assert result.status == "killed", result
        assert result.reason.startswith("memory"), result
    else:
        assert_exited(result, 3)


def test_a_failed_link_teardown_still_removes_the_cgroups(
    base_plan: SandboxPlan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The veth's delete is refused (made to fail here): the cgroups, sockets and the rest
    are still cleaned up, and the teardown's error is the launch's (not swallowed). The
    kernel deletes the pair with the namespace; ``leak_check`` checks the cgroups."""
    from forgeone_isolate import netns
    from forgeone_isolate.errors import SetupError

    netted = dataclasses.replace(
        base_plan, network="veth", effective=policy.Effective(net_connect=frozenset())
    )

    def refused(self: netns.PluginLink) -> None:
        raise SetupError("net-teardown", errno.EBUSY, "refused for the test")

    monkeypatch.setattr(netns.PluginLink, "teardown", refused)
    hosts = cgroup.detect()
    made: list[cgroup.PluginCgroup] = []
    create = hosts.create

    def recording_create(name: str, limits: cgroup.CgroupLimits) -> cgroup.PluginCgroup:
        made.append(create(name, limits))
        return made[-1]

    monkeypatch.setattr(hosts, "create", recording_create)
    with pytest.raises(SetupError, match="refused for the test"):
        run_plan(netted, lambda: lambda: 0, hosts)
    assert len(made) == 1
    assert made[0].paths
    assert not any(os.path.exists(p) for p in made[0].paths), made[0].paths
