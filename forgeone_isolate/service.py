"""The root host service: ``python -m forgeone_isolate serve --config FILE``.

One long-lived supervisor of many plugins. Its parts:

- the **fork server** (``forkserver``), started before any thread exists: every plugin
  runs in its own **plugin host** (``pluginhost``) forked from there, so this
  multi-threaded process never forks;
- the **registry** (``registry``): installed packages, desired states, restart policies;
- the **control socket** (``control``): JSON lines, peer-checked with ``SO_PEERCRED``;
  a thread per connection, at most ``control.max_connections``;
- the **event loop** thread: one selector over every plugin host's channel and the fork
  server's exit reports; it keeps each plugin's state and schedules restarts;
- optionally the **metrics** HTTP endpoint (Prometheus text) on a loopback address.

Failures: a plugin (or its host) dying never takes the service down; with the
``on-failure`` policy it is restarted after ``base * 2**(n-1)`` seconds (capped), at most
``max_restarts`` times in a row, and each restart is appended to the plugin's audit log
(op ``restart``). The service dying takes every plugin with it (``PR_SET_PDEATHSIG``:
service → fork server → plugin host → keeper → PID 1); when it starts again it removes what
they left (their cgroups) and restores the desired states recorded in the registry.

SIGTERM (or SIGINT): stop every plugin gracefully (STOP, then SIGTERM to its host, then
SIGKILL, within ``stop_timeout_s``), let the hosts flush their audit logs and remove their
cgroups, and exit 0. Desired states are kept, so the next start restores them.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import fcntl
import hashlib
import heapq
import ipaddress
import json
import logging
import os
import queue
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from forgeone_isolate import control, observe, package, policy, sdnotify, signing, wasm
from forgeone_isolate import manifest as mf
from forgeone_isolate import plan as plan_mod
from forgeone_isolate.artifacts import ArtifactStore
from forgeone_isolate.config import ServiceConfig
from forgeone_isolate.errors import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_PLUGIN_FAILED,
    BadInputError,
    IsolateError,
    PackageError,
    VerificationError,
)
from forgeone_isolate.forkserver import SPAWN_TIMEOUT_S, ForkServer, ForkServerError, Spawned
from forgeone_isolate.registry import Candidate, Registry, RegistryError

log = logging.getLogger("forgeone_isolate.service")

MAX_LOG_LINES: Final = 1000
MAX_CHANNEL_MESSAGE: Final = 256 * 1024
#: how long a start may take before the instance is killed (verify + compile + sandbox)
START_TIMEOUT_S: Final = 60.0
#: extra time over a plugin's own timeout_s that a call may take before we stop waiting
CALL_GRACE_S: Final = 5.0
#: after a SIGTERM to a plugin host (the graceful stop took too long), before SIGKILL
TERM_GRACE_S: Final = 3.0
CONNECTION_IDLE_S: Final = 600.0
#: connections only root may take once max_connections are in use: a group member (or a
#: script of one) holding every slot must not lock root out of its own service
ROOT_RESERVED_CONNECTIONS: Final = 4
#: the metrics endpoint: clients served at once (more are turned away), and how long one
#: may take to send its request or read the answer
METRICS_MAX_CLIENTS: Final = 8
METRICS_IO_TIMEOUT_S: Final = 5.0
#: how long a rendered metrics page is served again (each costs a database read and a
#: cgroup read per plugin; anyone on the host may ask)
METRICS_CACHE_S: Final = 1.0
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)  # <asm-generic/socket.h>


class OpError(IsolateError):
    """Raised by a service operation that cannot be carried out (answered to the client)."""

    def __init__(self, message: str, status: int = EXIT_PLUGIN_FAILED) -> None:
        super().__init__(message)
        self.exit_status = status


# --------------------------------------------------------------------------- logging


class _JournalFormatter(logging.Formatter):
    """``<N>message`` under systemd (journald reads the priority), else a plain line."""

    PRIORITY: Final = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = " ".join(record.getMessage().split("\n"))
        if self.journald:
            return f"<{self.PRIORITY.get(record.levelno, 6)}>{text}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname.lower()}: {text}"


def setup_logging(level: str) -> None:
    """Log to stderr, journald-friendly when $JOURNAL_STREAM says stderr is the journal."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger("forgeone_isolate")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False


# --------------------------------------------------------------------------- cgroups


def cgroup_usage(dirs: list[str]) -> dict[str, Any]:
    """Live figures of a plugin's cgroup directories (v1 or v2), where the host has them."""
    out: dict[str, Any] = {}

    def read(path: str) -> str | None:
        try:
            with open(path, encoding="ascii") as f:
                return f.read().strip()
        except (OSError, ValueError):
            return None

    for d in dirs:
        try:
            present = set(os.listdir(d))  # one call, not an open per file a hierarchy lacks
        except OSError:
            continue

        def value_of(name: str, d: str = d, present: set[str] = present) -> str | None:
            return read(os.path.join(d, name)) if name in present else None

        value = value_of("cpuacct.usage")
        if value is not None and value.isdigit():
            out["cpu_usage_ns"] = int(value)
        stat_text = value_of("cpu.stat")
        if stat_text:
            for line in stat_text.splitlines():
                key, _, num = line.partition(" ")
                if key == "usage_usec" and num.isdigit():
                    out["cpu_usage_ns"] = int(num) * 1000
        for name in ("memory.current", "memory.usage_in_bytes"):
            value = value_of(name)
            if value is not None and value.isdigit():
                out["memory_bytes"] = int(value)
        value = value_of("pids.current")
        if value is not None and value.isdigit():
            out["pids"] = int(value)
        value = value_of("freezer.state")
        if value:
            out["freezer"] = value
        value = value_of("cgroup.freeze")
        if value in ("0", "1"):
            out["freezer"] = "FROZEN" if value == "1" else "THAWED"
    return out


#: what a host reports when it did not read the audit records itself
UNNAMED_SECCOMP_KILL: Final = f"seccomp: {observe.UNKNOWN_SYSCALL}"


def name_seccomp_kill(
    ev: dict[str, Any], pid1: int | None, witness: observe.SeccompWitness | None, since: float
) -> dict[str, Any]:
    """``ev`` (a host's exit event) with the killing syscall named from ``witness`` when
    seccomp killed PID 1 ``pid1`` and the host could not name it; otherwise ``ev``."""
    if ev.get("reason") != UNNAMED_SECCOMP_KILL or pid1 is None or witness is None:
        return ev
    name = witness.syscall_for(pid1, wait_s=0.3, since=since)
    return {**ev, "reason": f"seccomp: {name}"} if name else ev


def _write_existing(path: str, value: bytes) -> None:
    """Write to a control file that exists (never create one); errors are ignored."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        os.write(fd, value)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_cgroup_dirs(dirs: list[str], timeout: float = 5.0) -> list[str]:
    """Remove the cgroup leaves a dead plugin host left: thaw, kill what is left, rmdir.

    Only directories the service recorded for its own instances are ever passed here.
    Returns the ones that could not be removed.
    """
    left: list[str] = []
    for d in dirs:
        deadline = time.monotonic() + timeout
        while True:
            for control_file, thawed in (("freezer.state", b"THAWED"), ("cgroup.freeze", b"0")):
                _write_existing(os.path.join(d, control_file), thawed)
            try:
                with open(os.path.join(d, "cgroup.procs"), encoding="ascii") as f:
                    pids = [int(x) for x in f.read().split()]
            except OSError:
                pids = []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    left.append(d)
                    break
            time.sleep(0.02)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(d))  # forgeone/, when no other plugin lives there
    return left


# --------------------------------------------------------------------------- state


@dataclass(eq=False)
class Instance:
    """One running plugin host and what it reported."""

    name: str
    spawned: Spawned
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    state: str = "starting"  # starting | running | paused | stopping
    instance_id: str = ""
    uid: int | None = None
    version: str = ""
    signer: str = ""
    cgroups: list[str] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)
    isolation: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    ready_at: float | None = None
    paused: bool = False
    stop_requested: bool = False
    final: dict[str, Any] | None = None
    gone: bool = False
    host_status: int | None = None
    slot_held: bool = False
    next_id: int = 0
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    cmd_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid1(self) -> int | None:
        """PID 1 of the plugin's namespace, as the host sees it."""
        pid = self.isolation.get("pid")
        return pid if isinstance(pid, int) else None

    def cause(self) -> str:
        """How it ended, in words."""
        f = self.final
        if f is not None and f.get("ev") == "error":
            return str(f.get("message", "launch failed"))
        if f is not None:
            status = str(f.get("status", "?"))
            reason = str(f.get("reason", ""))
            return f"{status}: {reason}" if reason else status
        text = "the plugin host died"
        st = self.host_status
        if st is not None:
            if os.WIFSIGNALED(st):
                text += f" (signal {signal.Signals(os.WTERMSIG(st)).name})"
            else:
                text += f" (exit {os.WEXITSTATUS(st)})"
        return text


@dataclass(eq=False)
class Runtime:
    """The service's memory of one installed plugin across its instances."""

    name: str
    instance: Instance | None = None
    logs: collections.deque[tuple[float, int, str]] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_LOG_LINES)
    )
    restarts: int = 0  # consecutive failures restarted
    total_restarts: int = 0
    restart_at: float | None = None
    failed: str | None = None
    last_exit: dict[str, Any] | None = None
    op_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Attested:
    """What verifying a stored package established, kept by the digest of its bytes and
    the trust store it was checked against (verification is a function of those alone)."""

    manifest: mf.Manifest
    signer: str
    wasm_sha256: str
    lifecycle: tuple[str, ...]  # the module's lifecycle exports


#: the plugin host's events that a waiting thread can be waiting for (see wait_for)
WAITED_EVENTS: Final = frozenset({"ready", "result", "exit", "error"})

#: attestations kept at most (one per installed package and trust store generation)
MAX_ATTESTED: Final = 4096


@dataclass
class Peer:
    """Who is on the other end of a control connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(conn: socket.socket) -> Peer:
    """The connecting process's pid, uid, gid (``struct ucred``)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def peer_groups(conn: socket.socket) -> set[int]:
    """The peer's supplementary groups (``SO_PEERGROUPS``, Linux 4.13), or empty."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
    except OSError:
        return set()
    count = len(raw) // 4
    return set(struct.unpack(f"{count}I", raw[: count * 4]))


def authorize(conn: socket.socket, gid: int | None) -> tuple[Peer, str | None]:
    """(peer, None) when root or a member of ``gid``; else (peer, the refusal)."""
    peer = peer_credentials(conn)
    if peer.uid == 0:
        return peer, None
    if gid is not None and (peer.gid == gid or gid in peer_groups(conn)):
        return peer, None
    who = f"uid {peer.uid} (pid {peer.pid})"
    if gid is None:
        return peer, f"permission denied: {who} is not root; the service accepts root only"
    return peer, f"permission denied: {who} is neither root nor a member of group {gid}"


# --------------------------------------------------------------------------- service


class Service:
    """The running service. ``start`` it, then ``wait``, then ``shutdown``."""

    def __init__(self, config: ServiceConfig, forkserver: ForkServer) -> None:
        self.config = config
        self.fs = forkserver
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.runtimes: dict[str, Runtime] = {}
        self.stop_event = threading.Event()
        self.stopping = False
        self.fatal: str | None = None
        self.started_at = time.time()
        # Launches in flight at once: a launch waits about as long as it computes (the
        # kernel's RCU grace periods at a v1 cgroup attach, the children's steps), so two
        # per CPU would leave CPUs idle under a burst of starts (measured: bench/scale).
        slots = max(8, 4 * (os.cpu_count() or 1))
        self.launch_slots = threading.BoundedSemaphore(slots)
        self._timers: list[tuple[float, int, str]] = []
        self._timer_seq = 0
        self._pending: list[Instance] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop_done = False
        self._threads: list[threading.Thread] = []
        #: instance rows to write, in order (("add", id, name, dirs) / ("remove", id)), by
        #: one thread: the event loop and the global lock never wait for the database
        self._row_queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.registry: Registry | None = None
        self.artifacts: ArtifactStore | None = None
        self._trust_cache: tuple[tuple[Any, ...], signing.TrustStore] | None = None
        self._policy_cache: tuple[bytes, policy.Policy] | None = None
        self._io_device: tuple[int, int] | None = None  # the state dir's block device
        self._attested: dict[tuple[str, frozenset[str], frozenset[str]], Attested] = {}
        self.control: ControlServer | None = None
        #: the one reader of the kernel's seccomp audit records for every plugin (opened
        #: at start); a host reports "seccomp: unknown syscall" and the name comes from here
        self.witness: observe.SeccompWitness | None = None
        self.metrics_server: ThreadingHTTPServer | None = None
        self._state_lock_fd = -1
        self._launching = 0  # _launch calls between their stopping check and their instance
        self._metrics_lock = threading.Lock()
        self._metrics_cache: tuple[float, str] | None = None

    # -- lifecycle -------------------------------------------------------------------

    def _lock_state_dir(self) -> None:
        """Hold ``<state_dir>/service.lock`` (flock) for the service's life: a second
        service on the same state directory must not get as far as the crash cleanup,
        which kills whatever the registry's instance rows name (the live service's
        plugins). Raises: OpError naming the directory."""
        path = self.config.state_dir / "service.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise OpError(f"{path}: cannot open: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise OpError(
                    f"state directory {self.config.state_dir}: another service is using it"
                    f" (it holds {path})"
                ) from None
            raise OpError(f"{path}: cannot lock: {e.strerror or e}") from None
        self._state_lock_fd = fd

    def start(self) -> None:
        """Open the registry, clean up after a crash, listen, restore desired states.

        Raises: IsolateError (the reason named) when the service cannot come up.
        """
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_state_dir()  # before anything in it is read or cleaned up
        (cfg.state_dir / "audit").mkdir(exist_ok=True, mode=0o700)
        self.registry = Registry(cfg.state_dir)
        for name in self.registry.remove_unreferenced_packages():
            log.info("removed %s from the package store: no plugin names it", name)
        self.artifacts = ArtifactStore(cfg.state_dir / "artifacts")
        from forgeone_isolate.launch import io_device

        self._io_device = io_device(cfg.state_dir)  # what a plan's io_bps applies to
        self._cleanup_stale_instances()
        for row in self.registry.all():
            self.runtimes[row.name] = Runtime(row.name)
        self.control = ControlServer(self, cfg.control_socket, cfg.control_gid, cfg.max_connections)
        self.control.bind()
        if cfg.metrics_listen is not None:
            self.metrics_server = start_metrics_server(self, cfg.metrics_listen)
        self.witness = observe.SeccompWitness()
        self._spawn_thread("rows", self._write_instance_rows)
        self._spawn_thread("events", self._event_loop)
        self._spawn_thread("control", self.control.serve)
        if self.metrics_server is not None:
            self._spawn_thread("metrics", self.metrics_server.serve_forever)
        self._spawn_thread("restore", self._restore)

    def _spawn_thread(self, name: str, target: Callable[[], None]) -> threading.Thread:
        t = threading.Thread(target=target, name=f"forgeone-{name}", daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def _write_instance_rows(self) -> None:
        """The thread that records instances (their cgroups, for the cleanup after a crash)
        as the event loop queues them, until shutdown queues None."""
        while True:
            item = self._row_queue.get()
            if item is None:
                return
            try:
                if item[0] == "add":
                    self._reg().add_instance(item[1], item[2], item[3])
                else:
                    self._reg().remove_instance(item[1])
            except Exception as e:  # a full disk, say: the cleanup after a crash is less sure
                log.warning("instance %s: its registry row (%s) failed: %s", item[1], item[0], e)

    def _reg(self) -> Registry:
        assert self.registry is not None
        return self.registry

    def _cleanup_stale_instances(self) -> None:
        from forgeone_isolate import cgroup, launch

        # Once here, not at every launch (the plugin hosts skip it): leaves of any dead
        # supervisor, one-shot launches included.
        with contextlib.suppress(IsolateError, OSError):
            launch.sweep_stale_cgroups(cgroup.detect())
        reg = self._reg()
        for instance, name, dirs in reg.instances():
            left = remove_cgroup_dirs(dirs)
            if left:
                log.warning(
                    "%s: could not remove cgroups left by instance %s: %s", name, instance, left
                )
            else:
                log.info("%s: removed the cgroups left by instance %s", name, instance)
            reg.remove_instance(instance)

    def _restore(self) -> None:
        """Bring back the desired states recorded in the registry (service start)."""
        to_pause: list[tuple[Runtime, Instance]] = []
        for row in self._reg().all():
            if self.stopping:
                return
            if row.desired not in ("running", "paused"):
                continue
            rt = self._runtime(row.name)
            with rt.op_lock:
                if rt.instance is not None:
                    continue
                try:
                    inst = self._launch(row.name)
                except IsolateError as e:  # a refused package or policy: as at a restart
                    bad = isinstance(e, BadInputError)
                    self._failure(rt, None, f"restore failed: {e}", permanent=bad)
                    continue
            log.info("%s: restoring desired state %s", row.name, row.desired)
            if row.desired == "paused":
                to_pause.append((rt, inst))
        for rt, inst in to_pause:
            with rt.op_lock, contextlib.suppress(IsolateError):
                self._wait_ready(inst, START_TIMEOUT_S)
                self._command(inst, "pause")

    def request_stop(self) -> None:
        """Ask the main thread to shut down (signal handlers, a dead fork server)."""
        self.stop_event.set()

    def wait(self) -> None:
        """Block until a stop is requested (the main thread; signals are handled meanwhile)."""
        while not self.stop_event.wait(0.5):
            pass

    def shutdown(self) -> None:
        """Stop every plugin within the bound, close everything, remove the socket."""
        with self.cond:
            self.stopping = True
            self._timers.clear()
            # A launch past its stopping check registers its instance first (bounded by
            # the fork server's answer): then it is in the list below.
            self.cond.wait_for(lambda: self._launching == 0, 2 * SPAWN_TIMEOUT_S)
            instances = [rt.instance for rt in self.runtimes.values() if rt.instance]
        if self.control is not None:
            self.control.close()
        log.info("stopping %d plugin(s)", len(instances))
        queue = list(instances)
        queue_lock = threading.Lock()

        def stopper() -> None:
            while True:
                with queue_lock:
                    if not queue:
                        return
                    inst = queue.pop()
                self._stop_instance(inst, self.config.stop_timeout_s)

        # A bounded crew: hundreds of plugins tearing down at once only thrash the machine.
        stoppers = [threading.Thread(target=stopper) for _ in range(min(len(queue), 32))]
        for t in stoppers:
            t.start()
        bound = time.monotonic() + max(
            30.0, 2 * (self.config.stop_timeout_s + 2 * TERM_GRACE_S) * (1 + len(instances) / 32)
        )
        for t in stoppers:
            t.join(max(0.0, bound - time.monotonic()))
        self.fs.close(timeout=TERM_GRACE_S)
        deadline = time.monotonic() + 2 * TERM_GRACE_S
        with self.cond:
            self.cond.wait_for(
                lambda: all(i.gone for i in instances), max(0.0, deadline - time.monotonic())
            )
        with self.lock:
            self._loop_done = True
        self._wake()
        for t in self._threads:
            if t.name == "forgeone-events":
                t.join(5.0)
        self._row_queue.put(None)  # after the event loop: every row it queued is written
        for t in self._threads:
            if t.name == "forgeone-rows":
                t.join(5.0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self.registry is not None:
            self.registry.close()
        if self.witness is not None:
            self.witness.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._state_lock_fd >= 0:  # last: everything of ours in the directory is closed
            os.close(self._state_lock_fd)
            self._state_lock_fd = -1

    # -- the event loop ------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _event_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        sel.register(self.fs.events, selectors.EVENT_READ, "forkserver")
        for fd in self.witness.fds() if self.witness is not None else ():
            sel.register(fd, selectors.EVENT_READ, "witness")
        try:
            while True:
                with self.lock:
                    if self._loop_done:
                        return
                    for inst in self._pending:
                        try:
                            sel.register(inst.spawned.channel, selectors.EVENT_READ, inst)
                        except (ValueError, OSError):
                            self._on_gone(inst)
                    self._pending.clear()
                    timeout = 1.0
                    if self._timers:
                        timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            while os.read(self._wake_r, 4096):
                                pass
                    elif key.data == "forkserver":
                        if not self._on_forkserver_events():
                            sel.unregister(self.fs.events)
                    elif key.data == "witness":
                        assert self.witness is not None
                        self.witness.collect()
                    else:
                        inst = key.data
                        assert isinstance(inst, Instance)
                        if not self._read_channel(inst):
                            sel.unregister(inst.spawned.channel)
                            self._on_gone(inst)
                self._run_due_timers()
        except Exception:
            log.exception("the event loop failed; stopping the service")
            self.fatal = "event loop failed"
            self.request_stop()
        finally:
            sel.close()

    def _on_forkserver_events(self) -> bool:
        events = self.fs.read_events()
        if events is None:
            with self.lock:
                was_stopping, self.stopping = self.stopping, True
            if not was_stopping:
                # Stopping from here on: the hosts die with the fork server (pdeathsig), and
                # their ends are not failures to restart (nor to audit as such).
                log.error("the fork server has died; stopping (the service manager restarts us)")
                self.fatal = "fork server died"
                self.request_stop()
            return False
        with self.lock:
            by_pid = {
                rt.instance.spawned.pid: rt.instance
                for rt in self.runtimes.values()
                if rt.instance is not None
            }
            for ev in events:
                pid, status = ev.get("pid"), ev.get("status")
                if isinstance(pid, int) and isinstance(status, int) and pid in by_pid:
                    by_pid[pid].host_status = status
        return True

    def _read_channel(self, inst: Instance) -> bool:
        """Handle what a plugin host sent; False at end of file."""
        while True:
            try:
                msg = inst.spawned.channel.recv(MAX_CHANNEL_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not msg:
                return False
            try:
                obj = json.loads(msg)
            except ValueError:
                continue
            if isinstance(obj, dict):
                if obj.get("ev") == "exit":
                    obj = self._name_seccomp_kill(inst, obj)
                self._on_event(inst, obj)

    def _name_seccomp_kill(self, inst: Instance, ev: dict[str, Any]) -> dict[str, Any]:
        """A host's exit event, with the syscall named if seccomp killed its plugin (the
        host does not read audit records: see observe.SeccompWitness). Waits up to 0.3 s
        for the kernel's record, only for such a kill."""
        return name_seccomp_kill(ev, inst.pid1, self.witness, inst.started_at)

    def _on_event(self, inst: Instance, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        with self.cond:
            rt = self.runtimes.get(inst.name)
            if kind == "observed":
                uid = ev.get("uid")
                inst.uid = uid if isinstance(uid, int) else None
                iso = ev.get("isolation")
                inst.isolation = iso if isinstance(iso, dict) else {}
                inst.cgroups = [str(d) for d in ev.get("cgroups", [])]
                if self.registry is not None and inst.instance_id:
                    self._row_queue.put(("add", inst.instance_id, inst.name, list(inst.cgroups)))
            elif kind == "ready":
                inst.ready = True
                inst.ready_at = time.monotonic()
                if inst.state == "starting":
                    inst.state = "running"
                self._release_slot(inst)
                log.info(
                    "%s %s: running (instance %s, pid %s)",
                    inst.name,
                    inst.version,
                    inst.instance_id,
                    inst.pid1,
                )
            elif kind == "log" and rt is not None:
                level = ev.get("level", 2)
                text = str(ev.get("text", ""))
                rt.logs.append((time.time(), level if isinstance(level, int) else 2, text))
                log.debug("[%s] %s", inst.name, text)
            elif kind == "paused":
                inst.paused = bool(ev.get("paused"))
                if inst.state in ("running", "paused"):
                    inst.state = "paused" if inst.paused else "running"
            elif kind == "result":
                ident = ev.get("id")
                if isinstance(ident, int):
                    inst.results[ident] = ev
            elif kind in ("exit", "error"):
                inst.final = ev
            if kind in WAITED_EVENTS:  # (a log line wakes nobody: every thread would re-check)
                self.cond.notify_all()

    def _release_slot(self, inst: Instance) -> None:
        if inst.slot_held:
            inst.slot_held = False
            self.launch_slots.release()

    def _on_gone(self, inst: Instance) -> None:
        """A plugin host's channel closed: it and its sandbox are gone."""
        with contextlib.suppress(OSError):
            inst.spawned.channel.close()
        # Unless the host reported its plugin's end (its cleanup ran), what it named is
        # removed here: it died (pdeathsig killed its keeper and PID 1), or its cleanup
        # failed and it said so in an error event. (Nothing there: nothing to do.)
        finished = inst.final is not None and inst.final.get("ev") == "exit"
        dirs = [] if finished else list(inst.cgroups)
        if dirs:
            left = remove_cgroup_dirs(dirs)
            if left:
                log.warning("%s: cgroups not removed: %s", inst.name, left)
        with self.cond:
            inst.gone = True
            self._release_slot(inst)
            if self.registry is not None and inst.instance_id:
                self._row_queue.put(("remove", inst.instance_id))
            inst.spawned.close_pidfd()
            rt = self.runtimes.get(inst.name)
            if rt is not None and rt.instance is inst:
                rt.instance = None
            cause = inst.cause()
            if rt is not None:
                rt.last_exit = {"cause": cause, "at": time.time(), "instance": inst.instance_id}
            clean = inst.stop_requested or self.stopping
            bad_input = inst.final is not None and bool(inst.final.get("bad_input"))
            if clean:
                log.info("%s: stopped (%s)", inst.name, cause)
            else:
                log.warning("%s: ended unexpectedly: %s", inst.name, cause)
                if rt is not None:
                    self._failure(rt, inst, cause, permanent=bad_input)
            self.cond.notify_all()

    # -- restarts ------------------------------------------------------------------

    def _restart_policy(self, name: str) -> tuple[str, int]:
        row = self._reg().get(name)
        defaults = self.config.restart
        if row is None:
            return "no", 0
        policy = row.restart_policy or defaults.policy
        max_restarts = row.max_restarts if row.max_restarts is not None else defaults.max_restarts
        return policy, max_restarts

    def _failure(self, rt: Runtime, inst: Instance | None, cause: str, permanent: bool) -> None:
        """A plugin failed (crash, kill, failed start): restart it per policy, or give up."""
        with self.lock:
            if self.stopping:
                return
            row = self._reg().get(rt.name)
            if row is None or row.desired not in ("running", "paused"):
                return
            policy, max_restarts = self._restart_policy(rt.name)
            cap = self.config.restart.backoff_cap_s
            ran_well = inst is not None and inst.ready_at is not None
            if ran_well and inst is not None and time.monotonic() - (inst.ready_at or 0) >= cap:
                rt.restarts = 0  # it ran well for a while: this is a new series
            if permanent:
                rt.failed = f"{cause} (not restarted: the package or policy is refused)"
                self._audit(rt.name, inst, "restart", {"cause": cause}, False, "bad input")
                return
            if policy != "on-failure" or rt.restarts >= max_restarts:
                why = (
                    f"restart policy {policy!r}"
                    if policy != "on-failure"
                    else f"{max_restarts} restarts in a row"
                )
                rt.failed = f"{cause} (not restarted: {why})"
                log.error("%s: not restarted (%s)", rt.name, why)
                self._audit(rt.name, inst, "restart", {"cause": cause}, False, why)
                return
            rt.restarts += 1
            rt.total_restarts += 1
            delay = self.config.restart.delay(rt.restarts)
            rt.restart_at = time.monotonic() + delay
            rt.failed = None
            self._timer_seq += 1
            heapq.heappush(self._timers, (rt.restart_at, self._timer_seq, rt.name))
            log.warning(
                "%s: restarting in %.2f s (attempt %d of %d)",
                rt.name,
                delay,
                rt.restarts,
                max_restarts,
            )
            self._audit(
                rt.name,
                inst,
                "restart",
                {
                    "cause": cause,
                    "attempt": rt.restarts,
                    "max_restarts": max_restarts,
                    "delay_s": delay,
                },
                True,
                "restart policy on-failure",
            )
        self._wake()

    def _run_due_timers(self) -> None:
        due: list[str] = []
        with self.lock:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, name = heapq.heappop(self._timers)
                rt = self.runtimes.get(name)
                if rt is not None and rt.restart_at is not None and rt.restart_at <= now:
                    due.append(name)  # restart_at stays set until _restart launches or gives up
        for name in due:
            threading.Thread(
                target=self._restart, args=(name,), name=f"forgeone-restart-{name}", daemon=True
            ).start()

    def _restart(self, name: str) -> None:
        rt = self.runtimes.get(name)
        if rt is None:
            return
        with rt.op_lock:
            row = self._reg().get(name)
            if (
                self.stopping
                or row is None
                or row.desired not in ("running", "paused")
                or rt.instance is not None
                or rt.restart_at is None  # an operator's start or stop came first
            ):
                with self.lock:
                    rt.restart_at = None
                return
            try:
                inst = self._launch(name)
            except IsolateError as e:
                with self.lock:
                    rt.restart_at = None
                self._failure(rt, None, f"restart failed: {e}", isinstance(e, BadInputError))
                return
            if row.desired == "paused":
                with contextlib.suppress(IsolateError):
                    self._wait_ready(inst, START_TIMEOUT_S)
                    self._command(inst, "pause")

    # -- audit ---------------------------------------------------------------------

    def audit_path(self, name: str) -> Path:
        """The plugin's audit log (shared with its plugin hosts' brokers)."""
        return self.config.state_dir / "audit" / f"{name}.jsonl"

    def _audit(
        self,
        name: str,
        inst: Instance | None,
        op: str,
        args: dict[str, Any],
        allowed: bool,
        reason: str,
        peer: Peer | None = None,
    ) -> None:
        from forgeone_isolate.audit import AuditLog

        row = self._reg().get(name) if self.registry is not None else None
        identity = {
            "signer": (inst.signer if inst and inst.signer else (row.signer if row else "")),
            "plugin": name,
            "version": (inst.version if inst and inst.version else (row.version if row else "")),
            "instance": inst.instance_id if inst else "",
        }
        record: dict[str, Any] = {
            "time": time.time(),
            "identity": identity,
            "op": op,
            "args": args,
            "decision": "allow" if allowed else "deny",
            "reason": reason,
            "by": "service",
        }
        if peer is not None:
            record["peer"] = {"uid": peer.uid, "pid": peer.pid}
        problem = None
        try:
            with AuditLog(self.audit_path(name)) as audit_log:
                audit_log.append(record, durable=True)
        except (IsolateError, ValueError) as e:
            problem = str(e)
        if problem is not None:
            log.error("%s: audit append failed: %s", name, problem)

    # -- instances -----------------------------------------------------------------

    def _runtime(self, name: str) -> Runtime:
        with self.lock:
            rt = self.runtimes.get(name)
            if rt is None:
                rt = self.runtimes[name] = Runtime(name)
            return rt

    def _spec(self, name: str) -> dict[str, Any]:
        from forgeone_isolate.uidpool import default_lease_dir

        row = self._reg().get(name)
        if row is None:
            raise RegistryError(f"{name}: not installed")
        cfg = self.config
        delegated: list[str] = []
        if cfg.cgroup_delegated:
            delegated = sorted(_own_cgroups())
        trust = self.trust()
        stored = self._reg().package_path(row.sha256)
        try:
            data = package.read_bounded_file(stored)
        except PackageError as e:  # our own verified file, unreadable now: not the package's fault
            raise OpError(f"{name}: {e}") from None
        if hashlib.sha256(data).hexdigest() != row.sha256:  # before parsing a byte of it
            raise VerificationError(f"stored package {stored} does not hash to its registry digest")
        attested, artifact = self._attest(row.name, row.sha256, row.wasm_sha256, data, trust)
        m = attested.manifest
        if m.name != name:
            raise VerificationError(f"stored package names {m.name!r}, not {name!r}")
        # The plan, made here where it is cheap (see _attest); the host takes a uid for it.
        eff = self._policy().effective_for(attested.signer, name, m.permissions)
        limits = policy.cap_limits(m.limits, eff)
        plan = plan_mod.build_plan(
            m,
            attested.signer,
            0,  # (the host's leased uid, and the address index that follows from it)
            attested.lifecycle,
            eff,
            limits,
            io_device=self._io_device,
            address_pool=str(cfg.address_pool),
        )
        return {
            "plan": plan_mod.plan_to_wire(plan),
            "limits": limits.as_dict(),
            "wasm_sha256": attested.wasm_sha256,
            "name": name,
            "package": str(stored),
            "sha256": row.sha256,
            "trust": str(cfg.trust),
            "trusted": sorted(trust.trusted),
            "revoked": sorted(trust.revoked),
            "artifact": str(artifact),
            "artifact_key": self._store().key.hex(),
            "state_dir": str(cfg.state_dir),
            "lease_dir": str(default_lease_dir()),
            "uid_first": cfg.uid_first,
            "uid_count": cfg.uid_count,
            "uid_hint": self._uid_hint(),
            "delegated": delegated,
            "witness": "service",  # (our one witness names a seccomp kill)
        }

    def _policy(self) -> policy.Policy:
        """The operator's policy as its file is now: read at every start (it is small),
        parsed again only when its bytes change. Raises: PolicyError."""
        path = self.config.policy
        if path is None:
            return policy.Policy.deny_all()
        data = policy.read_operator_file(path, f"policy {path}", policy.MAX_POLICY_BYTES)
        digest = hashlib.sha256(data).digest()
        with self.lock:
            cached = self._policy_cache
        if cached is not None and cached[0] == digest:
            return cached[1]
        parsed = policy.Policy.parse(data, path)
        with self.lock:
            self._policy_cache = (digest, parsed)
        return parsed

    def _attest(
        self, name: str, sha256: str, wasm_sha256: str, data: bytes, trust: signing.TrustStore
    ) -> tuple[Attested, Path]:
        """Verify the stored package ``data`` (which hashes to ``sha256``) for a start: the
        signature over its bytes, the signer trusted and not revoked now, every member's hash.
        Returns what that established and the artifact of its module.

        Done here for every start, where it is cheap (this process is warm; a plugin host
        would copy every page the verification touches). The same bytes against the same
        trusted and revoked sets verify the same way, so that result is kept: a new trust
        store, a revocation or other bytes verify afresh.

        Raises: VerificationError, PackageError, ManifestError.
        """
        key = (sha256, trust.trusted, trust.revoked)
        store = self._store()
        with self.lock:
            attested = self._attested.get(key)
        if (
            attested is not None
            and attested.wasm_sha256 == wasm_sha256
            and store.known_good(wasm_sha256)
        ):
            return attested, store.path_for(wasm_sha256)
        pkg = package.verify_bytes(data, trust)
        artifact = self._artifact_for(name, sha256, wasm_sha256, trust, pkg)
        return self._remember(pkg, trust), artifact

    def _remember(
        self,
        pkg: package.VerifiedPackage,
        trust: signing.TrustStore,
        lifecycle: tuple[str, ...] | None = None,
    ) -> Attested:
        """Keep what verifying ``pkg`` against ``trust`` established (see :meth:`_attest`);
        ``lifecycle``: its module's lifecycle exports, if known already."""
        if lifecycle is None:
            lifecycle = wasm.check_module(pkg.wasm, pkg.manifest.limits.memory_mb).lifecycle
        attested = Attested(
            pkg.manifest, pkg.signer, hashlib.sha256(pkg.wasm).hexdigest(), lifecycle
        )
        with self.lock:
            if len(self._attested) >= MAX_ATTESTED:
                self._attested.clear()
            self._attested[(pkg.digest, trust.trusted, trust.revoked)] = attested
        return attested

    def _uid_hint(self) -> int:
        """The lowest uid of the range that none of our instances holds."""
        with self.lock:
            held = {
                rt.instance.uid
                for rt in self.runtimes.values()
                if rt.instance is not None and rt.instance.uid is not None
            }
        uid = self.config.uid_first
        while uid in held:
            uid += 1
        return uid

    def _store(self) -> ArtifactStore:
        assert self.artifacts is not None
        return self.artifacts

    def trust(self) -> signing.TrustStore:
        """The trust store, read again whenever its files change. Raises: KeyFileError."""
        path = self.config.trust
        stamp: list[Any] = []
        with contextlib.suppress(OSError):
            paths = [path, *sorted(path.iterdir())] if path.is_dir() else [path]
            for p in paths:
                st = p.stat()
                stamp.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
        key = tuple(stamp)
        with self.lock:
            cached = self._trust_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        trust = signing.TrustStore.load(path)
        with self.lock:
            self._trust_cache = (key, trust)
        return trust

    def _artifact_for(
        self,
        name: str,
        sha256: str,
        wasm_sha256: str,
        trust: signing.TrustStore,
        verified: package.VerifiedPackage | None = None,
    ) -> Path:
        """The compiled module of an installed package (compiled now if it is missing)."""
        store = self._store()
        if wasm_sha256 and store.known_good(wasm_sha256):
            return store.path_for(wasm_sha256)
        pkg = verified or package.verify_file(self._reg().package_path(sha256), trust)
        info = wasm.check_module(pkg.wasm, pkg.manifest.limits.memory_mb)
        path = store.ensure(pkg.wasm, info.lifecycle)
        if not wasm_sha256:
            self._reg().set_wasm_sha256(name, path.stem)
        return path

    def _launch(self, name: str) -> Instance:
        """Spawn a plugin host for ``name`` (the caller holds its op_lock). Raises: IsolateError."""
        spec = self._spec(name)
        with self.lock:
            if self.stopping:
                raise OpError("the service is stopping")
            running = self._launching + sum(
                1 for rt in self.runtimes.values() if rt.instance is not None
            )
            if running >= self.config.max_plugins:  # (starts in flight count: not yet there)
                raise OpError(f"{name}: {running} plugins run already (max_plugins)")
            # counted until its instance is registered: shutdown waits for it, so that a
            # start racing a SIGTERM is stopped like the others, not left to the fork server
            self._launching += 1
        try:
            while not self.launch_slots.acquire(timeout=0.5):
                if self.stopping:
                    raise OpError("the service is stopping")
            try:
                spawned = self.fs.spawn(spec)
            except ForkServerError:
                self.launch_slots.release()
                raise
            plan = spec["plan"]  # ours: what the instance is, before its host says anything
            inst = Instance(
                name,
                spawned,
                slot_held=True,
                instance_id=plan["instance_id"],
                version=plan["version"],
                signer=plan["signer"],
                limits=dict(spec["limits"]),
            )
            with self.lock:
                rt = self._runtime(name)
                rt.instance = inst
                rt.restart_at = None
                self._pending.append(inst)
        finally:
            with self.cond:
                self._launching -= 1
                self.cond.notify_all()
        self._wake()
        return inst

    def _wait_ready(self, inst: Instance, timeout: float, ours: bool = True) -> None:
        """Wait until ``inst`` idles. Raises OpError when it fails or ``timeout`` passes;
        then an instance the caller launched (``ours``) is ended too: one the restart policy
        launched is left to its own start timeout."""
        with self.cond:
            done = self.cond.wait_for(lambda: inst.ready or inst.gone, timeout)
        if inst.ready and not inst.gone:
            return
        if not done:
            if ours:
                inst.spawned.signal(signal.SIGTERM)
            raise OpError(f"{inst.name}: did not start within {timeout:.0f} s")
        with self.cond:
            self.cond.wait_for(lambda: inst.gone, 5.0)
        bad = inst.final is not None and bool(inst.final.get("bad_input"))
        raise OpError(
            f"{inst.name}: failed to start: {inst.cause()}",
            EXIT_BAD_INPUT if bad else EXIT_PLUGIN_FAILED,
        )

    def _command(self, inst: Instance, cmd: str, data: bytes = b"") -> dict[str, Any]:
        """Send one command to a ready plugin host and wait for its result."""
        timeout = float(inst.limits.get("timeout_s", 30)) + CALL_GRACE_S
        if not inst.cmd_lock.acquire(timeout=timeout):
            raise OpError(f"{inst.name}: busy (another command is still running)")
        try:
            with self.lock:
                if inst.gone or not inst.ready or inst.stop_requested:
                    raise OpError(f"{inst.name}: not running")
                inst.next_id += 1
                ident = inst.next_id
            message = {"cmd": cmd, "id": ident, "input": base64.b64encode(data).decode()}
            try:
                inst.spawned.channel.send(json.dumps(message).encode())
            except OSError as e:
                raise OpError(f"{inst.name}: the plugin host is gone ({e.strerror})") from None
            with self.cond:
                self.cond.wait_for(lambda: ident in inst.results or inst.gone, timeout)
                result = inst.results.pop(ident, None)
            if result is None:
                if inst.gone:
                    with self.cond:
                        self.cond.wait_for(lambda: inst.final is not None, 1.0)
                    raise OpError(f"{inst.name}: ended during {cmd}: {inst.cause()}")
                raise OpError(f"{inst.name}: no answer to {cmd} within {timeout:.0f} s")
            return result
        finally:
            inst.cmd_lock.release()

    def _stop_instance(self, inst: Instance, timeout: float) -> None:
        """STOP, then SIGTERM to the host, then SIGKILL; returns once it is gone (or bound)."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        with self.cond:
            inst.stop_requested = True
            if inst.gone:
                return
            if inst.state in ("running", "paused", "starting"):
                inst.state = "stopping"
            self.cond.wait_for(lambda: inst.ready or inst.gone, left())
        if inst.ready and not inst.gone and inst.cmd_lock.acquire(timeout=left()):
            try:
                inst.spawned.channel.send(json.dumps({"cmd": "stop", "id": 0}).encode())
            except OSError:
                pass
            finally:
                inst.cmd_lock.release()
        with self.cond:
            if self.cond.wait_for(lambda: inst.gone, left()):
                return
        log.warning("%s: no graceful stop within %.1f s; terminating its host", inst.name, timeout)
        inst.spawned.signal(signal.SIGTERM)
        with self.cond:
            if self.cond.wait_for(lambda: inst.gone, TERM_GRACE_S):
                return
        inst.spawned.signal(signal.SIGKILL)
        with self.cond:
            self.cond.wait_for(lambda: inst.gone, TERM_GRACE_S)

    # -- operations (control requests) ----------------------------------------------

    def dispatch(self, req: control.Request, peer: Peer) -> Any:
        """Carry out one validated request. Raises: IsolateError (answered as an error)."""
        if self.stopping:
            raise OpError("the service is stopping")
        op = req.op
        if op == "ping":
            return {"pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 3)}
        if op == "install":
            return self.op_install(req.fields, peer)
        if op == "uninstall":
            return self.op_uninstall(req.name, peer)
        if op == "list":
            return self.op_list()
        if op == "start":
            return self.op_start(req.name, peer)
        if op == "stop":
            return self.op_stop(req.name, peer)
        if op == "pause":
            return self.op_pause(req.name, peer, True)
        if op == "resume":
            return self.op_pause(req.name, peer, False)
        if op == "call":
            return self.op_call(req.name, req.input_bytes())
        if op == "logs":
            return self.op_logs(req.name, int(req.fields.get("n", 100)))
        if op == "audit":
            return self.op_audit(req.name, int(req.fields.get("n", 20)))
        if op == "metrics":
            return {"text": self.metrics_text()}
        raise control.RequestError(f"unknown op {op!r}")

    def _installed(self, name: str) -> Runtime:
        if self._reg().get(name) is None:
            raise RegistryError(f"{name}: not installed")
        return self._runtime(name)

    def op_install(self, fields: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Verify, check against the registry, store, record; restart a running upgrade."""
        from forgeone_isolate.package import MAX_PACKAGE_BYTES

        if "path" in fields:
            if peer.uid != 0:
                raise control.RequestError("install: by path is for root peers; send the bytes")
            data = package.read_bounded_file(Path(fields["path"]))
        else:
            data = control.b64decode(fields["package_b64"], "package_b64", MAX_PACKAGE_BYTES)
        restart = fields.get("restart")
        max_restarts = fields.get("max_restarts")
        if restart is not None and restart not in ("no", "on-failure"):
            raise control.RequestError("install: restart must be 'no' or 'on-failure'")
        if max_restarts is not None and not 0 <= max_restarts <= 1000:
            raise control.RequestError("install: max_restarts must be in 0..1000")
        trust = self.trust()
        pkg = package.verify_bytes(data, trust)
        m = pkg.manifest
        info = wasm.check_module(pkg.wasm, m.limits.memory_mb)
        self._store().ensure(pkg.wasm, info.lifecycle)  # compiled once, here
        self._remember(pkg, trust, info.lifecycle)  # (stored as they are: a start need not redo it)
        cand = Candidate(
            name=m.name,
            version=m.version,
            signer=pkg.signer,
            sha256=pkg.digest,
            dependencies=dict(m.dependencies),
            limits=m.limits.as_dict(),
            wasm_sha256=hashlib.sha256(pkg.wasm).hexdigest(),
        )
        rt = self._runtime(m.name)
        restarted = False
        with rt.op_lock:
            try:
                kind, row = self._reg().install(
                    cand, data, bool(fields.get("allow_downgrade", False)), restart, max_restarts
                )
            except RegistryError as e:
                self._audit(
                    m.name,
                    None,
                    "install",
                    {"version": str(m.version), "sha256": pkg.digest},
                    False,
                    str(e),
                    peer,
                )
                raise
            self._audit(
                m.name,
                None,
                "install",
                {"version": row.version, "sha256": row.sha256, "kind": kind},
                True,
                "installed",
                peer,
            )
            inst = rt.instance
            if kind != "same" and inst is not None and not inst.gone:
                self._stop_instance(inst, self.config.stop_timeout_s)
                # Installed whatever happens next: a failed restart is said as such, and
                # is the restart policy's to handle (a start that fails does that itself).
                failed = f"{row.name} {row.version} is installed, but did not restart"
                try:
                    new = self._launch(m.name)
                except IsolateError as e:
                    bad = isinstance(e, BadInputError)
                    self._failure(rt, None, f"restart after install: {e}", permanent=bad)
                    raise OpError(f"{failed}: {e}", EXIT_PLUGIN_FAILED) from None
                try:
                    self._wait_ready(new, START_TIMEOUT_S)
                except OpError as e:
                    raise OpError(f"{failed}: {e}", EXIT_PLUGIN_FAILED) from None
                if row.desired == "paused":
                    self._command(new, "pause")
                restarted = True
        log.info("installed %s %s (%s) from signer %s", row.name, row.version, kind, row.signer)
        return {"kind": kind, "plugin": row.as_dict(), "restarted": restarted}

    def op_uninstall(self, name: str, peer: Peer) -> dict[str, Any]:
        """Stop (if running) and remove ``name``; refused while others depend on it."""
        rt = self._installed(name)
        with rt.op_lock:
            deps = self._reg().dependents(name)
            if deps:
                names = ", ".join(f"{d.name} ({d.dependencies[name]})" for d in deps)
                raise RegistryError(f"uninstall {name}: required by {names}")
            with self.lock:
                rt.restart_at = None
            if rt.instance is not None:
                self._stop_instance(rt.instance, self.config.stop_timeout_s)
            row = self._reg().uninstall(name)
            self._store().remove_unused({r.wasm_sha256 for r in self._reg().all()})
            self._audit(
                name, None, "uninstall", {"version": row.version}, True, "uninstalled", peer
            )
            with self.lock:
                if self.runtimes.get(name) is rt and rt.instance is None:
                    del self.runtimes[name]
        log.info("uninstalled %s %s", row.name, row.version)
        return {"uninstalled": name, "version": row.version}

    def op_start(self, name: str, peer: Peer) -> dict[str, Any]:
        """Start ``name`` (desired: running) and wait until its guest idles."""
        rt = self._installed(name)
        with rt.op_lock:
            self._reg().set_desired(name, "running")
            with self.lock:
                rt.restarts = 0
                rt.restart_at = None
                rt.failed = None
                inst = rt.instance
            self._audit(name, inst, "start", {}, True, "operator", peer)
            if inst is None or inst.stop_requested:
                if inst is not None:
                    self._stop_instance(inst, self.config.stop_timeout_s)
                try:
                    inst = self._launch(name)
                except BadInputError as e:  # refused before any process: failed, audited
                    self._failure(rt, None, f"start refused: {e}", permanent=True)
                    raise
        inst = self._until_running(rt, inst, time.monotonic() + START_TIMEOUT_S)
        if inst.paused:
            self._command(inst, "resume")
        return self.describe(name)

    def _until_running(self, rt: Runtime, inst: Instance, deadline: float) -> Instance:
        """Wait for ``inst`` to idle; if it fails and the restart policy brings up another
        instance, wait for that one (until ``deadline``). Returns the running instance.

        Raises: OpError with the last cause once the policy gives up, the failure is bad
        input, the operator stopped the plugin, or the deadline passes.
        """
        ours = True  # the first is the caller's; later ones the restart policy's
        while True:
            try:
                self._wait_ready(inst, max(0.1, deadline - time.monotonic()), ours)
            except OpError as e:
                if e.exit_status == EXIT_BAD_INPUT:
                    raise

                def next_or_done(previous: Instance = inst) -> bool:
                    current = rt.instance
                    if current is not None and current is not previous:
                        return True
                    return current is None and rt.restart_at is None

                with self.cond:
                    self.cond.wait_for(next_or_done, max(0.0, deadline - time.monotonic()))
                    current = rt.instance
                row = self._reg().get(rt.name)
                if (
                    current is None
                    or current is inst
                    or row is None
                    or row.desired not in ("running", "paused")
                    or time.monotonic() >= deadline
                ):
                    raise
                inst = current
                ours = False
                continue
            return inst

    def op_stop(self, name: str, peer: Peer) -> dict[str, Any]:
        """Stop ``name`` gracefully (desired: stopped)."""
        rt = self._installed(name)
        with rt.op_lock:
            self._reg().set_desired(name, "stopped")
            with self.lock:
                rt.restart_at = None
                rt.failed = None
                inst = rt.instance
            self._audit(name, inst, "stop", {}, True, "operator", peer)
            if inst is not None:
                self._stop_instance(inst, self.config.stop_timeout_s)
        return self.describe(name)

    def op_pause(self, name: str, peer: Peer, pause: bool) -> dict[str, Any]:
        """Pause (guest pause(), then freeze the cgroup) or resume (thaw, guest resume())."""
        rt = self._installed(name)
        with rt.op_lock:
            inst = rt.instance
            if inst is None or not inst.ready or inst.gone or inst.stop_requested:
                raise OpError(f"{name}: not running")
            if inst.paused != pause:
                result = self._command(inst, "pause" if pause else "resume")
                if result.get("kind") != "OK":
                    raise OpError(
                        f"{name}: {'pause' if pause else 'resume'} failed ({result.get('kind')})"
                    )
            self._reg().set_desired(name, "paused" if pause else "running")
            self._audit(name, inst, "pause" if pause else "resume", {}, True, "operator", peer)
        return self.describe(name)

    def op_call(self, name: str, data: bytes) -> dict[str, Any]:
        """Call the guest's ``handle`` with ``data``; its ``output`` is returned."""
        rt = self._installed(name)
        inst = rt.instance
        if inst is None or inst.gone or inst.stop_requested:
            raise OpError(f"{name}: not running")
        if not inst.ready:
            self._wait_ready(inst, START_TIMEOUT_S)
        if inst.paused:
            raise OpError(f"{name}: paused (resume it first)")
        result = self._command(inst, "call", data)
        output = base64.b64decode(str(result.get("output", "")))
        try:
            text: str | None = output.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if result.get("kind") != "OK":
            raise OpError(
                f"{name}: handle failed (code {result.get('code')}, {result.get('kind')})"
            )
        return {
            "output": text,
            "output_b64": base64.b64encode(output).decode(),
            "code": result.get("code"),
        }

    def op_logs(self, name: str, n: int) -> dict[str, Any]:
        """The last ``n`` log lines the plugin wrote (kept across restarts, in memory)."""
        from forgeone_isolate.pluginhost import level_name

        rt = self._installed(name)
        with self.lock:
            lines = list(rt.logs)[-n:]
        return {
            "name": name,
            "lines": [{"time": t, "level": level_name(lv), "text": s} for t, lv, s in lines],
        }

    def op_audit(self, name: str, n: int) -> dict[str, Any]:
        """The tail of the plugin's audit log and whether its hash chain holds."""
        from forgeone_isolate import audit

        path = self.audit_path(name)
        if not path.exists():
            if self._reg().get(name) is None:
                raise RegistryError(f"{name}: not installed and no audit log")
            return {
                "path": str(path),
                "records": [],
                "verify": {"ok": True, "records": 0, "reason": "no audit log yet"},
            }
        try:
            result = audit.verify(path)
            tail = _tail_lines(path, n, audit.MAX_LINE_BYTES)
        except OSError as e:  # (a symlink in its place, say: not followed)
            raise OpError(f"{name}: audit log {path}: {e.strerror or e}") from None
        records: list[Any] = []
        for line in tail:
            try:
                if len(line) > audit.MAX_LINE_BYTES:
                    raise ValueError("longer than any record")
                records.append(json.loads(line))
            except (ValueError, RecursionError):
                records.append({"unparsable": line[:200].decode("utf-8", "replace")})
        return {
            "path": str(path),
            "records": records,
            "verify": {
                "ok": result.ok,
                "records": result.records,
                "line": result.line,
                "reason": result.reason,
            },
        }

    def describe(self, name: str) -> dict[str, Any]:
        """One plugin's line of ``list``."""
        row = self._reg().get(name)
        if row is None:
            raise RegistryError(f"{name}: not installed")
        rt = self._runtime(name)
        with self.lock:
            inst = rt.instance
            out: dict[str, Any] = {
                "name": row.name,
                "version": row.version,
                "signer": row.signer,
                "desired": row.desired,
                "restart_policy": row.restart_policy or self.config.restart.policy,
                "restarts": rt.total_restarts,
                "last_exit": rt.last_exit,
            }
            if inst is not None and not inst.gone:
                out.update(
                    state=inst.state,
                    pid=inst.pid1,
                    host_pid=inst.spawned.pid,
                    instance=inst.instance_id,
                    uptime_s=round(time.monotonic() - (inst.ready_at or inst.started_at), 3),
                    limits=inst.limits or row.limits,
                    cgroups=list(inst.cgroups),
                    isolation={
                        k: inst.isolation.get(k)
                        for k in ("seccomp", "no_new_privs", "cap_eff", "namespaces")
                    },
                )
                dirs = list(inst.cgroups)
            else:
                state = "stopped"
                if rt.restart_at is not None:
                    state = "restarting"
                elif rt.failed is not None:
                    state = "failed"
                out.update(state=state, pid=None, uptime_s=None, limits=row.limits)
                if rt.failed:
                    out["failed"] = rt.failed
                dirs = []
        out["usage"] = cgroup_usage(dirs) if dirs else {}
        return out

    def op_list(self) -> dict[str, Any]:
        """Every installed plugin with its state, pid, uptime, limits and usage."""
        return {"plugins": [self.describe(r.name) for r in self._reg().all()]}

    def metrics_text(self, cached: bool = False) -> str:
        """Prometheus text: accumulated per-plugin counters and live gauges. ``cached``
        (the HTTP endpoint, open to anyone on the host): rendered at most once per
        METRICS_CACHE_S."""
        if not cached:
            return self._render_metrics()
        with self._metrics_lock:
            last = self._metrics_cache
            if last is not None and time.monotonic() - last[0] < METRICS_CACHE_S:
                return last[1]
            text = self._render_metrics()
            self._metrics_cache = (time.monotonic(), text)
            return text

    def _render_metrics(self) -> str:
        from forgeone_isolate.metrics import MetricsStore, exposition

        rows: list[dict[str, Any]] = []
        path = self.config.state_dir / "metrics.sqlite3"
        if path.exists():
            store = MetricsStore(path)
            try:
                rows = store.rows()
            finally:
                store.close()
        live: list[dict[str, Any]] = []
        with self.lock:
            running = [
                (rt.name, list(rt.instance.cgroups))
                for rt in self.runtimes.values()
                if rt.instance is not None and rt.instance.ready and not rt.instance.gone
            ]
        for name, dirs in running:
            usage = cgroup_usage(dirs)
            live.append(
                {
                    "plugin": name,
                    "memory_current_bytes": usage.get("memory_bytes", 0),
                    "pids_current": usage.get("pids", 0),
                    "running": 1,
                }
            )
        text = exposition(rows, live)
        text += (
            "# HELP forgeone_service_plugins_running Plugins running now.\n"
            "# TYPE forgeone_service_plugins_running gauge\n"
            f"forgeone_service_plugins_running {len(running)}\n"
        )
        return text


def _tail_lines(path: Path, n: int, max_line: int, chunk: int = 64 * 1024) -> list[bytes]:
    """The last ``n`` lines of a file, read backwards from its end, never through a symlink.

    Whatever the file holds (a line with no end, gigabytes of zeros), at most about
    ``n * (max_line + 1)`` bytes are read, and each line returned is at most ``max_line``
    bytes (a longer one is cut: no record of ours is that long).
    """
    from forgeone_isolate.audit import open_log

    with os.fdopen(open_log(path), "rb") as f:
        end = pos = f.seek(0, os.SEEK_END)
        budget = n * (max_line + 1) + chunk
        pieces: list[bytes] = []
        newlines = 0
        while pos > 0 and newlines <= n and end - pos < budget:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            piece = f.read(step)
            pieces.append(piece)
            newlines += piece.count(b"\n")
    data = b"".join(reversed(pieces))
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the file's last newline ends the last line
    if pos > 0 and len(lines) > 1:
        lines = lines[1:]  # the first one may be cut (unless it is all there is: shown cut)
    return [line[: max_line + 1] for line in lines[-n:]]


def _own_cgroups() -> set[str]:
    """Our own cgroup in the unified (v2) hierarchy: what systemd's Delegate=yes hands us.

    Only that path is declared delegated; a v1 hierarchy counts as delegated only where our
    cgroup there is the same path (as under systemd), never a foreign one.
    """
    out: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[1] == "" and parts[2]:
                out.add(parts[2])
    return out


# --------------------------------------------------------------------------- control socket


class ControlServer:
    """The control socket: accept, authorize, then one request → one response, in order."""

    def __init__(self, service: Service, path: Path, gid: int | None, max_connections: int) -> None:
        self.service = service
        self.path = path
        self.gid = gid
        self.slots = threading.BoundedSemaphore(max_connections)
        self.root_slots = threading.BoundedSemaphore(ROOT_RESERVED_CONNECTIONS)
        self.sock: socket.socket | None = None
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._inode: int | None = None

    def bind(self) -> None:
        """Create the socket (0600 root, or 0660 root:group). Raises: OpError."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists() or path.is_symlink():
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise OpError(f"control socket {path}: exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a service that died
            else:
                raise OpError(f"control socket {path}: another service is listening there")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        except OSError as e:
            sock.close()
            raise OpError(f"control socket {path}: cannot bind: {e.strerror}") from None
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(path, 0, self.gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        sock.listen(128)
        sock.settimeout(0.5)
        self.sock = sock
        self._inode = os.lstat(path).st_ino

    def serve(self) -> None:
        """The accept loop (a thread)."""
        assert self.sock is not None
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)
                continue
            slot = self._take_slot(conn)
            if slot is None:
                with contextlib.suppress(OSError):
                    conn.settimeout(1.0)
                    conn.sendall(control.error("too many connections; try again"))
                conn.close()
                continue
            threading.Thread(target=self._handle, args=(conn, slot), daemon=True).start()

    def _take_slot(self, conn: socket.socket) -> threading.BoundedSemaphore | None:
        """A connection slot for ``conn``: a shared one, else (for root) a reserved one."""
        if self.slots.acquire(blocking=False):
            return self.slots
        try:
            root = peer_credentials(conn).uid == 0
        except OSError:
            return None
        if root and self.root_slots.acquire(blocking=False):
            return self.root_slots
        return None

    def _handle(self, conn: socket.socket, slot: threading.BoundedSemaphore) -> None:
        try:
            with self._lock:
                self._conns.add(conn)
            conn.settimeout(CONNECTION_IDLE_S)
            try:
                peer, refusal = authorize(conn, self.gid)
            except OSError:
                return
            if refusal is not None:
                log.warning("control: refused %s", refusal)
                with contextlib.suppress(OSError):
                    conn.sendall(control.error(refusal, EXIT_PLUGIN_FAILED))
                return
            reader = conn.makefile("rb")
            try:
                self._requests(conn, reader, peer)
            finally:
                reader.close()
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()
            slot.release()

    def _requests(self, conn: socket.socket, reader: Any, peer: Peer) -> None:
        last_request = time.monotonic()
        while not self._closed:
            line = reader.readline(control.MAX_REQUEST_BYTES + 1)
            if not line:
                return
            if time.monotonic() - last_request > CONNECTION_IDLE_S:
                return  # idle: blank lines now and then keep no connection for ever
            if len(line) > control.MAX_REQUEST_BYTES and not line.endswith(b"\n"):
                conn.sendall(
                    control.error(
                        f"request larger than {control.MAX_REQUEST_BYTES} bytes", EXIT_BAD_INPUT
                    )
                )
                return  # no way to find the next request's start: hang up
            if not line.strip():
                continue
            conn.sendall(self._answer(line, peer))
            last_request = time.monotonic()

    def _answer(self, line: bytes, peer: Peer) -> bytes:
        try:
            req = control.parse_request(line)
            log.debug("control: uid %d: %s", peer.uid, req.op)
            return control.ok(self.service.dispatch(req, peer))
        except IsolateError as e:
            return control.error(str(e), e.exit_status)
        except Exception as e:
            log.exception("control: request failed")
            return control.error(f"internal error: {type(e).__name__}: {e}", EXIT_PLUGIN_FAILED)

    def close(self) -> None:
        """Stop accepting, unlink the socket, hang up on clients."""
        self._closed = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        with contextlib.suppress(OSError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()  # ours, not one another service made meanwhile
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- metrics HTTP


def start_metrics_server(service: Service, listen: tuple[str, int]) -> ThreadingHTTPServer:
    """The Prometheus endpoint (``GET /metrics``) on a loopback address. Raises: OpError."""
    host, port = listen
    if not ipaddress.ip_address(host).is_loopback:
        raise OpError(f"metrics: {host} is not a loopback address")

    class Handler(BaseHTTPRequestHandler):
        server_version = "forgeone-isolate"
        timeout = METRICS_IO_TIMEOUT_S  # (the connection's socket: a silent client goes)

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = service.metrics_text(cached=True).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics: " + format, *args)

    class Server(ThreadingHTTPServer):
        """At most METRICS_MAX_CLIENTS at once; the others are hung up on at once (anyone
        on the host can connect: a thread each, unbounded, was theirs to take)."""

        daemon_threads = True
        block_on_close = False
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        clients = threading.BoundedSemaphore(METRICS_MAX_CLIENTS)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.clients.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.clients.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.clients.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            # a client that went away (or stalled past the timeout) is no traceback
            log.debug("metrics: %s: %s", client_address, sys.exc_info()[1])

    try:
        return Server((host, port), Handler)
    except OSError as e:
        raise OpError(f"metrics: cannot listen on {host}:{port}: {e.strerror}") from None


# --------------------------------------------------------------------------- serve


def serve(config: ServiceConfig) -> int:
    """Run the service until SIGTERM/SIGINT. Returns the exit status.

    Order matters: the fork server is started first, while this process has one thread;
    only then do threads, sockets and databases exist.
    """
    from forgeone_isolate.pluginhost import plugin_host_main, preload

    setup_logging(config.log_level)
    if os.geteuid() != 0:
        log.error("serve must run as root (it creates namespaces, cgroups and uid maps)")
        return EXIT_PLUGIN_FAILED
    problem: str | None = None
    try:
        fs = ForkServer.start(plugin_host_main, preload=preload)
    except ForkServerError as e:
        problem = str(e)
    if problem is not None:
        log.error("%s", problem)
        return EXIT_PLUGIN_FAILED
    service = Service(config, fs)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        service.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    failure: IsolateError | None = None
    try:
        service.start()
    except IsolateError as e:
        failure = e
    if failure is not None:
        log.error("cannot start: %s", failure)
        service.stopping = True
        service.shutdown()
        return failure.exit_status
    log.info(
        "serving on %s (state %s, %d plugin(s) installed, fork server pid %d)",
        config.control_socket,
        config.state_dir,
        len(service.runtimes),
        fs.pid,
    )
    sdnotify.ready(f"serving on {config.control_socket}")
    service.wait()
    sdnotify.stopping("stopping plugins")
    service.shutdown()
    log.info("stopped")
    if service.fatal is not None:
        return EXIT_PLUGIN_FAILED
    return EXIT_OK


__all__ = [
    "ControlServer",
    "Instance",
    "OpError",
    "Runtime",
    "Service",
    "authorize",
    "cgroup_usage",
    "remove_cgroup_dirs",
    "serve",
]
