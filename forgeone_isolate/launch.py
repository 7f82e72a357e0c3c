"""Launch one plugin, isolated: the parent side of ARCHITECTURE.md's sequence.

``run_plan`` carries out a plan: lease a host uid, create the plugin's cgroup, fork the
keeper (child.py), map its ids and place it, observe PID 1 from /proc once every layer is
in, serve its broker requests until it ends or its deadline passes, then tear everything
down on every path: no process, cgroup, uid lease or descriptor is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import math
import os
import re
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from forgeone_isolate import (
    abi,
    cgroup,
    guest,
    markers,
    ns,
    observe,
    package,
    policy,
    rlimits,
    seccomp_filter,
    signing,
    wasm,
)
from forgeone_isolate import child as child_mod
from forgeone_isolate import protocol as p
from forgeone_isolate.audit import AuditLog
from forgeone_isolate.broker import Broker, Identity, Resolver, system_resolver
from forgeone_isolate.errors import EXIT_OK, EXIT_PLUGIN_FAILED, SetupError
from forgeone_isolate.kvstore import KvStore
from forgeone_isolate.metrics import record_launch
from forgeone_isolate.plan import NOFILE, SandboxPlan, build_plan
from forgeone_isolate.uidpool import default_lease_dir, lease_uid

DEFAULT_STATE_DIR = Path("/var/lib/forgeone")
SETUP_DEADLINE_S = 15.0
#: how long PID 1 may outlive its broker channel before it is killed
PID1_EXIT_S = 5.0
MAX_KEPT_LOGS = 1000
#: room for a few descriptors: anything the child sends is counted, closed and refused
_ANCILLARY_SPACE = socket.CMSG_SPACE(16 * 4)
_TRUNCATED = socket.MSG_TRUNC | socket.MSG_CTRUNC
TERM_GRACE_S = 2.0


@dataclass
class LaunchResult:
    """What happened, for the report."""

    status: str = "error"  # ok | error | killed
    reason: str = ""
    isolation: dict[str, Any] = field(default_factory=dict)
    broker: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    cgroup: dict[str, Any] = field(default_factory=dict)
    logs: list[tuple[int, str]] = field(default_factory=list)
    logs_dropped: int = 0
    cpu: int = -1  # the CPU the plugin and its broker shared
    network: dict[str, Any] = field(default_factory=dict)
    output: bytes = b""
    #: milliseconds PID 1 spent in each step of its sequence (its own clock; informational)
    child_steps: dict[str, float] = field(default_factory=dict)
    #: milliseconds from fork to each setup marker and to the guest's first broker call
    timings: dict[str, float] = field(default_factory=dict)
    exit_status: int = EXIT_PLUGIN_FAILED


PayloadFactory = Callable[[], Callable[[], int]]


class CommandSource(Protocol):
    """Where a running guest's next command comes from (see protocol.Op.IDLE)."""

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when a command may be waiting, or None."""

    def next_command(self) -> tuple[p.Command, bytes] | None:
        """The next command, or None when there is none yet."""

    def on_result(self, command: p.Command, code: int, kind: p.DoneKind, output: bytes) -> None:
        """The outcome of the previous command (reported with the guest's next IDLE)."""

    def on_paused(self, paused: bool) -> None:
        """The plugin's cgroup was frozen (True) or thawed (False)."""


class RunOnce:
    """One-shot ``launch``: init, start, then stop at once."""

    def fileno(self) -> int | None:
        return None

    def next_command(self) -> tuple[p.Command, bytes] | None:
        return (p.Command.STOP, b"")

    def on_result(self, command: p.Command, code: int, kind: p.DoneKind, output: bytes) -> None:
        return None

    def on_paused(self, paused: bool) -> None:
        return None


@contextlib.contextmanager
def _term_guard(on_term: Callable[[], None]) -> Iterator[None]:
    """SIGTERM/SIGINT while a plugin runs: kill it, then clean up normally."""
    if threading_active():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, _frame: object) -> None:
        on_term()

    for s in old:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def threading_active() -> bool:
    """True when called off the main thread (signal handlers cannot be installed)."""
    return threading.current_thread() is not threading.main_thread()


def run_plan(
    plan: SandboxPlan,
    payload_factory: PayloadFactory,
    cgroups: cgroup.CgroupHost,
    on_log: Callable[[int, str], None] | None = None,
    on_observed: Callable[[LaunchResult], None] | None = None,
    audit: AuditLog | None = None,
    kv: KvStore | None = None,
    resolver: Resolver | None = None,
    commands: CommandSource | None = None,
    sweep: bool = True,
    read_audit: bool = True,
) -> LaunchResult:
    """Execute ``plan``: fork, contain, serve, reap, clean. Never leaves anything behind.

    ``audit`` and ``kv`` are the broker's audit trail and the plugin's persistent store;
    ``resolver`` replaces the system's name resolution for ``net_connect`` (tests);
    ``commands`` feeds a running guest (the service); by default it is stopped after start.
    ``sweep=False`` skips removing dead supervisors' cgroups (a service sweeps once at start).
    ``read_audit=False`` reads no seccomp audit records: a killing syscall is then reported as
    ``seccomp: unknown syscall``, for a service that keeps the one witness to name it.

    Raises: SetupError when the sandbox could not be built (the step and errno named).
    """
    result = LaunchResult()
    started = time.monotonic()
    limits = cgroup.CgroupLimits(
        cpu_percent=plan.cpu_percent,
        memory_bytes=plan.cgroup_memory_bytes,
        pids=plan.pids + 1,  # + the keeper process outside the plugin's PID namespace
        io_bps=plan.io_bps if plan.io_device is not None else None,
        io_device=plan.io_device,
    )

    def keep_log(level: int, text: str) -> None:
        if len(result.logs) < MAX_KEPT_LOGS:
            result.logs.append((level, text))
        else:
            result.logs_dropped += 1

    broker = Broker(
        Identity(plan.signer, plan.plugin, plan.version, plan.instance_id),
        plan.effective,
        on_log or keep_log,
        audit=audit,
        kv=kv,
        resolver=resolver or system_resolver,
    )
    witness = observe.SeccompWitness(listen=read_audit)
    if sweep:
        sweep_stale_cgroups(cgroups)
    # The supervisor's pid in the name lets a later launch remove what a killed one left.
    pc = cgroups.create(f"{plan.plugin[:30]}-{plan.instance_id}-s{os.getpid()}", limits)
    result.timings["cgroup_ms"] = round((time.monotonic() - started) * 1000, 3)
    result.cgroup = {
        "paths": list(pc.paths),
        "applied": dict(pc.applied),
        "not_applied": dict(pc.not_applied),
    }
    ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    brk_parent, brk_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    devnull = os.open("/dev/null", os.O_RDWR)
    keeper = -1
    ran_through = False  # the run ended without raising (then a cleanup error is raised)
    sup: _Supervisor | None = None
    own_affinity = os.sched_getaffinity(0)
    # Built once here, before the fork, so PID 1 only loads it.
    seccomp_filter.filter_for(plan.seccomp_allow, plan.seccomp_min_fd, NOFILE - 1)
    try:
        # Made before the fork: after it, every page this process writes is copied (the
        # keeper maps them all too), so the time to our first select() is kept short.
        sup = _Supervisor(
            plan, result, broker, pc, witness, -1, ctl_parent, brk_parent, on_observed
        )
        sup.commands = commands or RunOnce()
        sup.t0 = started
        # On cgroup v2 the keeper is born in the plugin's cgroup (clone3 CLONE_INTO_CGROUP)
        cgroup_fd = _cgroup_dir_fd(pc)
        try:
            keeper, sup.keeper_placed = child_mod.fork_children(
                plan,
                child_mod.ChildChannels(ctl_child, brk_child, devnull),
                payload_factory,
                cgroup_fd,
            )
        finally:
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
        sup.keeper = keeper
        result.timings["forked_ms"] = round((time.monotonic() - started) * 1000, 3)
        ctl_child.close()
        brk_child.close()
        os.close(devnull)
        devnull = -1
        sup.run()
        keeper = -1
        ran_through = True
    finally:
        if sup is not None:
            sup.sel.close()  # (run() closes it too; closing twice is harmless)
            if keeper > 0 and (sup.keeper_status is None or sup.pid1_status is None):
                sup.kill(sup.kill_reason or "setup failed")  # (run() did not get to reap)
                sup.reap_keeper()
                sup.reap_pid1()
        elif keeper > 0:
            _kill_and_reap(keeper)
        with contextlib.suppress(Exception):
            pc.kill()
        # Every step below runs whatever an earlier one raised (a veth the kernel would not
        # delete must not leave the cgroups behind too); the first failure is raised last.
        cleanup_error: Exception | None = None
        if sup is not None and sup.link is not None:
            with contextlib.suppress(Exception):
                result.network.update(sup.link.stats())
            try:
                sup.link.teardown()
            except Exception as e:
                cleanup_error = e
        if sup is not None and sup.netns_fd >= 0:
            os.close(sup.netns_fd)
        stats: dict[str, int] = {}
        with contextlib.suppress(Exception):
            stats = pc.stats()
        try:
            pc.remove()
        except Exception as e:
            cleanup_error = cleanup_error or e
        witness.close()
        broker.close()
        for s in (ctl_parent, brk_parent):
            s.close()
        if devnull >= 0:
            os.close(devnull)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, own_affinity)  # _share_one_cpu pinned us for the run
        if cleanup_error is not None and ran_through:
            raise cleanup_error  # (an error already on its way out is the one to report)
    result.broker = {
        "allowed": broker.stats.allowed,
        "denied": broker.stats.denied,
        "violations": broker.stats.violations,
        "rate_limited": broker.stats.rate_denied,
        "by_op": broker.stats.by_op,
    }
    result.output = bytes(broker.all_output)
    result.metrics = {
        "wall_ms": round((time.monotonic() - started) * 1000, 2),
        "timings_ms": result.timings,
        **stats,
    }
    return result


_STALE_RE = re.compile(r"-s(\d+)$")
#: a leaf younger than this is never swept: its supervisor may live in another pid
#: namespace (where its pid means nothing here) and be between creating it and moving its
#: keeper in, the only time a live plugin's leaf is empty
STALE_GRACE_S = 60.0


def sweep_stale_cgroups(cgroups: cgroup.CgroupHost, grace_s: float = STALE_GRACE_S) -> list[str]:
    """Remove plugin cgroups whose supervisor is dead (it was SIGKILLed, say).

    Only empty leaves named ``...-s<pid>`` whose pid no longer exists, and older than
    ``grace_s``, are removed; the kernel refuses rmdir of a cgroup that still has
    processes, so a live one is never hit.
    """
    removed: list[str] = []
    now = time.time()
    for path in sorted(cgroups.existing_plugin_dirs(), key=len, reverse=True):
        m = _STALE_RE.search(os.path.basename(path))
        if m is None:
            continue
        try:
            if now - os.stat(path).st_mtime < grace_s:
                continue
        except OSError:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its supervisor lives
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            os.rmdir(path)
            removed.append(path)
    return removed


def _cgroup_dir_fd(pc: cgroup.PluginCgroup) -> int:
    """A descriptor of the plugin's cgroup v2 directory, to fork the keeper into; -1 on
    v1 (or none), where the parent attaches it."""
    if pc.version != "v2" or not pc.paths:
        return -1
    try:
        return os.open(pc.paths[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return -1  # attached the usual way; a real problem shows there


def isolation_gaps(iso: dict[str, Any], plan: SandboxPlan) -> list[str]:
    """What the parent's /proc reading of PID 1 shows missing from the plan (empty: none).

    Checked before PID 1 may run any lifecycle export and before any call of the guest
    (a wasm start function runs at instantiation) is heard: every namespace of the plan
    unshared, seccomp in filter mode, no_new_privs set, no capability in any set, and
    uid/gid 0 mapped to the plan's host ids only; and the keeper (which shared PID 1's
    memory until it ended, as seen then) filtered, no_new_privs, without capabilities.
    """
    gaps: list[str] = []
    seen = iso.get("namespaces", {})
    missing = [n for n in plan.namespaces if seen.get(n) is not True]
    if missing:
        gaps.append("namespaces not unshared: " + ",".join(missing))
    gaps += _confinement_gaps(iso)
    for key, host_id in (("uid_map", plan.host_uid), ("gid_map", plan.host_gid)):
        if iso.get(key) != ["0", str(host_id), "1"]:
            gaps.append(f"{key} {' '.join(iso.get(key) or []) or '?'}, not 0 {host_id} 1")
    # The keeper shared PID 1's memory: it had to be confined at least as tightly.
    keeper = iso.get("keeper")
    if not isinstance(keeper, dict):
        gaps.append("keeper not observed")
    else:
        gaps += [f"keeper {gap}" for gap in _confinement_gaps(keeper)]
    return gaps


def _confinement_gaps(seen: dict[str, Any]) -> list[str]:
    """Seccomp in filter mode, no_new_privs, no capability in any set: what is missing."""
    gaps: list[str] = []
    if seen.get("seccomp") != 2:
        gaps.append(f"seccomp mode {seen.get('seccomp')}, not 2 (filter)")
    if seen.get("no_new_privs") != 1:
        gaps.append(f"no_new_privs {seen.get('no_new_privs')}")
    for key in ("cap_eff", "cap_prm", "cap_inh", "cap_bnd", "cap_amb"):
        value = str(seen.get(key, ""))
        try:
            held = int(value, 16)
        except ValueError:
            held = -1
        if held != 0:
            gaps.append(f"{key} {value or '?'}")
    return gaps


def _peer_gone(sock: socket.socket) -> bool:
    """After a zero-length read: the child hung up (EOF), or sent an empty message?"""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP) for _, ev in poller.poll(0))


def _share_one_cpu(plan: SandboxPlan, pid1: int) -> int:
    """Put PID 1 and this supervisor on one CPU once the plugin runs; return the CPU.

    Every import is a synchronous round trip between PID 1 and the broker. On one CPU a call
    is a context switch; across CPUs it is a wake-up of an idle core, which on these VMs
    costs about four times as much (clock_now: 35 µs vs 120-140 µs). The guest is single
    threaded, so it loses nothing; plugins are spread over the CPUs by their lease index.
    Setup runs unpinned (parent and children overlap there); the caller restores its own
    affinity after the run.
    """
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[plan.address_index % len(cpus)]
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid1, {cpu})
        os.sched_setaffinity(0, {cpu})
    return cpu


def _close_passed_fds(ancdata: list[tuple[int, int, bytes]]) -> int:
    """Close any descriptor the child tried to pass us; return how many there were."""
    count = 0
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            for i in range(0, usable, 4):
                with contextlib.suppress(OSError):
                    os.close(int.from_bytes(data[i : i + 4], sys.byteorder, signed=True))
                count += 1
        else:
            count += 1
    return count


def _kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class _Supervisor:
    """The parent's event loop for one launch."""

    def __init__(
        self,
        plan: SandboxPlan,
        result: LaunchResult,
        broker: Broker,
        pc: cgroup.PluginCgroup,
        witness: observe.SeccompWitness,
        keeper: int,
        ctl: socket.socket,
        brk: socket.socket,
        on_observed: Callable[[LaunchResult], None] | None,
    ) -> None:
        self.plan = plan
        self.result = result
        self.broker = broker
        self.pc = pc
        self.witness = witness
        self.keeper = keeper
        self.ctl = ctl
        self.brk = brk
        self.on_observed = on_observed
        self.pid1 = -1
        self.pid1_fd = -1  # a pidfd on PID 1, from its PID1 marker on
        self.keeper_status: int | None = None  # once reaped (at the PID1 marker, or at the end)
        self.keeper_seen: dict[str, Any] | None = None  # its confinement, seen at PID1
        self.keeper_placed = False  # born in the plugin's cgroup (v2: CLONE_INTO_CGROUP)
        self.vm_size = 0
        self.link: Any = None  # netns.PluginLink once set up
        self.netns_fd = -1
        self.pid1_status: int | None = None
        self.step_failed: dict[str, Any] | None = None
        self.kill_reason: str | None = None
        self.t0 = time.monotonic()
        self.deadline = self.t0 + SETUP_DEADLINE_S
        self.observed = False
        self.early: list[dict[str, Any]] = []
        self.markers_seen: set[str] = set()
        self.deadline_reason: str | None = None  # the kill's reason at the deadline, if set
        self.first_call_seen = False
        self.commands: CommandSource = RunOnce()
        self.last_command: p.Command | None = None  # None: the guest has just started
        self.paused = False
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        # The broker channel is heard only once the parent has checked what it observed:
        # until then a call (from a wasm start function, say) waits in the socket.
        self.brk_listening = False

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.pid1_fd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pid1_fd, signal.SIGKILL)
        elif self.pid1 > 0 and self.pid1_status is None:  # (no pidfd: a kernel before 5.3)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        if self.keeper > 0 and self.keeper_status is None:  # ours until we reap it
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.keeper, signal.SIGKILL)
        if self.pid1 <= 0:  # a PID 1 we do not know yet waits for PLACED: EOF ends it
            with contextlib.suppress(OSError):
                self.ctl.shutdown(socket.SHUT_WR)
        with contextlib.suppress(Exception):
            self.pc.kill(timeout=1.0)

    def run(self) -> None:
        sel = self.sel
        cmd_fd = self.commands.fileno()
        if cmd_fd is not None:
            sel.register(cmd_fd, selectors.EVENT_READ, "cmd")
        ctl_open = brk_open = True
        with _term_guard(lambda: self.kill("supervisor terminated")):
            while ctl_open or (brk_open and self.brk_listening):
                timeout = self.deadline - time.monotonic()
                if timeout <= 0 and self.kill_reason is None:
                    self.kill(
                        self.deadline_reason or ("timeout" if self.observed else "setup timeout")
                    )
                if self.kill_reason is not None:
                    wait: float | None = 0.2
                elif math.isinf(timeout):
                    wait = None  # the guest idles: no deadline until the next command
                else:
                    wait = max(timeout, 0.05)
                events = sel.select(timeout=wait)
                for key, _ in events:
                    if key.data == "ctl" and not self._on_control():
                        sel.unregister(self.ctl)
                        ctl_open = False
                    elif key.data == "brk" and not self._on_broker():
                        sel.unregister(self.brk)
                        brk_open = False
                        # PID 1 has gone, or closed its channel: it ends at once, or is made to.
                        self.deadline = min(self.deadline, time.monotonic() + PID1_EXIT_S)
                        self.deadline_reason = "PID 1 did not end with its broker channel"
                    elif key.data == "cmd":
                        self._dispatch_command()
        sel.close()
        self.reap_keeper()
        self.reap_pid1()
        self._conclude(self.keeper_status or 0)

    def reap_keeper(self) -> None:
        """Wait for the keeper (it ends right after PID1, or failing); keep its status."""
        if self.keeper > 0 and self.keeper_status is None:
            _, self.keeper_status = os.waitpid(self.keeper, 0)

    def reap_pid1(self) -> None:
        """Wait for PID 1, our child (the keeper made it with CLONE_PARENT), and keep its
        wait status: from the kernel, whatever the channel said. One that outlives its
        channels by PID1_EXIT_S is killed first. Idempotent; nothing when there was none."""
        if self.pid1 <= 0 or self.pid1_status is not None:
            return
        reason = self.deadline_reason or "PID 1 did not end with its broker channel"
        if self.pid1_fd >= 0:
            if not select.select([self.pid1_fd], [], [], PID1_EXIT_S)[0]:
                self.kill(reason)
        else:  # (no pidfd: a kernel before 5.3) polled, to the same bound
            deadline = time.monotonic() + PID1_EXIT_S
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(self.pid1, os.WNOHANG)[0] == 0:
                    if time.monotonic() >= deadline:
                        self.kill(reason)
                        break
                    time.sleep(0.01)
        with contextlib.suppress(ChildProcessError):  # (not ours after all: nothing known)
            _, self.pid1_status = os.waitpid(self.pid1, 0)
        if self.pid1_fd >= 0:
            os.close(self.pid1_fd)
            self.pid1_fd = -1

    def _setup_network(self) -> None:
        """Parent: the plugin's shaped veth, and net_connect sockets made in its namespace."""
        from forgeone_isolate import netns  # pyroute2 loads only for plugins with a network

        pool = netns.AddressPool(ipaddress.IPv4Network(self.plan.address_pool))
        host_addr, child_addr, prefix = pool.lease(self.plan.address_index % pool.capacity)
        # Hold the namespace: when the plugin's processes end, the kernel would otherwise
        # tear it down with the veth before its counters are read for the report.
        self.netns_fd = os.open(f"/proc/{self.keeper}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.link = netns.setup_plugin_link(
            self.keeper, self.plan.instance_id[:8], host_addr, child_addr, prefix, self.plan.net_bps
        )
        # (by PID 1's pid: the keeper is gone by the time the plugin calls; PID 1, our
        # child, keeps its pid until we reap it)
        self.broker.connector = lambda addr, port, timeout: netns.connect_in_netns(
            self.pid1, addr, port, timeout
        )
        self.result.network = {
            "host_if": self.link.host_ifname,
            "host_addr": str(host_addr),
            "plugin_addr": str(child_addr),
            "rate_bps": self.plan.net_bps,
        }

    def _on_idle(self) -> None:
        """The guest finished its previous command and waits: no deadline while idle."""
        self.deadline = float("inf")
        code, kind = self.broker.last_result
        if self.last_command is p.Command.PAUSE and not self.paused:
            self.pc.freeze()  # the guest's pause() has run; now the kernel holds it
            self.paused = True
            self.commands.on_paused(True)
        if self.last_command is not None:
            self.commands.on_result(self.last_command, code, kind, bytes(self.broker.output))
        self._dispatch_command()

    def _dispatch_command(self) -> None:
        if self.broker.idle_seq is None or self.kill_reason is not None:
            return
        nxt = self.commands.next_command()
        if nxt is None:
            return
        command, data = nxt
        if command is p.Command.RESUME and self.paused:
            self.pc.thaw()
            self.paused = False
            self.commands.on_paused(False)
        elif self.paused and command is not p.Command.RESUME:
            self.pc.thaw()  # stop or call on a paused plugin: let it run to answer
            self.paused = False
            self.commands.on_paused(False)
        self.last_command = command
        reply = self.broker.answer_idle(command, data)
        self.deadline = time.monotonic() + self.plan.timeout_s
        with contextlib.suppress(OSError):
            self.brk.send(reply.frame)

    def attach(self, pid: int) -> None:
        """Parent: move ``pid`` into the plugin's cgroup (before PID 1 is PLACED)."""
        if self.step_failed is not None:
            return
        try:
            self.pc.add_pid(pid)
        except (SetupError, OSError) as e:
            if self.kill_reason is not None:
                return  # killed meanwhile: the process is gone, nothing failed to set up
            if isinstance(e, SetupError):
                self.step_failed = {"step": e.step, "errno": e.errno, "message": e.message}
            else:
                self.step_failed = {
                    "step": "cgroup-attach",
                    "errno": e.errno or 0,
                    "message": str(e),
                }
            self.kill("setup failed")

    def _send_marker(self, marker: str, **fields: Any) -> None:
        """A marker to the children; a child already gone (killed, say) is no error here:
        its end of the story arrives as EOF and a wait status."""
        with contextlib.suppress(OSError):
            markers.send(self.ctl, marker, **fields)

    def _mark(self, name: str) -> None:
        self.result.timings[name] = round((time.monotonic() - self.t0) * 1000, 3)

    def _on_control(self) -> bool:
        msg = markers.recv(self.ctl)
        if msg is None:
            return False
        return self._on_marker(msg)

    def _on_marker(self, msg: dict[str, Any]) -> bool:
        m = msg.get("m")
        if self.kill_reason is not None and m in (
            markers.UNSHARED,
            markers.READY,
            markers.FILTERED,
        ):
            # Killed meanwhile (SIGTERM, a timeout...): nothing more to set up or observe,
            # and what this marker would have checked is gone, not a setup failure.
            return True
        held_back = m in (markers.READY, markers.FILTERED) and self.pid1 <= 0
        if not held_back:  # each marker is said once (the keeper, steered, could say more)
            if not isinstance(m, str) or m in self.markers_seen:
                self.kill("protocol violation on the setup channel")
                return True
            self.markers_seen.add(m)
        if m == markers.UNSHARED:
            self._mark("unshared_ms")
            try:
                ns.parent_write_id_maps(self.keeper, self.plan.host_uid, self.plan.host_gid)
                if self.plan.network == "veth":
                    self._setup_network()
            except OSError as e:
                self.step_failed = {"step": "id-maps", "errno": e.errno or 0, "message": str(e)}
                self.kill("setup failed")
                return True
            except SetupError as e:
                self.step_failed = {"step": e.step, "errno": e.errno, "message": e.message}
                self.kill("setup failed")
                return True
            self._send_marker(markers.MAPPED)
            self._mark("mapped_ms")
            # Join the cgroup now, while the children set up: a first attach to a new
            # cgroup costs milliseconds. PID 1 waits for PLACED before it confines itself.
            # (Born there on cgroup v2: nothing to do.)
            if not self.keeper_placed:
                self.attach(self.keeper)
            self._mark("keeper_attached_ms")
        elif m == markers.PID1 and isinstance(msg.get("pid"), int) and self.pid1 <= 0:
            self.pid1 = int(msg["pid"])
            # Our child (the keeper made it with CLONE_PARENT): a pidfd to wait on it with a
            # bound (reap_pid1) and to signal it.
            with contextlib.suppress(OSError):
                self.pid1_fd = os.pidfd_open(self.pid1)
            # The keeper exits right after saying this: seen from outside now (a confined
            # zombie) and reaped, so it is gone before PID 1 is placed, let alone before any
            # plugin byte runs in the memory they shared.
            self.keeper_seen = observe.confinement(self.keeper)
            self.reap_keeper()
            if self.kill_reason is not None:  # killed before we knew PID 1: it goes too
                self.kill(self.kill_reason)
                return True
            self._mark("pid1_ms")
            # PID 1's address space size, for its RLIMIT_AS (it has no /proc once pivoted):
            # read now, while it sets up, off its path. What it maps later fits the headroom.
            try:
                self.vm_size = rlimits.vm_size_bytes(self.pid1)
            except (OSError, ValueError) as e:
                self.step_failed = {
                    "step": "vm-size",
                    "errno": getattr(e, "errno", 0) or 0,
                    "message": str(e),
                }
                self.kill("setup failed")
                return True
            held, self.early = self.early, []
            for early in held:
                self._on_marker(early)
        elif m == markers.STEP_FAILED and markers.FILTERED in self.markers_seen:
            # every step is done once PID 1 is filtered: only a plugin that took PID 1 over
            # (its start function runs while the channel is still open) says this now
            self.kill("protocol violation on the setup channel")
        elif m == markers.STEP_FAILED:
            err = msg.get("errno")
            err = err if isinstance(err, int) and 0 <= err < 4096 else 0
            self.step_failed = {
                "step": str(msg.get("step", "?"))[:64],
                "errno": err,
                # the keeper sends the errno only: the words are ours
                "message": str(msg.get("message") or os.strerror(err))[:300],
            }
        elif m in (markers.READY, markers.FILTERED) and self.pid1 <= 0:
            # PID 1 may speak before the keeper has told us its pid: hold it until then
            self.early.append(msg)
        elif m == markers.READY:
            if not self.keeper_placed:  # (else born in the cgroup, as the keeper was)
                self.attach(self.pid1)  # the keeper may have forked it before its own attach
            if self.step_failed is None:
                self._send_marker(markers.PLACED, vm_size=self.vm_size)
                self._mark("placed_ms")
        elif m == markers.FILTERED:
            steps = msg.get("steps")
            if isinstance(steps, dict):  # the child's own account of its step costs (ms)
                self.result.child_steps = {
                    str(k)[:32]: float(v)
                    for k, v in list(steps.items())[:32]
                    if isinstance(v, int | float)
                }
            self.result.isolation = observe.observe(self.pid1)
            self.result.isolation["keeper"] = self.keeper_seen
            gaps = isolation_gaps(self.result.isolation, self.plan)
            if self.kill_reason is not None:
                return True  # killed while we looked (a SIGTERM's handler ran): see above
            if gaps:  # not as planned, seen from outside: no lifecycle export, no call heard
                self.step_failed = {
                    "step": "observe",
                    "errno": errno.EPERM,
                    "message": "isolation not as planned: " + "; ".join(gaps),
                }
                self.kill("setup failed")
                return True
            if self.on_observed is not None:
                self.on_observed(self.result)
            self.observed = True
            self.sel.register(self.brk, selectors.EVENT_READ, "brk")
            self.brk_listening = True
            # From now on a broker call is a context switch: one CPU for the plugin and us
            # (after the /proc read, which ran beside PID 1's instantiation).
            self.result.cpu = _share_one_cpu(self.plan, self.pid1)
            self._mark("observed_ms")
            self.deadline = time.monotonic() + self.plan.timeout_s
            self._send_marker(markers.OBSERVED)
        else:
            self.kill("protocol violation on the setup channel")
        return True

    def _on_broker(self) -> bool:
        try:
            frame, ancdata, flags, _ = self.brk.recvmsg(p.MAX_FRAME + 1, _ANCILLARY_SPACE)
        except OSError:
            return False
        if not frame and not ancdata and _peer_gone(self.brk):
            return False
        if not self.first_call_seen:
            self.first_call_seen = True
            self._mark("first_call_ms")
        smuggled = _close_passed_fds(ancdata) if ancdata else 0
        if flags & _TRUNCATED:
            smuggled = max(smuggled, 1)
        reply = self.broker.handle(frame, fds_received=smuggled)
        if self.broker.abusive:
            self.kill(
                "abuse: " + ("rate limit" if self.broker.stats.rate_denied else "broker protocol")
            )
            if reply is not None and reply.fd is not None:
                os.close(reply.fd)
            return True
        if reply is None and self.broker.idle_seq is not None:
            self._on_idle()
            return True
        if reply is not None:
            try:
                if reply.fd is None:
                    self.brk.send(reply.frame)
                else:
                    self.brk.sendmsg(
                        [reply.frame],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", reply.fd))],
                    )
            except OSError:
                pass
            finally:
                if reply.fd is not None:
                    os.close(reply.fd)
        return True

    def _conclude(self, keeper_status: int) -> None:
        r = self.result
        done = self.broker.done
        status = self.pid1_status
        if self.step_failed is not None:
            sf = self.step_failed
            raise SetupError(sf["step"], sf["errno"], sf["message"])
        oom = 0
        with contextlib.suppress(Exception):
            oom = self.pc.stats().get("oom_kill", 0)
        if oom > 0 and self.observed:
            # memory.oom.group: the kernel killed the whole cgroup, the keeper included
            r.status = "killed"
            r.reason = f"memory: OOM-killed by the cgroup ({oom} kill(s) at memory.max)"
            return
        if self.kill_reason is not None:
            r.status, r.reason = "killed", self.kill_reason
            if self.kill_reason == "setup timeout":
                raise SetupError("setup", 0, "the sandbox did not come up in time")
            return
        if status is None:
            raise SetupError(
                "keeper", 0, f"the keeper ended before PID 1 existed ({_describe(keeper_status)})"
            )
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            r.status = "killed"
            if sig == signal.SIGSYS:
                name = self.witness.syscall_for(self.pid1) or observe.UNKNOWN_SYSCALL
                r.reason = f"seccomp: {name}"
            elif sig == signal.SIGXCPU:
                r.reason = "timeout: cpu time limit"
            else:
                r.reason = f"signal {signal.Signals(sig).name}"
            return
        code = os.WEXITSTATUS(status)
        if not self.observed and code == markers.EXIT_SETUP_FAILED:
            raise SetupError("sandbox", 0, "PID 1 failed before reporting its step")
        if done is None:
            r.status, r.reason = "error", f"plugin ended without a result (exit {code})"
            return
        phase = phase_name(done.phase)
        message = done.message.decode("utf-8", "replace")
        if done.kind is p.DoneKind.OK and code == 0:
            r.status, r.reason, r.exit_status = "ok", "", EXIT_OK
        elif done.kind is p.DoneKind.MEMORY:
            r.status, r.reason = "killed", f"memory: {phase}: {message}"
        elif done.kind is p.DoneKind.TRAP:
            r.status, r.reason = "error", f"trap in {phase}: {message}"
        else:
            r.status, r.reason = "error", f"{phase}: {message}"


def record_result(state_dir: Path, plan: SandboxPlan, result: LaunchResult) -> None:
    """Add a finished launch's figures to the state directory's per-plugin metrics."""
    record_launch(
        state_dir,
        plan.signer,
        plan.plugin,
        result.status,
        result.reason,
        result.broker,
        result.metrics,
        result.network,
    )


def phase_name(phase: int) -> str:
    """The lifecycle step a DONE frame's phase number names."""
    if phase < len(abi.LIFECYCLE):
        return abi.LIFECYCLE[phase]
    return "handle" if phase == guest.PHASE_HANDLE else "instantiate"


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


# ------------------------------------------------------------------------------ the CLI


def _log_printer(out: TextIO, plugin: str) -> Callable[[int, str], None]:
    def emit(level: int, text: str) -> None:
        print(f"[{plugin}] {abi.LOG_LEVELS[level]}: {text}", file=out, flush=True)

    return emit


def io_device(state_dir: Path) -> tuple[int, int] | None:
    """The block device io_bps is enforced on: the one backing the state directory."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        return cgroup.backing_device(str(state_dir))
    except OSError:
        return None


def prepare(
    package_path: Path, trust_path: Path, state_dir: Path
) -> tuple[package.VerifiedPackage, wasm.ModuleInfo]:
    """Load and attest the package, and check its module. Raises: BadInputError subclasses."""
    trust = signing.TrustStore.load(trust_path)
    pkg = package.verify_file(package_path, trust)
    info = wasm.check_module(pkg.wasm, pkg.manifest.limits.memory_mb)
    return pkg, info


def cli_launch(args: argparse.Namespace, out: TextIO) -> int:
    """``launch``: policy, verify, plan, run, report. Returns the exit status."""
    state_dir: Path = args.state_dir or DEFAULT_STATE_DIR
    pol = policy.Policy.load(args.policy) if args.policy is not None else policy.Policy.deny_all()
    pkg, info = prepare(args.package, args.trust, state_dir)
    manifest = pkg.manifest
    grant = pol.grant_for(pkg.signer, manifest.name)
    eff = policy.effective(manifest.permissions, grant, pol.defaults)
    limits = policy.cap_limits(manifest.limits, eff)
    if args.dry_run:
        plan = build_plan(manifest, pkg.signer, -1, info.lifecycle, eff, limits)
        json.dump(plan.as_dict(), out, indent=2, sort_keys=True)
        out.write("\n")
        return EXIT_OK
    serialized = wasm.compile_serialized(pkg.wasm)
    cgroups = cgroup.detect()
    kv = KvStore(state_dir / "kv.sqlite3") if eff.kv else None
    try:
        with (
            lease_uid(default_lease_dir()) as lease,
            AuditLog(state_dir / "audit" / f"{manifest.name}.jsonl") as audit,
        ):
            plan = build_plan(
                manifest,
                pkg.signer,
                lease.uid,
                info.lifecycle,
                eff,
                limits,
                lease.index,
                io_device=io_device(state_dir),
            )
            result = run_plan(
                plan,
                child_mod.make_guest_payload(serialized, plan),
                cgroups,
                on_log=None if args.json else _log_printer(out, plan.plugin),
                audit=audit,
                kv=kv,
            )
    finally:
        if kv is not None:
            kv.close()
    report: dict[str, Any] = {
        "status": result.status,
        "reason": result.reason,
        "plugin": {"name": plan.plugin, "version": plan.version, "instance": plan.instance_id},
        "signer": plan.signer,
        "isolation": {
            **result.isolation,
            "cgroup_limits": result.cgroup,
            "cpu": result.cpu,
            "network": result.network or "loopback only",
        },
        "broker": result.broker,
        "metrics": result.metrics,
        "output": result.output.decode("utf-8", "replace"),
    }
    record_result(state_dir, plan, result)
    if args.json:
        report["logs"] = [{"level": abi.LOG_LEVELS[lv], "text": t} for lv, t in result.logs]
        json.dump(report, out, sort_keys=True)
        out.write("\n")
    else:
        iso = result.isolation
        summary = (
            f"{plan.plugin} {plan.version}: {result.status}"
            + (f" ({result.reason})" if result.reason else "")
            + f" in {result.metrics.get('wall_ms', 0)} ms; seccomp={iso.get('seccomp')}"
            f" no_new_privs={iso.get('no_new_privs')} cap_eff={iso.get('cap_eff')}"
            f" broker allowed={result.broker.get('allowed')} denied={result.broker.get('denied')}"
        )
        print(summary, file=out)
    out.flush()
    sys.stderr.flush()
    return result.exit_status
