"""Fuzzing the broker protocol: the frame decoder, the reply decoder, and ``Broker.handle``.

Properties:
- ``decode_request`` on any bytes returns a validated frame or raises BrokerProtocolError,
  nothing else; whatever it accepts is within the protocol's bounds;
- every encoder round-trips through the decoder;
- ``Broker.handle`` never raises, never replies to a frame the decoder rejects (nor to DONE),
  answers every other frame with a reply matching its op and sequence number, and counts one
  violation (and one audit denial) per malformed frame; sixteen make the child abusive;
- raw bytes (and descriptors) written into a real SOCK_SEQPACKET socketpair by a fake child
  get the same treatment through the supervisor's receive path.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import random
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeone_isolate import launch
from forgeone_isolate import protocol as p
from forgeone_isolate.audit import AuditLog, verify
from forgeone_isolate.broker import MAX_VIOLATIONS, Broker, Identity
from forgeone_isolate.errors import BrokerProtocolError
from forgeone_isolate.kvstore import KvStore
from forgeone_isolate.policy import Effective

FUZZ = settings(max_examples=300, deadline=None, database=None)
FEW = settings(max_examples=60, deadline=None, database=None)

U32 = st.integers(0, 2**32 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
OPS = st.sampled_from(list(p.Op))


# --------------------------------------------------------------------------- strategies


def _header(version: int, op: int, seq: int) -> bytes:
    return struct.pack("!BBI", version, op, seq)


@st.composite
def shaped_frames(draw: st.DrawFn) -> bytes:
    """A frame with a plausible header (mostly version 1, a known op) and a random body."""
    version = draw(st.sampled_from([1, 1, 1, 1, 0, 2, 255]))
    op = draw(st.one_of(OPS.map(int), st.integers(0, 255)))
    seq = draw(U32)
    body = draw(st.binary(max_size=300))
    return _header(version, op, seq) + body


@st.composite
def valid_requests(draw: st.DrawFn) -> bytes:
    """A well-formed request with hostile field values (what a bounds-checked guest can send)."""
    seq = draw(U32)
    op = draw(OPS)
    key = draw(st.binary(min_size=1, max_size=p.MAX_KEY))
    text = draw(
        st.one_of(
            st.binary(min_size=1, max_size=200).filter(lambda b: b"\x00" not in b),
            st.sampled_from(
                [b"/fz/root/a.txt", b"/fz/root/../x", b"/proc/self/root/etc", b"svc.test"]
            ),
        )
    )
    if op is p.Op.LOG:
        return p.encode_log(seq, draw(st.integers(0, 4)), draw(st.binary(max_size=p.MAX_LOG)))
    if op is p.Op.CLOCK_NOW:
        return p.encode(op, seq)
    if op is p.Op.RANDOM:
        return p.encode(op, seq, struct.pack("!I", draw(st.integers(0, 4096))))
    if op in (p.Op.CONFIG_GET, p.Op.KV_GET):
        return p.encode_u32_key(op, seq, draw(st.integers(0, p.MAX_DATA)), key)
    if op is p.Op.KV_SET:
        return p.encode_kv_set(seq, key, draw(st.binary(max_size=500)))
    if op in (p.Op.FS_OPEN, p.Op.NET_CONNECT):
        return p.encode_i32_text(op, seq, draw(I32), text)
    if op is p.Op.OUTPUT:
        return p.encode(op, seq, draw(st.binary(max_size=500)))
    kind = draw(st.sampled_from(list(p.DoneKind)))
    if op is p.Op.IDLE:
        return p.encode_idle(seq, draw(I32), kind)
    return p.encode_done(draw(st.integers(0, 255)), draw(I32), kind, draw(st.binary(max_size=50)))


ANY_FRAME = st.one_of(st.binary(max_size=400), shaped_frames(), valid_requests())


# --------------------------------------------------------------------------- decode_request


def _check_bounds(frame: p.Frame) -> None:
    body = frame.body
    assert 0 <= frame.seq < 2**32
    if isinstance(body, p.Log):
        assert 0 <= body.level <= 4
        assert len(body.message) <= p.MAX_LOG
    elif isinstance(body, p.Random):
        assert 0 <= body.length <= p.MAX_DATA
    elif isinstance(body, p.ConfigGet | p.KvGet):
        assert 0 < len(body.key) <= p.MAX_KEY
        assert 0 <= body.buflen <= p.MAX_DATA
    elif isinstance(body, p.KvSet):
        assert 0 < len(body.key) <= p.MAX_KEY
    elif isinstance(body, p.FsOpen):
        assert 0 < len(body.path) <= p.MAX_PATH
        assert b"\x00" not in body.path
        assert -(2**31) <= body.flags < 2**31
    elif isinstance(body, p.NetConnect):
        assert 0 < len(body.host) <= p.MAX_HOST
        assert b"\x00" not in body.host
    elif isinstance(body, p.Done):
        assert isinstance(body.kind, p.DoneKind)
        assert len(body.message) <= p.MAX_LOG
    elif isinstance(body, p.Idle):
        assert isinstance(body.kind, p.DoneKind)


@FUZZ
@given(ANY_FRAME)
def test_decode_request_only_raises_protocol_errors(frame: bytes) -> None:
    try:
        decoded = p.decode_request(frame)
    except BrokerProtocolError as e:
        message = str(e)
    else:
        assert decoded.op == frame[1]
        _check_bounds(decoded)
        return
    assert message.startswith("protocol: ")


@FEW
@given(
    st.integers(p.MAX_FRAME - 300, p.MAX_FRAME + 300),
    st.binary(min_size=1, max_size=64),
    OPS,
    U32,
)
def test_decode_request_large_frames(size: int, pattern: bytes, op: p.Op, seq: int) -> None:
    body = (pattern * (size // len(pattern) + 1))[: size - p.HEADER.size]
    frame = _header(1, op, seq) + body
    assert len(frame) == size
    try:
        decoded = p.decode_request(frame)
    except BrokerProtocolError:
        return
    assert len(frame) <= p.MAX_FRAME
    _check_bounds(decoded)


def test_frame_size_boundary() -> None:
    body = b"o" * (p.MAX_FRAME - p.HEADER.size)
    assert p.decode_request(p.encode(p.Op.OUTPUT, 1, body)).body == p.Output(body)
    with pytest.raises(BrokerProtocolError, match="exceeds"):
        p.decode_request(p.encode(p.Op.OUTPUT, 1, body + b"o"))


@FUZZ
@given(st.binary(max_size=100), OPS, U32)
def test_decode_reply_only_raises_protocol_errors(frame: bytes, op: p.Op, seq: int) -> None:
    try:
        result, data = p.decode_reply(frame, op, seq)
    except BrokerProtocolError:
        return
    assert frame[:6] == _header(1, op, seq)
    assert data == frame[p.REPLY_HEADER.size :]
    assert -(2**63) <= result < 2**63


# --------------------------------------------------------------------------- round trips


@FUZZ
@given(
    seq=U32,
    level=st.integers(0, 4),
    msg=st.binary(max_size=p.MAX_LOG),
    key=st.binary(min_size=1, max_size=p.MAX_KEY),
    value=st.binary(max_size=1000),
    buflen=st.integers(0, p.MAX_DATA),
    num=I32,
    text=st.binary(min_size=1, max_size=p.MAX_HOST).filter(lambda b: b"\x00" not in b),
)
def test_encoders_round_trip(
    seq: int, level: int, msg: bytes, key: bytes, value: bytes, buflen: int, num: int, text: bytes
) -> None:
    cases: list[tuple[bytes, p.Request]] = [
        (p.encode_log(seq, level, msg), p.Log(level, msg)),
        (p.encode(p.Op.CLOCK_NOW, seq), p.ClockNow()),
        (p.encode(p.Op.RANDOM, seq, struct.pack("!I", buflen)), p.Random(buflen)),
        (p.encode_u32_key(p.Op.CONFIG_GET, seq, buflen, key), p.ConfigGet(key, buflen)),
        (p.encode_u32_key(p.Op.KV_GET, seq, buflen, key), p.KvGet(key, buflen)),
        (p.encode_kv_set(seq, key, value), p.KvSet(key, value)),
        (p.encode_i32_text(p.Op.FS_OPEN, seq, num, text), p.FsOpen(text, num)),
        (p.encode_i32_text(p.Op.NET_CONNECT, seq, num, text), p.NetConnect(text, num)),
        (p.encode(p.Op.OUTPUT, seq, value), p.Output(value)),
    ]
    for frame, body in cases:
        decoded = p.decode_request(frame)
        assert (decoded.seq, decoded.body) == (seq, body)
    done = p.decode_request(p.encode_done(level, num, p.DoneKind.TRAP, msg))
    assert done.body == p.Done(level, num, p.DoneKind.TRAP, msg)
    idle = p.decode_request(p.encode_idle(seq, num, p.DoneKind.FAILED))
    assert (idle.seq, idle.body) == (seq, p.Idle(num, p.DoneKind.FAILED))
    reply = p.encode_reply(p.Op.KV_GET, seq, num, value)
    assert p.decode_reply(reply, p.Op.KV_GET, seq) == (num, value)


# --------------------------------------------------------------------------- Broker.handle


@contextlib.contextmanager
def fuzz_broker() -> Iterator[tuple[Broker, Path]]:
    """A broker granted a bit of everything, with no way to reach a real network."""
    with tempfile.TemporaryDirectory(prefix="fz") as tmp:
        base = Path(tmp)
        (base / "root").mkdir()
        (base / "root" / "a.txt").write_bytes(b"a")
        eff = Effective(
            fs_read=(str(base / "root"),),
            fs_write=(str(base / "root"),),
            net_connect=frozenset({("svc.test", 443)}),
            net_allow_networks=(ipaddress.ip_network("192.0.2.0/24"),),
            kv=True,
            kv_quota_bytes=4096,
            config={"k": "v"},
            rate_per_s=100_000.0,
            burst=1_000_000,
        )
        kv = KvStore(base / "kv.sqlite3")
        audit_path = base / "audit.jsonl"
        broker = Broker(
            Identity("ab" * 32, "fuzz", "1.0.0", "fuzz0001"),
            eff,
            lambda lv, text: None,
            audit=AuditLog(audit_path),
            kv=kv,
            resolver=lambda host, port: ["192.0.2.1", "198.51.100.1"],
        )

        def refuse(addr: str, port: int, timeout: float) -> int:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "fuzzing: no network")

        broker.connector = refuse
        try:
            yield broker, audit_path
        finally:
            broker.close()
            kv.close()


def _expect_malformed(frame: bytes) -> bool:
    try:
        p.decode_request(frame)
    except p.UnknownOpError:
        return False  # a well-formed header naming an unknown op: answered -ENOSYS
    except BrokerProtocolError:
        return True
    return False


def _unknown_op(frame: bytes) -> bool:
    try:
        p.decode_request(frame)
    except p.UnknownOpError:
        return True
    except BrokerProtocolError:
        return False
    return False


def _silent(frame: bytes) -> bool:
    """A well-formed frame that gets no reply: DONE, or IDLE (held until a command)."""
    return frame[1] in (p.Op.DONE, p.Op.IDLE)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(ANY_FRAME, min_size=1, max_size=25), st.randoms(use_true_random=False))
def test_broker_handle_never_raises_and_never_answers_garbage(
    frames: list[bytes], rnd: random.Random
) -> None:
    with fuzz_broker() as (broker, audit_path):
        malformed = 0
        idle_twice = 0
        done_twice = 0
        for frame in frames:
            bad = _expect_malformed(frame)
            was_idle = broker.idle_seq is not None
            had_done = broker.done is not None
            reply = broker.handle(frame)
            if bad:
                malformed += 1
                assert reply is None
                continue
            seq = struct.unpack_from("!I", frame, 2)[0]
            if _unknown_op(frame):
                assert reply is not None
                assert reply.frame[:6] == frame[:6]
                assert struct.unpack_from("!q", reply.frame, 6)[0] == -38  # -ENOSYS
                continue
            if frame[1] == p.Op.DONE and had_done:
                done_twice += 1
            if frame[1] == p.Op.IDLE:
                assert reply is None
                if was_idle:
                    idle_twice += 1
                else:
                    assert broker.idle_seq == seq
                if rnd.random() < 0.5:  # the parent has a command for it
                    held = broker.idle_seq  # the first IDLE's: a second one is refused
                    assert held is not None
                    command = rnd.choice(list(p.Command))
                    answer = broker.answer_idle(command, b"input")
                    assert p.decode_reply(answer.frame, p.Op.IDLE, held) == (command, b"input")
                    assert broker.idle_seq is None
                    assert broker.output == b""
                continue
            if _silent(frame):
                assert reply is None
                continue
            assert reply is not None
            result, _ = p.decode_reply(reply.frame, p.Op(frame[1]), seq)
            if reply.fd is not None:
                assert result >= 0
                os.close(reply.fd)
        assert broker.stats.violations == malformed + idle_twice + done_twice
        assert broker.abusive == (malformed + idle_twice + done_twice >= MAX_VIOLATIONS)
        broker.close()
        records = [json.loads(x) for x in audit_path.read_text().splitlines()]
        assert sum(r["op"] == "malformed" for r in records) == malformed
        assert sum(r["op"] == "idle" for r in records) == idle_twice
        assert all(r["decision"] == "deny" for r in records if r["op"] in ("malformed", "idle"))
        assert verify(audit_path).ok


@FEW
@given(st.lists(st.binary(max_size=64), min_size=MAX_VIOLATIONS, max_size=MAX_VIOLATIONS + 5))
def test_sixteen_malformed_frames_are_abuse(junk: list[bytes]) -> None:
    with fuzz_broker() as (broker, _):
        for i, raw in enumerate(junk):
            frame = b"\x07" + raw  # version 7: always malformed
            assert broker.handle(frame) is None
            assert broker.abusive == (i + 1 >= MAX_VIOLATIONS)


# --------------------------------------------------------------------------- a fake child


def _serve_one(parent: socket.socket, broker: Broker) -> None:
    """The supervisor's receive path (launch._Supervisor._on_broker) for one message."""
    frame, ancdata, flags, _ = parent.recvmsg(p.MAX_FRAME + 1, launch._ANCILLARY_SPACE)
    smuggled = launch._close_passed_fds(ancdata)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        smuggled = max(smuggled, 1)
    reply = broker.handle(frame, fds_received=smuggled)
    if reply is not None:
        parent.send(reply.frame)
        if reply.fd is not None:
            os.close(reply.fd)


def _no_reply(child: socket.socket) -> bool:
    try:
        child.recv(p.MAX_FRAME, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.one_of(st.binary(max_size=200), shaped_frames()), min_size=1, max_size=10))
def test_fake_child_writes_raw_bytes_into_the_socket(frames: list[bytes]) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent, child, fuzz_broker() as (broker, _):
        bad = 0
        for frame in frames:
            idle_before = broker.idle_seq is not None
            done_before = broker.done is not None
            child.send(frame)
            _serve_one(parent, broker)
            if _expect_malformed(frame):
                bad += 1
                assert _no_reply(child)
            elif _unknown_op(frame):
                reply = child.recv(p.MAX_FRAME, socket.MSG_DONTWAIT)
                assert reply[:6] == frame[:6]  # answered -ENOSYS, same op and seq
            elif _silent(frame):
                bad += frame[1] == p.Op.IDLE and idle_before
                bad += frame[1] == p.Op.DONE and done_before
                assert _no_reply(child)
            else:
                reply = child.recv(p.MAX_FRAME, socket.MSG_DONTWAIT)
                assert reply[:2] == frame[:2]
        assert broker.stats.violations == bad
        # the channel still works after all that
        child.send(p.encode(p.Op.CLOCK_NOW, 99))
        _serve_one(parent, broker)
        assert p.decode_reply(child.recv(100), p.Op.CLOCK_NOW, 99)[0] > 0


def test_fake_child_passing_descriptors_and_oversized_frames() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    before = len(os.listdir("/proc/self/fd"))
    with parent, child, fuzz_broker() as (broker, audit_path):
        r, w = os.pipe()
        try:
            socket.send_fds(child, [p.encode_log(1, 1, b"smuggle")], [r, w])
        finally:
            os.close(r)
            os.close(w)
        _serve_one(parent, broker)
        assert _no_reply(child)
        assert broker.stats.violations == 1
        child.send(p.encode(p.Op.OUTPUT, 2, b"x" * (p.MAX_FRAME + 100)))
        _serve_one(parent, broker)
        assert _no_reply(child)
        assert broker.stats.violations == 2
        broker.close()
        ops = [json.loads(x)["op"] for x in audit_path.read_text().splitlines()]
        assert ops == ["fds", "fds"]
    # the passed descriptors were closed by the receive path, not leaked into the parent
    assert len(os.listdir("/proc/self/fd")) <= before
