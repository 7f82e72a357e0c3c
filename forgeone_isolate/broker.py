"""The broker: the parent's judge of every request the child makes.

The identity (signer, plugin, version, instance) is bound to the channel by the parent when
the broker is made, never taken from a message. Each request is decoded and validated by
``protocol`` before dispatch; anything malformed is a denial. Repeated abuse ends the plugin.

This is the launch issue's broker: it answers ``log`` and ``clock_now`` and refuses every
other op with -ENOSYS (audited by count). The policy-driven calls come with the broker issue.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from forgeone_isolate import abi
from forgeone_isolate import protocol as p
from forgeone_isolate.errors import BrokerProtocolError

MAX_VIOLATIONS = 16


@dataclass(frozen=True)
class Identity:
    """Who is on the other end of a channel, as the parent established it."""

    signer: str
    plugin: str
    version: str
    instance: str


@dataclass
class BrokerStats:
    """Counters for the launch report."""

    allowed: int = 0
    denied: int = 0
    violations: int = 0
    by_op: dict[str, int] = field(default_factory=dict)


def sanitize(text: bytes, limit: int = p.MAX_LOG) -> str:
    """Guest text made safe for a terminal or a log: no control characters, no escapes."""
    s = text[:limit].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in s)


class Broker:
    """Judges one plugin's requests."""

    def __init__(self, identity: Identity, on_log: Callable[[int, str], None]) -> None:
        self.identity = identity
        self.stats = BrokerStats()
        self.done: p.Done | None = None
        self.outputs: list[bytes] = []
        self._on_log = on_log

    @property
    def abusive(self) -> bool:
        """True once the child broke the protocol too often: the caller kills it."""
        return self.stats.violations >= MAX_VIOLATIONS

    def handle(self, frame: bytes) -> bytes | None:
        """One request in, one reply out (None when no reply is due)."""
        try:
            req = p.decode_request(frame)
        except BrokerProtocolError:
            self.stats.violations += 1
            self.stats.denied += 1
            self._count("malformed")
            return None  # the sequence number cannot be trusted: no reply; the child waits
        self._count(req.op.name.lower())
        body = req.body
        if isinstance(body, p.Done):
            if self.done is None:
                self.done = body
            return None
        if isinstance(body, p.Log):
            self.stats.allowed += 1
            self._on_log(body.level, sanitize(body.message))
            return p.encode_reply(req.op, req.seq, 0)
        if isinstance(body, p.ClockNow):
            self.stats.allowed += 1
            return p.encode_reply(req.op, req.seq, time.time_ns())
        self.stats.denied += 1
        return p.encode_reply(req.op, req.seq, abi.ENOSYS)

    def _count(self, name: str) -> None:
        self.stats.by_op[name] = self.stats.by_op.get(name, 0) + 1
