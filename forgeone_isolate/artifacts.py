"""Compiled guest modules, kept by the service: compile once (at install), start many times.

``launch`` compiles the guest in the parent at every launch; for the service that is most
of a start's CPU time. So the service compiles each module once (:meth:`ArtifactStore.ensure`)
and stores the serialised artifact in ``<state_dir>/artifacts/<sha256 of the wasm>.artifact``;
a plugin host, after verifying the package again, loads the artifact for the module's
digest instead of compiling (:func:`load_artifact`), and PID 1 deserialises it as before.

Only artifacts this service produced are ever deserialised: each file carries an
HMAC-SHA256 (key: ``<state_dir>/artifacts/key``, 32 random bytes, 0600) over its header
and the serialised bytes, and names the wasm digest it was compiled from, which the host
compares with the module of the package it just verified. The service deserialises each
artifact once per run before handing it out (a wasmtime upgrade or an engine setting
change makes old artifacts fail there, and they are compiled again).

File format: one JSON header line (``v``, ``wasm_sha256``, ``wasmtime``, ``lifecycle``,
``hmac``), a newline, then the serialised module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import importlib.metadata
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

FORMAT_VERSION: Final = 1
KEY_BYTES: Final = 32
MAX_ARTIFACT_BYTES: Final = 256 * 1024 * 1024
_TAG_RE: Final = re.compile(r"[0-9a-f]{64}\Z")  # hexdigest(): compare_digest takes ASCII only


@functools.cache
def wasmtime_version() -> str:
    """The installed wasmtime-py version (artifacts are bound to it). Cached: reading the
    distribution metadata costs about 1 MiB, paid once in the fork server."""
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Artifact:
    """A compiled module and what the launch needs to know of it."""

    wasm_sha256: str
    serialized: bytes
    lifecycle: tuple[str, ...]


def _tag(key: bytes, header: dict[str, Any], serialized: bytes) -> str:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body + b"\n" + serialized, hashlib.sha256).hexdigest()


def encode(key: bytes, artifact: Artifact) -> bytes:
    """The file's bytes for ``artifact``."""
    header: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "wasm_sha256": artifact.wasm_sha256,
        "wasmtime": wasmtime_version(),
        "lifecycle": list(artifact.lifecycle),
    }
    header["hmac"] = _tag(key, header, artifact.serialized)
    return json.dumps(header, sort_keys=True).encode() + b"\n" + artifact.serialized


def decode(key: bytes, data: bytes, wasm_sha256: str) -> Artifact | None:
    """The artifact in ``data`` if its HMAC, digest and wasmtime version hold; else None."""
    line, sep, serialized = data.partition(b"\n")
    if not sep:
        return None
    try:
        header = json.loads(line)
        if not isinstance(header, dict):
            return None
        tag = header.pop("hmac", None)
        if not isinstance(tag, str) or not _TAG_RE.match(tag):
            return None
        expected = _tag(key, header, serialized)
    except (ValueError, RecursionError):  # RecursionError: "[[[[...", nested past the stack
        return None
    if not hmac.compare_digest(tag, expected):
        return None
    lifecycle = header.get("lifecycle")
    if (
        header.get("v") != FORMAT_VERSION
        or header.get("wasm_sha256") != wasm_sha256
        or header.get("wasmtime") != wasmtime_version()
        or not isinstance(lifecycle, list)
        or not all(isinstance(x, str) for x in lifecycle)
    ):
        return None
    return Artifact(wasm_sha256, serialized, tuple(lifecycle))


def load_artifact(path: Path, key: bytes, wasm_sha256: str) -> Artifact | None:
    """Read and check one artifact file (the plugin host's side); None when unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_ARTIFACT_BYTES:
                return None
            data = f.read(size)  # exactly: a bound-sized read buffer would cost its pages
    except OSError:
        return None
    return decode(key, data, wasm_sha256)


class ArtifactStore:
    """The service's artifact directory. Thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path = directory / "key"
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            self.key = key_path.read_bytes()
        else:
            self.key = secrets.token_bytes(KEY_BYTES)
            with os.fdopen(fd, "wb") as f:
                f.write(self.key)
                f.flush()
                os.fsync(f.fileno())
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"{key_path}: not a {KEY_BYTES}-byte key")
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    def path_for(self, wasm_sha256: str) -> Path:
        """Where the artifact of the module with this digest lives."""
        if len(wasm_sha256) != 64 or any(c not in "0123456789abcdef" for c in wasm_sha256):
            raise ValueError(f"not a sha256: {wasm_sha256[:80]!r}")
        return self.directory / f"{wasm_sha256}.artifact"

    def known_good(self, wasm_sha256: str) -> bool:
        """Whether this run already checked (or made) the artifact."""
        with self._lock:
            return wasm_sha256 in self._checked and self.path_for(wasm_sha256).exists()

    def ensure(self, wasm: bytes, lifecycle: tuple[str, ...]) -> Path:
        """Make sure a good artifact for ``wasm`` exists; return its path.

        An existing file is used when its HMAC holds and wasmtime deserialises it;
        otherwise the module is compiled (with the one engine configuration) and written.
        """
        from forgeone_isolate import package
        from forgeone_isolate import wasm as wasm_mod

        digest = hashlib.sha256(wasm).hexdigest()
        path = self.path_for(digest)
        with self._lock:
            if digest in self._checked and path.exists():
                return path
        found = load_artifact(path, self.key, digest)
        if found is not None and found.lifecycle == lifecycle and _deserializes(found.serialized):
            with self._lock:
                self._checked.add(digest)
            return path
        artifact = Artifact(digest, wasm_mod.compile_serialized(wasm), lifecycle)
        package.write_atomic(path, encode(self.key, artifact), mode=0o600)
        with self._lock:
            self._checked.add(digest)
        return path

    def remove_unused(self, keep: set[str]) -> None:
        """Delete artifacts whose module digest is not in ``keep``."""
        for path in self.directory.glob("*.artifact"):
            if path.stem not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()
                with self._lock:
                    self._checked.discard(path.stem)


def _deserializes(serialized: bytes) -> bool:
    import wasmtime

    from forgeone_isolate.wasm import make_engine

    try:
        wasmtime.Module.deserialize(make_engine(), serialized)
    except (wasmtime.WasmtimeError, ValueError):
        return False
    return True


__all__ = ["Artifact", "ArtifactStore", "decode", "encode", "load_artifact", "wasmtime_version"]
