"""The fork server: a small single-threaded process that forks the service's plugin hosts.

The service is multi-threaded, and a multi-threaded process must not fork (a lock held by
another thread stays locked in the child forever; ``unshare(CLONE_NEWUSER)`` refuses it).
So ``serve`` starts this process first, before any thread exists: it imports the launch
modules (wasmtime, pyseccomp, pyroute2) once, freezes the garbage collector's view of them
(so its children share those pages), and then only forks.

Channels (both ``AF_UNIX``/``SOCK_SEQPACKET``, one JSON object per message):

- requests (service → fork server, answered in order)::

      {"op": "spawn", "spec": {...}, "id": I}  ->  {"ok": true, "pid": N, "id": I}
                                                  + SCM_RIGHTS [channel, pidfd]
      {"op": "ping", "id": I}                  ->  {"ok": true, "pid": N, "children": K, "id": I}

  A reply echoes its request's ``id``: one that arrives after its request timed out is
  dropped, not taken for the next request's.

  ``channel`` is the service's end of a new socketpair whose other end is the plugin
  host's; ``pidfd`` (``pidfd_open``) lets the service signal the host without a pid race.
- events (fork server → service)::

      {"ev": "exited", "pid": N, "status": S}     (the raw wait status)

Lifetime: the fork server has ``PR_SET_PDEATHSIG(SIGKILL)`` (it dies with the service);
every plugin host it forks has ``PR_SET_PDEATHSIG(SIGTERM)``: while its plugin runs, the
host catches it, kills the sandbox (thawing a paused one first: a task frozen by the v1
freezer does not act on SIGKILL) and removes its cgroups, then exits; before that it just
dies. So a ``kill -9`` of the service takes every plugin with it. When the service closes
the request channel, the fork server terminates its children and exits.
"""

from __future__ import annotations

import array
import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from forgeone_isolate._sys import libc
from forgeone_isolate.errors import IsolateError

MAX_MESSAGE: Final = 256 * 1024
#: how long a spawn's answer may take (a fork, a socketpair, a pidfd: milliseconds)
SPAWN_TIMEOUT_S: Final = 10.0
#: exit status of a fork server or plugin host whose setup broke before its main ran
EXIT_INTERNAL: Final = 70

HostMain = Callable[[dict[str, Any], socket.socket], NoReturn]


class ForkServerError(IsolateError):
    """Raised when the fork server cannot be started or does not answer a request."""


def _decode_reply(msg: bytes) -> dict[str, Any] | None:
    try:
        reply = json.loads(msg) if msg else None
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


@dataclass
class Spawned:
    """A plugin host the fork server just forked."""

    pid: int
    channel: socket.socket
    pidfd: int | None
    #: held while the pidfd is used or closed: a closed number can be another's pidfd next
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _pidfd_closed: bool = field(default=False, repr=False, compare=False)

    def signal(self, sig: int) -> bool:
        """Send ``sig`` through the pidfd (no pid-reuse race). False if it is gone. Only a
        host that never had a pidfd (a kernel before 5.3) is signalled by its pid."""
        with self._lock:
            try:
                if self.pidfd is not None:
                    signal.pidfd_send_signal(self.pidfd, sig)
                elif self._pidfd_closed:
                    return False  # reaped and released: the pid may be another process's
                else:
                    os.kill(self.pid, sig)
            except (ProcessLookupError, OSError):
                return False
            return True

    def close_pidfd(self) -> None:
        """Release the pidfd (the host is gone); later signals are refused."""
        with self._lock:
            if self.pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.pidfd)
                self.pidfd = None
                self._pidfd_closed = True

    def close(self) -> None:
        """Release the channel and the pidfd."""
        with contextlib.suppress(OSError):
            self.channel.close()
        self.close_pidfd()


def default_preload() -> None:
    """Import what plugin hosts need, once, before the first fork."""
    import pyroute2  # noqa: F401 - imported for its side effect: loaded once, shared
    import wasmtime  # noqa: F401

    from forgeone_isolate import (  # noqa: F401
        audit,
        broker,
        cgroup,
        child,
        guest,
        kvstore,
        launch,
        metrics,
        netns,
        package,
        plan,
        policy,
        seccomp_filter,
        signing,
        uidpool,
        wasm,
    )


class ForkServer:
    """The service's handle on its fork server (made by :meth:`start`). Thread-safe."""

    def __init__(self, pid: int, requests: socket.socket, events: socket.socket) -> None:
        self.pid = pid
        self._requests = requests
        self.events = events
        self._lock = threading.Lock()
        self._closed = False
        self._seq = 0  # the last request's number (the reply echoes it)

    @classmethod
    def start(
        cls, host_main: HostMain, preload: Callable[[], None] | None = default_preload
    ) -> ForkServer:
        """Fork the fork server. Call while this process has a single thread.

        Raises: ForkServerError when threads exist already or it does not come up.
        """
        if threading.active_count() != 1:
            raise ForkServerError(
                "the fork server must start before any thread exists"
                f" ({threading.active_count()} threads)"
            )
        req_parent, req_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ev_parent, ev_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                req_parent.close()
                ev_parent.close()
                _serve(req_child, ev_child, host_main, preload, parent_pid)
            finally:
                os._exit(EXIT_INTERNAL)
        req_child.close()
        ev_child.close()
        server = cls(pid, req_parent, ev_parent)
        try:
            server.ping(timeout=60.0)
        except ForkServerError:
            server.close(timeout=1.0)
            raise
        return server

    def _ask(self, request: dict[str, Any], timeout: float) -> tuple[dict[str, Any], list[int]]:
        """Send one request, return its reply and the descriptors passed with it.

        Every request carries a number the reply echoes: a reply that comes after its
        request timed out is recognised as stale and thrown away (its descriptors closed:
        a host whose channel closes stops at its next idle moment), so the next request is
        never answered with another's reply, a host that is not its own included.
        """
        with self._lock:
            if self._closed:
                raise ForkServerError("the fork server is closed")
            self._seq += 1
            ident = self._seq
            deadline = time.monotonic() + timeout
            try:
                self._requests.send(json.dumps({**request, "id": ident}).encode())
                while True:
                    self._requests.settimeout(max(0.001, deadline - time.monotonic()))
                    msg, fds, _flags, _addr = socket.recv_fds(self._requests, MAX_MESSAGE, 2)
                    reply = _decode_reply(msg)
                    if reply is not None and reply.get("id") == ident:
                        return reply, list(fds)
                    for fd in fds:
                        os.close(fd)
                    if not msg:
                        raise ForkServerError("the fork server has gone")
                    if reply is None:
                        raise ForkServerError("the fork server sent garbage")
                    # an earlier request's late answer: dropped, ours still to come
            except (OSError, TimeoutError) as e:
                raise ForkServerError(f"the fork server does not answer: {e}") from None

    def ping(self, timeout: float = 10.0) -> dict[str, Any]:
        """Check that it answers. Raises: ForkServerError."""
        reply, fds = self._ask({"op": "ping"}, timeout)
        for fd in fds:
            os.close(fd)
        return reply

    def spawn(self, spec: dict[str, Any], timeout: float = SPAWN_TIMEOUT_S) -> Spawned:
        """Fork a plugin host that runs ``host_main(spec, channel)``. Raises: ForkServerError."""
        reply, fds = self._ask({"op": "spawn", "spec": spec}, timeout)
        if not reply.get("ok") or not fds or not isinstance(reply.get("pid"), int):
            for fd in fds:
                os.close(fd)
            raise ForkServerError(f"spawn refused: {reply.get('error', 'no channel passed')}")
        channel = socket.socket(fileno=fds[0])
        return Spawned(int(reply["pid"]), channel, fds[1] if len(fds) > 1 else None)

    def read_events(self) -> list[dict[str, Any]] | None:
        """Every pending event (non-blocking); None once the fork server has gone."""
        out: list[dict[str, Any]] = []
        while True:
            try:
                msg = self.events.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            except OSError:
                return None
            if not msg:
                return out or None
            with contextlib.suppress(ValueError):
                obj = json.loads(msg)
                if isinstance(obj, dict):
                    out.append(obj)

    def close(self, timeout: float = 5.0) -> None:
        """Close the request channel (the fork server kills its children and exits); reap it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                self._requests.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                break
            time.sleep(0.01)
        with contextlib.suppress(OSError):
            self.events.close()


# ---------------------------------------------------------------------- the fork server


def _set_pdeathsig(sig: int, name: str) -> None:
    import prctl  # python-prctl

    prctl.set_pdeathsig(sig)
    prctl.set_name(name[:15])  # what ps and /proc/<pid>/comm show


def _serve(
    req: socket.socket,
    events: socket.socket,
    host_main: HostMain,
    preload: Callable[[], None] | None,
    parent_pid: int,
) -> NoReturn:
    """The fork server's one loop. Never returns."""
    _set_pdeathsig(signal.SIGKILL, "forgeone-forksv")
    if os.getppid() != parent_pid:
        os._exit(0)
    os.setpgid(0, 0)  # a terminal's ^C reaches the service only; it stops plugins in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the service closes our channel instead
    if preload is not None:
        preload()
    gc.collect()
    gc.freeze()  # children never touch the preloaded objects' GC headers: pages stay shared
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(req, selectors.EVENT_READ, "req")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    my_pid = os.getpid()

    def spawn(spec: dict[str, Any]) -> tuple[int, socket.socket, int | None]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Single-threaded (as started; a preload could have started a thread): a fork
        # without the interpreter's after-fork hooks, whose writes copy shared pages.
        lean = threading.active_count() == 1 and libc.task_count() == 1
        pid = libc.fork_lean() if lean else os.fork()
        if pid == 0:  # the plugin host
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                sel.close()
                for fd in (wake_r, wake_w):
                    os.close(fd)
                for s in (req, events, ours):
                    s.close()
                # SIGTERM, not SIGKILL: a plugin host catches it while its plugin runs and
                # tears the sandbox down (a v1-frozen plugin must be thawed to die).
                _set_pdeathsig(signal.SIGTERM, f"fo-{spec.get('name', 'host')}")
                if os.getppid() != my_pid:
                    os._exit(0)
                host_main(spec, theirs)
            finally:
                os._exit(EXIT_INTERNAL)
        theirs.close()
        children.add(pid)
        pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(pid)
        return pid, ours, pidfd

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            children.discard(pid)
            with contextlib.suppress(OSError):
                events.send(json.dumps({"ev": "exited", "pid": pid, "status": status}).encode())

    try:
        while True:
            for key, _ in sel.select():
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 4096):
                            pass
                    reap()
                    continue
                try:
                    msg = req.recv(MAX_MESSAGE)
                except InterruptedError:
                    continue
                if not msg:
                    raise SystemExit(0)
                try:
                    request = json.loads(msg)
                    op = request.get("op") if isinstance(request, dict) else None
                except ValueError:
                    op = None
                ident = request.get("id") if op is not None else None  # echoed in the reply
                if op == "spawn" and isinstance(request.get("spec"), dict):
                    try:
                        pid, ours, pidfd = spawn(request["spec"])
                    except OSError as e:
                        reply = {"ok": False, "error": str(e), "id": ident}
                        req.send(json.dumps(reply).encode())
                        continue
                    fds = [ours.fileno()] + ([pidfd] if pidfd is not None else [])
                    try:
                        req.sendmsg(
                            [json.dumps({"ok": True, "pid": pid, "id": ident}).encode()],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                        )
                    finally:
                        ours.close()
                        if pidfd is not None:
                            os.close(pidfd)
                elif op == "ping":
                    reply = {"ok": True, "pid": my_pid, "children": len(children), "id": ident}
                    req.send(json.dumps(reply).encode())
                else:
                    reply = {"ok": False, "error": "unknown request", "id": ident}
                    req.send(json.dumps(reply).encode())
    except BaseException:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        os._exit(0)


__all__ = [
    "SPAWN_TIMEOUT_S",
    "ForkServer",
    "ForkServerError",
    "HostMain",
    "Spawned",
    "default_preload",
]
