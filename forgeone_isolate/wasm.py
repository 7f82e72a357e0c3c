"""The guest module: the one wasmtime engine configuration, ABI v1 checks, compilation.

The parent compiles (with parallel compilation off: a parallel compile in the parent hangs
any compile in a forked child) and serialises; the child deserialises those bytes into an
engine built by the same :func:`make_engine`, before its seccomp filter. Serialised
artifacts never touch disk, so only artifacts this process produced are ever deserialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import wasmtime

from forgeone_isolate import abi
from forgeone_isolate.errors import ManifestError

WASM_PAGE: Final = 65536
MAX_WASM_BYTES: Final = 16 * 1024 * 1024
#: Virtual address space wasmtime reserves per linear memory. Small, so RLIMIT_AS can hold
#: the child (wasmtime's default reserves about 4 GiB per memory).
MEMORY_RESERVATION: Final = 64 * 1024 * 1024
MEMORY_GUARD: Final = 64 * 1024


def make_config() -> wasmtime.Config:
    """The one engine configuration, used by the parent's compile and the child's load."""
    config = wasmtime.Config()
    config.parallel_compilation = False
    config.memory_reservation = MEMORY_RESERVATION
    config.memory_guard_size = MEMORY_GUARD
    # Room reserved for growth when a memory outgrows its reservation and moves; wasmtime's
    # default (2 GiB) would not fit under the child's RLIMIT_AS.
    config.memory_reservation_for_growth = MEMORY_RESERVATION
    # Copy-on-write memory images need memfd_create and fcntl after the seccomp filter.
    config.memory_init_cow = False
    config.cranelift_opt_level = "speed"
    config.wasm_threads = False
    return config


def make_engine() -> wasmtime.Engine:
    """A fresh engine with :func:`make_config`."""
    return wasmtime.Engine(make_config())


@dataclass(frozen=True)
class ModuleInfo:
    """What the parent learned about a guest module."""

    imports: tuple[str, ...]
    exports: tuple[str, ...]
    lifecycle: tuple[str, ...]
    memory_min_pages: int
    memory_max_pages: int | None
    handles_requests: bool


def _sig(ft: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(p) for p in ft.params), tuple(str(r) for r in ft.results)


def _fmt(sig: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    return f"({', '.join(sig[0])}) -> ({', '.join(sig[1])})"


def check_module(wasm: bytes, memory_limit_mb: int | None = None) -> ModuleInfo:
    """Validate ``wasm`` against ABI v1: imports only from ``forgeone`` with the table's
    signatures; ``memory`` exported; known exports well typed; the initial memory within
    ``memory_limit_mb``.

    Raises: ManifestError naming the offending import or export.
    """
    if len(wasm) > MAX_WASM_BYTES:
        raise ManifestError(f"wasm: module is {len(wasm)} bytes, more than {MAX_WASM_BYTES}")
    engine = make_engine()
    try:
        module = wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        raise ManifestError(f"wasm: not a valid WebAssembly module: {first}") from None
    imports: list[str] = []
    for imp in module.imports:
        where = f"{imp.module}.{imp.name}"
        if imp.module != abi.IMPORT_MODULE:
            raise ManifestError(
                f"wasm: import {where!r} is outside ABI v1 (module 'forgeone' only)"
            )
        if imp.name not in abi.IMPORTS:
            raise ManifestError(f"wasm: import {where!r} is not an ABI v1 function")
        if not isinstance(imp.type, wasmtime.FuncType):
            raise ManifestError(f"wasm: import {where!r} must be a function")
        want = abi.IMPORTS[imp.name]
        got = _sig(imp.type)
        if got != want:
            raise ManifestError(
                f"wasm: import {where!r} has type {_fmt(got)}, ABI v1 says {_fmt(want)}"
            )
        imports.append(imp.name)
    exports: dict[str, object] = {exp.name: exp.type for exp in module.exports}
    mem = exports.get(abi.MEMORY_EXPORT)
    if not isinstance(mem, wasmtime.MemoryType):
        raise ManifestError("wasm: the module must export its linear memory as 'memory'")
    if mem.is_64:
        raise ManifestError("wasm: 'memory' must be a 32-bit memory")
    for name, want in abi.EXPORT_FUNCS.items():
        if name not in exports:
            continue
        et = exports[name]
        if not isinstance(et, wasmtime.FuncType):
            raise ManifestError(f"wasm: export {name!r} must be a function")
        got = _sig(et)
        if got != want:
            raise ManifestError(
                f"wasm: export {name!r} has type {_fmt(got)}, ABI v1 says {_fmt(want)}"
            )
    if ("alloc" in exports) != ("handle" in exports):
        raise ManifestError("wasm: 'alloc' and 'handle' must be exported together")
    min_pages = int(mem.limits.min)
    if memory_limit_mb is not None and min_pages * WASM_PAGE > memory_limit_mb * 1024 * 1024:
        raise ManifestError(
            f"wasm: initial memory {min_pages * WASM_PAGE // 1024} KiB exceeds limits.memory_mb"
            f" = {memory_limit_mb}"
        )
    max_pages = mem.limits.max
    return ModuleInfo(
        imports=tuple(imports),
        exports=tuple(exports),
        lifecycle=tuple(n for n in abi.LIFECYCLE if n in exports),
        memory_min_pages=min_pages,
        memory_max_pages=None if max_pages is None else int(max_pages),
        handles_requests="handle" in exports,
    )


def wat_to_wasm(text: str) -> bytes:
    """Compile WebAssembly text. Raises: ManifestError."""
    try:
        return bytes(wasmtime.wat2wasm(text))
    except wasmtime.WasmtimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        raise ManifestError(f"plugin.wat: does not compile: {first}") from None


def compile_serialized(wasm: bytes) -> bytes:
    """Compile with :func:`make_engine`'s configuration and serialise (parent side)."""
    return bytes(wasmtime.Module(make_engine(), wasm).serialize())
