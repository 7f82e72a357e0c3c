"""The broker protocol: the only language the child may speak to the parent.

One SOCK_SEQPACKET message is one frame; the kernel keeps message boundaries, so a frame
never needs its own length. Every frame starts with a header::

    version u8 | op u8 | seq u32        (network byte order)

followed by the op's body (below). Replies carry ``version | op | seq | result i64`` and a
data body. Frames are bounded by MAX_FRAME; every field is validated by :func:`decode_request`
before anything is dispatched; the decoder never trusts a length from the child. No pickle.

Ops (request body -> reply data):
- LOG        level i32 | message bytes             -> -
- CLOCK_NOW  -                                     -> -   (result = ns since the epoch)
- RANDOM     length u32                            -> length bytes
- CONFIG_GET buflen u32 | key                      -> value (result = full length)
- KV_GET     buflen u32 | key                      -> value (result = full length)
- KV_SET     keylen u16 | key | value              -> -
- FS_OPEN    flags i32 | path                      -> - (result = handle; fd by SCM_RIGHTS)
- NET_CONNECT port i32 | host                      -> - (result = handle; fd by SCM_RIGHTS)
- OUTPUT     data                                  -> -
- DONE       phase u8 | code i32 | kind u8 | message   (no reply: the child's last word)
- IDLE       code i32 | kind u8                    -> a Command (result) and its data

IDLE is how a running guest asks for work: the child sends it after ``start`` and after
each command, carrying the outcome of the previous command (code, DoneKind); the parent
answers only when it has a command (held until then): STOP, CALL (data = the input for the
guest's ``handle``), PAUSE or RESUME.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from forgeone_isolate.errors import BrokerProtocolError

VERSION: Final = 1
MAX_FRAME: Final = 64 * 1024
MAX_LOG: Final = 4096
MAX_KEY: Final = 256
MAX_PATH: Final = 4096
MAX_HOST: Final = 253
MAX_DATA: Final = MAX_FRAME - 64

HEADER = struct.Struct("!BBI")
REPLY_HEADER = struct.Struct("!BBIq")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_DONE = struct.Struct("!BiB")
_IDLE = struct.Struct("!iB")


class Op(enum.IntEnum):
    """Request operations."""

    LOG = 1
    CLOCK_NOW = 2
    RANDOM = 3
    CONFIG_GET = 4
    KV_GET = 5
    KV_SET = 6
    FS_OPEN = 7
    NET_CONNECT = 8
    OUTPUT = 9
    DONE = 10
    IDLE = 11


class Command(enum.IntEnum):
    """The parent's answer to IDLE."""

    STOP = 0
    CALL = 1
    PAUSE = 2
    RESUME = 3


#: op number -> Op, and Op -> its lower-case name (hot path: no enum construction per frame)
_OPS: Final[dict[int, Op]] = {int(op): op for op in Op}
OP_NAMES: Final[dict[Op, str]] = {op: op.name.lower() for op in Op}


class DoneKind(enum.IntEnum):
    """How the child's lifecycle ended (in a DONE frame)."""

    OK = 0
    FAILED = 1  # an export returned non-zero
    TRAP = 2  # the guest trapped
    MEMORY = 3  # the guest trapped after its memory reached the limit
    SETUP = 4  # instantiation failed after the filter


@dataclass(frozen=True)
class Log:
    level: int
    message: bytes


@dataclass(frozen=True)
class ClockNow:
    pass


@dataclass(frozen=True)
class Random:
    length: int


@dataclass(frozen=True)
class ConfigGet:
    key: bytes
    buflen: int


@dataclass(frozen=True)
class KvGet:
    key: bytes
    buflen: int


@dataclass(frozen=True)
class KvSet:
    key: bytes
    value: bytes


@dataclass(frozen=True)
class FsOpen:
    path: bytes
    flags: int


@dataclass(frozen=True)
class NetConnect:
    host: bytes
    port: int


@dataclass(frozen=True)
class Output:
    data: bytes


@dataclass(frozen=True)
class Done:
    phase: int  # index into abi.LIFECYCLE, 255 = before any export
    code: int
    kind: DoneKind
    message: bytes


@dataclass(frozen=True)
class Idle:
    code: int
    kind: DoneKind


Request = (
    Idle | Log | ClockNow | Random | ConfigGet | KvGet | KvSet | FsOpen | NetConnect | Output | Done
)


@dataclass(frozen=True)
class Frame:
    """A decoded request and its sequence number."""

    seq: int
    op: Op
    body: Request


class UnknownOpError(BrokerProtocolError):
    """Raised for a well-formed header naming an op this protocol does not know: the
    caller answers it with -ENOSYS (a newer guest runtime, say), not as abuse."""

    def __init__(self, seq: int, op: int) -> None:
        super().__init__(f"protocol: unknown op {op}")
        self.seq = seq
        self.op = op


def _bad(msg: str) -> BrokerProtocolError:
    return BrokerProtocolError(f"protocol: {msg}")


def decode_request(frame: bytes) -> Frame:
    """Decode and validate one frame from the child. Raises: BrokerProtocolError."""
    if len(frame) > MAX_FRAME:
        raise _bad(f"frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    if len(frame) < HEADER.size:
        raise _bad("truncated header")
    version, op_raw, seq = HEADER.unpack_from(frame)
    if version != VERSION:
        raise _bad(f"unsupported version {version}")
    op = _OPS.get(op_raw)
    if op is None:
        raise UnknownOpError(seq, op_raw)
    body = frame[HEADER.size :]
    return Frame(seq, op, _decode_body(op, body))


def _fixed(st: struct.Struct, body: bytes, what: str) -> tuple[tuple[int, ...], bytes]:
    if len(body) < st.size:
        raise _bad(f"{what}: truncated body")
    return st.unpack_from(body), body[st.size :]


def _key(raw: bytes, what: str) -> bytes:
    if not 0 < len(raw) <= MAX_KEY:
        raise _bad(f"{what}: key length {len(raw)} outside 1..{MAX_KEY}")
    return raw


def _decode_body(op: Op, body: bytes) -> Request:
    name = OP_NAMES[op]
    if op is Op.LOG:
        (level,), msg = _fixed(_I32, body, name)
        if not 0 <= level <= 4:
            raise _bad(f"log: level {level} outside 0..4")
        if len(msg) > MAX_LOG:
            raise _bad(f"log: message of {len(msg)} bytes exceeds {MAX_LOG}")
        return Log(level, msg)
    if op is Op.CLOCK_NOW:
        if body:
            raise _bad("clock_now: unexpected body")
        return ClockNow()
    if op is Op.RANDOM:
        (length,), rest = _fixed(_U32, body, name)
        if rest or length > MAX_DATA:
            raise _bad(f"random: bad length {length}")
        return Random(length)
    if op in (Op.CONFIG_GET, Op.KV_GET):
        (buflen,), key = _fixed(_U32, body, name)
        if buflen > MAX_DATA:
            raise _bad(f"{name}: buffer length {buflen} exceeds {MAX_DATA}")
        k = _key(key, name)
        return ConfigGet(k, buflen) if op is Op.CONFIG_GET else KvGet(k, buflen)
    if op is Op.KV_SET:
        (keylen,), rest = _fixed(_U16, body, name)
        if keylen > len(rest):
            raise _bad("kv_set: key length beyond the frame")
        return KvSet(_key(rest[:keylen], name), rest[keylen:])
    if op is Op.FS_OPEN:
        (flags,), path = _fixed(_I32, body, name)
        if not 0 < len(path) <= MAX_PATH or b"\x00" in path:
            raise _bad("fs_open: bad path")
        return FsOpen(path, flags)
    if op is Op.NET_CONNECT:
        (port,), host = _fixed(_I32, body, name)
        if not 0 < len(host) <= MAX_HOST or b"\x00" in host:
            raise _bad("net_connect: bad host")
        return NetConnect(host, port)
    if op is Op.OUTPUT:
        return Output(body)
    if op is Op.IDLE:
        (code, kind_raw), rest = _fixed(_IDLE, body, name)
        if rest:
            raise _bad("idle: unexpected trailing bytes")
        try:
            return Idle(code, DoneKind(kind_raw))
        except ValueError:
            raise _bad(f"idle: unknown kind {kind_raw}") from None
    (phase, code, kind_raw), msg = _fixed(_DONE, body, name)
    try:
        kind = DoneKind(kind_raw)
    except ValueError:
        raise _bad(f"done: unknown kind {kind_raw}") from None
    return Done(phase, code, kind, msg[:MAX_LOG])


# ------------------------------------------------------------------ child-side encoders


def encode(op: Op, seq: int, body: bytes = b"") -> bytes:
    """One request frame."""
    return HEADER.pack(VERSION, op, seq & 0xFFFFFFFF) + body


def encode_log(seq: int, level: int, message: bytes) -> bytes:
    return encode(Op.LOG, seq, _I32.pack(level) + message[:MAX_LOG])


def encode_u32_key(op: Op, seq: int, buflen: int, key: bytes) -> bytes:
    return encode(op, seq, _U32.pack(buflen) + key)


def encode_kv_set(seq: int, key: bytes, value: bytes) -> bytes:
    return encode(Op.KV_SET, seq, _U16.pack(len(key)) + key + value)


def encode_i32_text(op: Op, seq: int, value: int, text: bytes) -> bytes:
    return encode(op, seq, _I32.pack(value) + text)


def encode_idle(seq: int, code: int, kind: DoneKind) -> bytes:
    return encode(Op.IDLE, seq, _IDLE.pack(code, kind))


def encode_done(phase: int, code: int, kind: DoneKind, message: bytes) -> bytes:
    return encode(Op.DONE, 0, _DONE.pack(phase, code, kind) + message[:MAX_LOG])


# ------------------------------------------------------------------------ replies


def encode_reply(op: Op, seq: int, result: int, data: bytes = b"") -> bytes:
    """One reply frame (parent side)."""
    return REPLY_HEADER.pack(VERSION, op, seq & 0xFFFFFFFF, result) + data


def encode_reply_raw(op: int, seq: int, result: int) -> bytes:
    """A reply for an op number outside :class:`Op` (answered -ENOSYS)."""
    return REPLY_HEADER.pack(VERSION, op & 0xFF, seq & 0xFFFFFFFF, result)


def decode_reply(frame: bytes, op: Op, seq: int) -> tuple[int, bytes]:
    """Child side: check a reply matches the request. Raises: BrokerProtocolError."""
    if len(frame) < REPLY_HEADER.size:
        raise _bad("truncated reply")
    version, rop, rseq, result = REPLY_HEADER.unpack_from(frame)
    if version != VERSION or rop != op or rseq != (seq & 0xFFFFFFFF):
        raise _bad("reply does not match the request")
    return result, frame[REPLY_HEADER.size :]
