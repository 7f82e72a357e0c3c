"""The broker: the parent's judge of every request the child makes.

The identity (signer, plugin, version, instance) is bound to the channel by the parent when
the broker is made, never taken from a message. Each request is decoded and validated by
``protocol`` before dispatch; the decision comes from ``policy`` (the plugin's effective
permissions: what its manifest asked for and the operator granted); every decision is an
audit record. Denials are written and flushed (fsync) before the answer goes back; allows
are fsynced in batches (see ``audit``). Repeated abuse (malformed frames, or a flood past
the rate limit) makes :attr:`Broker.abusive` true and the supervisor kills the plugin.

The broker never trusts a length or a pointer from the child: those were checked by the
child's shims against guest memory, and are checked again here against the frame.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from forgeone_isolate import abi, fsaccess, policy
from forgeone_isolate import protocol as p
from forgeone_isolate.audit import AuditLog, summarize
from forgeone_isolate.errors import BrokerProtocolError
from forgeone_isolate.kvstore import KvStore, QuotaExceeded

MAX_VIOLATIONS = 16
#: rate-limited calls tolerated before the flood counts as abuse
MAX_RATE_DENIALS = 10_000
MAX_KEPT_LOGS = 1000
MAX_OUTPUT = 1024 * 1024
#: one net_connect's whole budget, over every address its name resolved to
CONNECT_TIMEOUT_S = 5.0
#: addresses tried per net_connect (a name the plugin's author answers for could resolve
#: to hundreds of silent ones; each would block the plugin's supervisor until its timeout)
MAX_CONNECT_ADDRESSES = 4
EAGAIN = -errno.EAGAIN
#: at most one audit record per this many seconds for rate-limited calls (a flood)
RATE_AUDIT_INTERVAL_S = 1.0
EDQUOT = -errno.EDQUOT

Resolver = Callable[[str, int], Sequence[str]]
#: (address, port, timeout) -> a connected TCP descriptor; raises OSError
Connector = Callable[[str, int, float], int]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for *_, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in out:
            out.append(addr)
    return out


@dataclass(frozen=True)
class Identity:
    """Who is on the other end of a channel, as the parent established it."""

    signer: str
    plugin: str
    version: str
    instance: str

    @property
    def owner(self) -> str:
        """The key of the plugin's persistent state (kv): stable across launches."""
        return f"{self.signer}/{self.plugin}"

    def as_dict(self) -> dict[str, str]:
        return {
            "signer": self.signer,
            "plugin": self.plugin,
            "version": self.version,
            "instance": self.instance,
        }


@dataclass
class BrokerStats:
    """Counters for the launch report."""

    allowed: int = 0
    denied: int = 0
    violations: int = 0
    rate_denied: int = 0
    by_op: dict[str, int] = field(default_factory=dict)


class Reply(NamedTuple):
    """One answer: the frame, and a descriptor to pass with it (the caller closes it).

    A NamedTuple rather than a frozen dataclass: one is built per call on the hot path."""

    frame: bytes
    fd: int | None = None


def sanitize(text: bytes, limit: int = p.MAX_LOG) -> str:
    """Guest text made safe for a terminal or a log: no control characters, no escapes."""
    s = text[:limit].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in s)


class Broker:
    """Judges one plugin's requests under its effective permissions."""

    def __init__(
        self,
        identity: Identity,
        effective: policy.Effective,
        on_log: Callable[[int, str], None],
        audit: AuditLog | None = None,
        kv: KvStore | None = None,
        resolver: Resolver = system_resolver,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.effective = effective
        self.stats = BrokerStats()
        self.done: p.Done | None = None
        #: what the guest output during the current command (reset at each command)
        self.output = bytearray()
        #: everything it output in this run, for a one-shot report (capped at MAX_OUTPUT)
        self.all_output = bytearray()
        self.logs_dropped = 0
        self._on_log = on_log
        self._audit = audit
        self._kv = kv
        self._resolver = resolver
        #: the sequence number of the child's pending IDLE request, if it is waiting
        self.idle_seq: int | None = None
        #: (code, kind) the child reported with its last IDLE: the previous command's outcome
        self.last_result: tuple[int, p.DoneKind] = (0, p.DoneKind.OK)
        #: set by the launcher once the plugin has its own shaped network namespace
        self.connector: Connector | None = None
        self._clock = clock
        self._limiter = policy.RateLimiter(effective.rate_per_s, effective.burst, clock)
        self._rate_audited_at = -RATE_AUDIT_INTERVAL_S

    @property
    def abusive(self) -> bool:
        """True once the child broke the protocol or flooded too often: kill it."""
        return self.stats.violations >= MAX_VIOLATIONS or self.stats.rate_denied >= MAX_RATE_DENIALS

    # ------------------------------------------------------------------ dispatch

    def handle(self, frame: bytes, fds_received: int = 0) -> Reply | None:
        """One request in, one reply out (None when no reply is due)."""
        started = time.perf_counter_ns()
        if fds_received:
            self.stats.violations += 1
            self._deny_raw("fds", f"{fds_received} descriptor(s) sent by the child", started)
            return None
        try:
            req = p.decode_request(frame)
        except p.UnknownOpError as e:
            # (answered, for a newer guest's sake, but within the rate: each denial's audit
            # record is written durably, and this costs the child nothing to send)
            if self._limiter.allow():
                self._deny_raw(f"op{e.op}", "unknown call: -ENOSYS", started)
            else:
                self._rate_limited(f"op{e.op}", started)
            return Reply(p.encode_reply_raw(e.op, e.seq, abi.ENOSYS))
        except BrokerProtocolError as e:
            self.stats.violations += 1
            self._deny_raw("malformed", f"{e} ({len(frame)} bytes)", started)
            return None  # nothing in the frame can be trusted, not even its sequence number
        body = req.body
        self._count(p.OP_NAMES[req.op])
        if isinstance(body, p.Done):
            if self.done is None:
                self.done = body
            else:
                self.stats.violations += 1
                self._deny_raw("done", "a second DONE", started)
            return None
        if isinstance(body, p.Idle):
            if self.idle_seq is not None:
                self.stats.violations += 1
                self._deny_raw("idle", "IDLE while already idle", started)
                return None
            self.idle_seq = req.seq
            self.last_result = (body.code, body.kind)
            return None  # answered by answer_idle() when the parent has a command
        if not self._limiter.allow():
            self._rate_limited(p.OP_NAMES[req.op], started)
            return Reply(p.encode_reply(req.op, req.seq, EAGAIN))
        result, data, fd, args, reason = self._dispatch(body)
        allowed = result >= 0
        if allowed:
            self.stats.allowed += 1
        else:
            self.stats.denied += 1
        self._record(req.op, args, allowed, reason, started)
        return Reply(p.encode_reply(req.op, req.seq, result, data), fd)

    def _dispatch(self, body: p.Request) -> tuple[int, bytes, int | None, dict[str, Any], str]:
        """(result, reply data, descriptor to pass, audit args, reason)."""
        if isinstance(body, p.Log):
            return self._log(body)
        if isinstance(body, p.ClockNow):
            return time.time_ns(), b"", None, {}, "allowed"
        if isinstance(body, p.Random):
            return body.length, os.urandom(body.length), None, {"length": body.length}, "allowed"
        if isinstance(body, p.ConfigGet):
            return self._config_get(body)
        if isinstance(body, p.KvGet | p.KvSet):
            return self._kv_op(body)
        if isinstance(body, p.FsOpen):
            return self._fs_open(body)
        if isinstance(body, p.NetConnect):
            return self._net_connect(body)
        if isinstance(body, p.Output):
            return self._output(body)
        return abi.ENOSYS, b"", None, {}, "unknown call"  # pragma: no cover - decoder covers ops

    def answer_idle(self, command: p.Command, data: bytes = b"") -> Reply:
        """The reply to the pending IDLE: the next command for the guest.

        Raises: BrokerProtocolError when the child is not waiting.
        """
        if self.idle_seq is None:
            raise BrokerProtocolError("the child is not idle")
        seq, self.idle_seq = self.idle_seq, None
        self.output.clear()  # what the guest outputs from here on answers this command
        return Reply(p.encode_reply(p.Op.IDLE, seq, int(command), data[: p.MAX_DATA]))

    # ------------------------------------------------------------------ ops

    def _log(self, body: p.Log) -> tuple[int, bytes, int | None, dict[str, Any], str]:
        text = sanitize(body.message)
        self._on_log(body.level, text)
        return (
            0,
            b"",
            None,
            {"level": abi.LOG_LEVELS[body.level], "message": summarize(body.message)},
            "allowed",
        )

    def _config_get(self, body: p.ConfigGet) -> tuple[int, bytes, int | None, dict[str, Any], str]:
        key = body.key.decode("utf-8", "replace")
        args = {"key": sanitize(body.key, 128)}
        decision = policy.check_config(self.effective, key)
        if not decision.allowed:
            return abi.EPERM, b"", None, args, decision.reason
        value = self.effective.config[key].encode()
        return len(value), value[: body.buflen], None, args, "allowed"

    def _kv_op(self, body: p.KvGet | p.KvSet) -> tuple[int, bytes, int | None, dict[str, Any], str]:
        args: dict[str, Any] = {"key": summarize(body.key)}
        decision = policy.check_kv(self.effective)
        if not decision.allowed:
            return abi.EPERM, b"", None, args, decision.reason
        if self._kv is None:
            return abi.EIO, b"", None, args, "no kv store configured"
        try:
            if isinstance(body, p.KvGet):
                value = self._kv.get(self.identity.owner, body.key)
                if value is None:
                    return abi.ENOENT, b"", None, args, "no such key"
                return len(value), value[: body.buflen], None, args, "allowed"
            args["value"] = summarize(body.value)
            self._kv.set(self.identity.owner, body.key, body.value, self.effective.kv_quota_bytes)
        except QuotaExceeded as e:
            return EDQUOT, b"", None, args, str(e)
        except sqlite3.Error as e:  # (locked past its timeout, a full disk): this call fails
            return abi.EIO, b"", None, args, f"kv store: {str(e)[:120]}"
        return 0, b"", None, args, "allowed"

    def _fs_open(self, body: p.FsOpen) -> tuple[int, bytes, int | None, dict[str, Any], str]:
        path = body.path.decode("utf-8", "replace")
        args: dict[str, Any] = {"path": sanitize(body.path, 256), "flags": body.flags}
        try:
            mode = fsaccess.Mode(body.flags)
        except ValueError:
            return (
                abi.EINVAL,
                b"",
                None,
                args,
                f"flags {body.flags} are not 0 (read), 1 (write) or 2 (create)",
            )
        decision, root, relative = policy.check_fs(
            self.effective, path, write=mode is not fsaccess.Mode.READ
        )
        if not decision.allowed or root is None or relative is None:
            return abi.EPERM, b"", None, args, decision.reason
        try:
            fd = fsaccess.open_beneath(root, relative, mode)
        except OSError as e:
            code = e.errno or errno.EIO
            return -code, b"", None, args, f"open beneath {root}: {errno.errorcode.get(code, code)}"
        return 0, b"", fd, args, f"allowed beneath {root}"

    def _net_connect(
        self, body: p.NetConnect
    ) -> tuple[int, bytes, int | None, dict[str, Any], str]:
        host = body.host.decode("utf-8", "replace").lower()
        args: dict[str, Any] = {"host": sanitize(body.host, 253), "port": body.port}
        if not 0 < body.port < 65536:
            return abi.EINVAL, b"", None, args, f"port {body.port} out of range"
        host = _normalise_host(host)
        decision = policy.check_net(self.effective, host, body.port)
        if not decision.allowed:
            return abi.EPERM, b"", None, args, decision.reason
        try:
            addresses = list(self._resolver(host, body.port))
        except (OSError, UnicodeError) as e:
            return abi.ENOENT, b"", None, args, f"cannot resolve: {e}"
        args["resolved"] = addresses
        decision = policy.check_resolved(self.effective, host, addresses)
        if not decision.allowed or not addresses:
            return abi.EPERM, b"", None, args, decision.reason or "resolved to nothing"
        last = errno.ECONNREFUSED
        deadline = time.monotonic() + CONNECT_TIMEOUT_S  # for the call, not per address
        for addr in addresses[:MAX_CONNECT_ADDRESSES]:  # the very addresses checked
            left = deadline - time.monotonic()
            if left <= 0:
                last = errno.ETIMEDOUT
                break
            try:
                fd = self._connect(addr, body.port, left)
            except OSError as e:
                last = e.errno or errno.ECONNREFUSED
                continue
            return 0, b"", fd, args, f"connected to {addr}"
        return -last, b"", None, args, f"connect failed: {errno.errorcode.get(last, last)}"

    def _connect(self, addr: str, port: int, timeout: float) -> int:
        """A connected TCP descriptor: in the plugin's own network namespace when it has
        one (``connector``), else in the host's."""
        if self.connector is not None:
            return self.connector(addr, port, timeout)
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except BaseException:
            sock.close()
            raise
        sock.setblocking(True)
        return sock.detach()

    def _output(self, body: p.Output) -> tuple[int, bytes, int | None, dict[str, Any], str]:
        args = {"data": summarize(body.data)}
        if len(self.output) + len(body.data) > MAX_OUTPUT:
            return abi.E2BIG, b"", None, args, f"output beyond {MAX_OUTPUT} bytes"
        self.output += body.data
        self.all_output += body.data[: max(0, MAX_OUTPUT - len(self.all_output))]
        return len(body.data), b"", None, args, "allowed"

    # ------------------------------------------------------------------ audit

    def _count(self, name: str) -> None:
        self.stats.by_op[name] = self.stats.by_op.get(name, 0) + 1

    def _rate_limited(self, op: str, started: int) -> None:
        """A call over the rate: counted; audited at most once per RATE_AUDIT_INTERVAL_S."""
        self.stats.rate_denied += 1
        self.stats.denied += 1
        now = self._clock()
        if now - self._rate_audited_at >= RATE_AUDIT_INTERVAL_S:
            self._rate_audited_at = now
            reason = "rate limit exceeded (denials in the next second counted, not logged)"
            self._write_audit(op, {}, False, reason, started)

    def _deny_raw(self, op: str, reason: str, started: int) -> None:
        self.stats.denied += 1
        self._count(op)
        self._write_audit(op, {}, False, reason, started)

    def _record(
        self, op: p.Op, args: dict[str, Any], allowed: bool, reason: str, started: int
    ) -> None:
        if self._audit is not None:
            self._write_audit(p.OP_NAMES[op], args, allowed, reason, started)

    def _write_audit(
        self, op: str, args: dict[str, Any], allowed: bool, reason: str, started: int
    ) -> None:
        if self._audit is None:
            return
        self._audit.append(
            {
                "time": time.time(),
                "identity": self.identity.as_dict(),
                "op": op,
                "args": args,
                "decision": "allow" if allowed else "deny",
                "reason": reason,
                "latency_us": round((time.perf_counter_ns() - started) / 1000, 1),
            },
            durable=not allowed,
        )

    def close(self) -> None:
        """Flush the audit trail."""
        if self._audit is not None:
            with contextlib.suppress(OSError):
                self._audit.close()


def _normalise_host(host: str) -> str:
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host.strip("[]")))
    return host
