"""Child side, after the filter: the wasmtime store, the ABI v1 shims, the lifecycle.

Everything here is prepared before the seccomp filter (:func:`prepare`) and run after it
(:meth:`PreparedGuest.run`). The shims treat the guest as hostile: every pointer and length
is checked against the guest's memory before the broker is asked anything (-EFAULT
otherwise). Each import is one request on the broker socket, written and read with plain
``write``/``read`` on fd 3, the only syscalls the filter lets touch it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wasmtime

from forgeone_isolate import abi
from forgeone_isolate import protocol as p
from forgeone_isolate.wasm import WASM_PAGE, make_engine

MASK32 = 0xFFFFFFFF
#: the phase number DONE frames carry for a failure inside ``handle``
PHASE_HANDLE = 254
#: passed descriptors a guest may hold at once (RLIMIT_NOFILE bounds them as well)
MAX_HANDLES = 8
#: the largest single fd_read / fd_write
MAX_IO = 64 * 1024
_FD_ANCILLARY = socket.CMSG_SPACE(4)
_I32 = wasmtime.ValType.i32()
_I64 = wasmtime.ValType.i64()


class _Channel:
    """The broker socket, as the shims see it, and the table of passed descriptors.

    Handles are indices into the child's own table, never raw descriptor numbers.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seq = 0
        self.sock: socket.socket | None = None
        self.handles: dict[int, int] = {}
        self._next_handle = 1

    def reset(self) -> None:
        """A fresh channel for the next guest (nothing of a previous one carries over)."""
        if self.sock is not None:
            self.sock.detach()  # the descriptor belongs to the process that bound it
        self.seq = 0
        self.sock = None
        self.handles = {}
        self._next_handle = 1

    def bind(self) -> None:
        """In the child, once fd is the broker socket and before the filter: building a
        socket object makes syscalls of its own."""
        self.sock = socket.socket(fileno=self.fd)

    def call(self, op: p.Op, frame_body: Callable[[int], bytes]) -> tuple[int, bytes]:
        self.seq = (self.seq + 1) & MASK32
        os.write(self.fd, frame_body(self.seq))
        reply = os.read(self.fd, p.MAX_FRAME)
        return p.decode_reply(reply, op, self.seq)

    def call_for_fd(self, op: p.Op, frame_body: Callable[[int], bytes]) -> int:
        """A request answered with a descriptor: returns a new handle or a negative errno."""
        if len(self.handles) >= MAX_HANDLES:
            return -errno.EMFILE
        self.seq = (self.seq + 1) & MASK32
        os.write(self.fd, frame_body(self.seq))
        assert self.sock is not None, "bind() the channel before the guest runs"
        reply, ancdata, _flags, _addr = self.sock.recvmsg(p.MAX_FRAME, _FD_ANCILLARY)
        fds: list[int] = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                fds.extend(int.from_bytes(data[i : i + 4], "little") for i in range(0, usable, 4))
        result, _ = p.decode_reply(reply, op, self.seq)
        if result < 0 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return result if result < 0 else abi.EIO
        handle = self._next_handle
        self._next_handle += 1
        self.handles[handle] = fds[0]
        return handle

    def done(self, phase: int, code: int, kind: p.DoneKind, message: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd, p.encode_done(phase, code, kind, message.encode("utf-8", "replace")))


@dataclass
class PreparedGuest:
    """An engine, module, store and linker ready to instantiate after the filter."""

    engine: wasmtime.Engine
    module: wasmtime.Module
    store: wasmtime.Store
    linker: wasmtime.Linker
    channel: _Channel
    memory_limit: int
    lifecycle: tuple[str, ...]
    _phase: int = 255
    _memory: wasmtime.Memory | None = None
    _exports: Any = None

    _instantiated: bool = False
    _instantiate_error: BaseException | None = None

    def instantiate(self) -> None:
        """Make the instance (a wasm start function runs here). Called once the filter is
        loaded, while the parent reads /proc; an error is kept for :meth:`run` to report."""
        if self._instantiated:
            return
        self._instantiated = True
        self._phase = 255
        self._memory = None
        try:
            instance = self.linker.instantiate(self.store, self.module)
            self._exports = instance.exports(self.store)
            mem = self._exports[abi.MEMORY_EXPORT]
            self._memory = mem if isinstance(mem, wasmtime.Memory) else None
        except BaseException as e:  # (a shim's own error too) re-raised by run()
            self._instantiate_error = e

    def __call__(self) -> int:
        return self.run()

    def run(self) -> int:
        """Instantiate (unless done already) and drive the lifecycle; report the outcome in
        a DONE frame.

        ``init``, ``start``; then commands from the parent (IDLE → STOP, CALL, PAUSE,
        RESUME) until STOP; then ``stop`` and ``unload``. Returns the process exit status
        (0 ok, 1 failed). Never raises.
        """
        self.instantiate()
        try:
            if self._instantiate_error is not None:
                raise self._instantiate_error
            for name in ("init", "start"):
                if not self._call_lifecycle(name):
                    return 1
            code, kind = 0, p.DoneKind.OK
            while True:
                command, data = self.channel.call(p.Op.IDLE, _idle_frame(code, kind))
                if command == p.Command.CALL:
                    code, kind = self._handle(data)
                    if kind is not p.DoneKind.OK and kind is not p.DoneKind.FAILED:
                        return 1
                elif command in (p.Command.PAUSE, p.Command.RESUME):
                    name = "pause" if command == p.Command.PAUSE else "resume"
                    if not self._call_lifecycle(name):
                        return 1
                    code, kind = 0, p.DoneKind.OK
                else:
                    break
            for name in ("stop", "unload"):
                if not self._call_lifecycle(name):
                    return 1
        except wasmtime.Trap as e:
            self.channel.done(self._phase, -1, self._trap_kind(self._memory), _first_line(e))
            return 1
        except wasmtime.WasmtimeError as e:
            self.channel.done(self._phase, -1, p.DoneKind.SETUP, _first_line(e))
            return 1
        self.channel.done(255, 0, p.DoneKind.OK, "")
        return 0

    def _call_lifecycle(self, name: str) -> bool:
        """Call an optional lifecycle export; False (after a DONE frame) when it failed."""
        if name not in self.lifecycle:
            return True
        self._phase = abi.LIFECYCLE.index(name)
        func = self._exports[name]
        assert isinstance(func, wasmtime.Func)
        rc = func(self.store)
        if rc != 0:
            self.channel.done(self._phase, int(rc), p.DoneKind.FAILED, f"{name} returned {rc}")
            return False
        return True

    def _handle(self, data: bytes) -> tuple[int, p.DoneKind]:
        """One request for the guest's ``handle``: alloc, copy in, call. Traps propagate."""
        alloc = self._exports.get("alloc")
        handle = self._exports.get("handle")
        if not isinstance(alloc, wasmtime.Func) or not isinstance(handle, wasmtime.Func):
            return abi.ENOSYS, p.DoneKind.FAILED
        self._phase = PHASE_HANDLE
        ptr = int(alloc(self.store, len(data))) & MASK32
        memory = self._memory
        if memory is None or ptr + len(data) > memory.data_len(self.store):
            return abi.EFAULT, p.DoneKind.FAILED
        memory.write(self.store, data, ptr)
        rc = int(handle(self.store, ptr, len(data)))
        return rc, p.DoneKind.OK if rc == 0 else p.DoneKind.FAILED

    def _trap_kind(self, memory: wasmtime.Memory | None) -> p.DoneKind:
        """MEMORY when the guest trapped with its memory near the limit.

        wasmtime-py's StoreLimits make a refused ``memory.grow`` return -1 without telling
        the host, so this is inferred: a trap within an eighth of the limit (at least one
        page) counts as the memory limit biting.
        """
        if memory is None:
            return p.DoneKind.TRAP
        margin = max(WASM_PAGE, self.memory_limit // 8)
        if memory.data_len(self.store) + margin > self.memory_limit:
            return p.DoneKind.MEMORY
        return p.DoneKind.TRAP


def _idle_frame(code: int, kind: p.DoneKind) -> Callable[[int], bytes]:
    return lambda seq: p.encode_idle(seq, code, kind)


def _first_line(e: BaseException) -> str:
    """The root cause of a wasmtime error: the last line after "Caused by:", else the first."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if "Caused by:" in lines:
        return lines[-1][:500]
    return lines[0][:500]


@dataclass
class _Runtime:
    """What every guest of a process shares: the engine, and the linker whose shims talk
    over the one broker channel (PID 1 runs exactly one guest)."""

    engine: wasmtime.Engine
    linker: wasmtime.Linker
    channel: _Channel


_RUNTIME: _Runtime | None = None


def _runtime(broker_fd: int) -> _Runtime:
    """This process's runtime, made on first use (the fork server makes it at warm-up, so
    every plugin host inherits it). Its channel starts afresh for each guest."""
    global _RUNTIME  # noqa: PLW0603 - one per process, by design
    if _RUNTIME is None or _RUNTIME.channel.fd != broker_fd:
        engine = make_engine()
        linker = wasmtime.Linker(engine)
        channel = _Channel(broker_fd)
        _define_imports(linker, channel)
        _RUNTIME = _Runtime(engine, linker, channel)
    _RUNTIME.channel.reset()
    return _RUNTIME


def prepare(
    serialized: bytes, memory_limit: int, lifecycle: tuple[str, ...], broker_fd: int
) -> PreparedGuest:
    """Deserialised module and a store with limits, on the process's engine and linker:
    everything but the guest's own code, which runs (instantiation included: a wasm start
    function) only after the filter. Called in the parent before the fork (the child
    inherits the objects, so its setup stays short); the child then calls
    ``channel.bind()`` before its filter.
    """
    rt = _runtime(broker_fd)
    module = wasmtime.Module.deserialize(rt.engine, serialized)
    store = wasmtime.Store(rt.engine)
    store.set_limits(
        memory_size=memory_limit, table_elements=10_000, instances=1, tables=4, memories=1
    )
    return PreparedGuest(rt.engine, module, store, rt.linker, rt.channel, memory_limit, lifecycle)


def _mem(caller: wasmtime.Caller) -> wasmtime.Memory | None:
    mem = caller.get(abi.MEMORY_EXPORT)
    return mem if isinstance(mem, wasmtime.Memory) else None


def _read(caller: wasmtime.Caller, ptr: int, length: int, limit: int) -> bytes | None:
    """Guest bytes [ptr, ptr+len) or None when outside memory or over ``limit``."""
    mem = _mem(caller)
    ptr &= MASK32
    length &= MASK32
    if mem is None or length > limit:
        return None
    if ptr + length > mem.data_len(caller):
        return None
    return bytes(mem.read(caller, ptr, ptr + length))


def _writable(caller: wasmtime.Caller, ptr: int, length: int) -> bool:
    mem = _mem(caller)
    return mem is not None and (ptr & MASK32) + (length & MASK32) <= mem.data_len(caller)


def _define_imports(linker: wasmtime.Linker, ch: _Channel) -> None:
    def log(caller: wasmtime.Caller, level: int, ptr: int, length: int) -> int:
        msg = _read(caller, ptr, length, p.MAX_LOG)
        if msg is None:
            return abi.EFAULT if (length & MASK32) <= p.MAX_LOG else abi.E2BIG
        if not 0 <= level <= 4:
            return abi.EINVAL
        return ch.call(p.Op.LOG, lambda s: p.encode_log(s, level, msg))[0]

    clock_op = int(p.Op.CLOCK_NOW)
    header = p.HEADER
    reply_header = p.REPLY_HEADER
    fd = ch.fd

    def clock_now() -> int:
        # The hottest import, kept to the bare round trip (same frames as ch.call).
        seq = ch.seq = (ch.seq + 1) & MASK32
        os.write(fd, header.pack(p.VERSION, clock_op, seq))
        reply = os.read(fd, p.MAX_FRAME)
        if len(reply) != reply_header.size:
            return p.decode_reply(reply, p.Op.CLOCK_NOW, seq)[0]  # raises: a bad reply
        version, rop, rseq, result = reply_header.unpack(reply)
        if version != p.VERSION or rop != clock_op or rseq != seq:
            return p.decode_reply(reply, p.Op.CLOCK_NOW, seq)[0]  # raises
        return int(result)

    def random_fill(caller: wasmtime.Caller, ptr: int, length: int) -> int:
        length &= MASK32
        if not _writable(caller, ptr, length):
            return abi.EFAULT
        if length > p.MAX_DATA:
            return abi.E2BIG
        result, data = ch.call(
            p.Op.RANDOM, lambda s: p.encode(p.Op.RANDOM, s, length.to_bytes(4, "big"))
        )
        if result >= 0 and len(data) == length:
            mem = _mem(caller)
            assert mem is not None
            mem.write(caller, data, ptr & MASK32)
        return result

    def _getter(op: p.Op) -> Callable[..., int]:
        def get(caller: wasmtime.Caller, kptr: int, klen: int, bptr: int, blen: int) -> int:
            key = _read(caller, kptr, klen, p.MAX_KEY)
            if key is None:
                return abi.EFAULT if (klen & MASK32) <= p.MAX_KEY else abi.E2BIG
            blen &= MASK32
            if not _writable(caller, bptr, blen):
                return abi.EFAULT
            result, data = ch.call(
                op, lambda s: p.encode_u32_key(op, s, min(blen, p.MAX_DATA), key)
            )
            if result >= 0 and data:
                mem = _mem(caller)
                assert mem is not None
                mem.write(caller, data[:blen], bptr & MASK32)
            return result

        return get

    def kv_set(caller: wasmtime.Caller, kptr: int, klen: int, vptr: int, vlen: int) -> int:
        key = _read(caller, kptr, klen, p.MAX_KEY)
        value = _read(caller, vptr, vlen, p.MAX_DATA - p.MAX_KEY)
        if key is None or value is None:
            return abi.EFAULT
        return ch.call(p.Op.KV_SET, lambda s: p.encode_kv_set(s, key, value))[0]

    def _opener(op: p.Op, limit: int) -> Callable[..., int]:
        def open_(caller: wasmtime.Caller, ptr: int, length: int, value: int) -> int:
            text = _read(caller, ptr, length, limit)
            if text is None:
                return abi.EFAULT if (length & MASK32) <= limit else abi.E2BIG
            if not text:
                return abi.EINVAL
            return ch.call_for_fd(op, lambda s: p.encode_i32_text(op, s, value, text))

        return open_

    def output(caller: wasmtime.Caller, ptr: int, length: int) -> int:
        data = _read(caller, ptr, length, p.MAX_DATA)
        if data is None:
            return abi.EFAULT if (length & MASK32) <= p.MAX_DATA else abi.E2BIG
        return ch.call(p.Op.OUTPUT, lambda s: p.encode(p.Op.OUTPUT, s, data))[0]

    def fd_read(caller: wasmtime.Caller, handle: int, ptr: int, length: int) -> int:
        fd = ch.handles.get(handle)
        if fd is None:
            return abi.EBADF
        length = min(length & MASK32, MAX_IO)
        if not _writable(caller, ptr, length):
            return abi.EFAULT
        try:
            data = os.read(fd, length)
        except OSError as e:
            return -(e.errno or errno.EIO)
        mem = _mem(caller)
        assert mem is not None
        mem.write(caller, data, ptr & MASK32)
        return len(data)

    def fd_write(caller: wasmtime.Caller, handle: int, ptr: int, length: int) -> int:
        fd = ch.handles.get(handle)
        if fd is None:
            return abi.EBADF
        data = _read(caller, ptr, min(length & MASK32, MAX_IO), MAX_IO)
        if data is None:
            return abi.EFAULT
        try:
            return os.write(fd, data)
        except OSError as e:
            return -(e.errno or errno.EIO)

    def fd_close(handle: int) -> int:
        fd = ch.handles.pop(handle, None)
        if fd is None:
            return abi.EBADF
        with contextlib.suppress(OSError):
            os.close(fd)
        return 0

    impls: dict[str, tuple[Callable[..., Any], bool]] = {
        "log": (log, True),
        "clock_now": (clock_now, False),
        "random_fill": (random_fill, True),
        "config_get": (_getter(p.Op.CONFIG_GET), True),
        "kv_get": (_getter(p.Op.KV_GET), True),
        "kv_set": (kv_set, True),
        "fs_open": (_opener(p.Op.FS_OPEN, p.MAX_PATH), True),
        "net_connect": (_opener(p.Op.NET_CONNECT, p.MAX_HOST), True),
        "fd_read": (fd_read, True),
        "fd_write": (fd_write, True),
        "fd_close": (fd_close, False),
        "output": (output, True),
    }
    for name, (params, results) in abi.IMPORTS.items():
        fn, needs_caller = impls[name]
        ft = wasmtime.FuncType(
            [_I32 if t == "i32" else _I64 for t in params],
            [_I32 if t == "i32" else _I64 for t in results],
        )
        linker.define_func(abi.IMPORT_MODULE, name, ft, fn, access_caller=needs_caller)
