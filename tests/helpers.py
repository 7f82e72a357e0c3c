"""Shared test machinery for packages: key pairs, signed packages, raw tar control.

Test modules load the fixtures with ``pytest_plugins = ["helpers"]`` and import the
functions. ``signed_package`` builds a package from a dict of members the way ``pack``
would, but every step can be bent for hostile cases: the manifest (a dict or exact bytes),
the signature, extra or raw tar entries (any type, declared size, pax headers, tar format),
bytes after the end of the archive, the gzip layer.

(PYTEST_DONT_REWRITE: test modules import this before pytest_plugins registers it, so
pytest could not rewrite its asserts anyway; the marker keeps it from warning about that.)
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import signal
import struct
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forgeone_isolate import manifest as mf
from forgeone_isolate import signing, wasm

REPO = Path(__file__).resolve().parent.parent
HELLO_DIR = REPO / "examples" / "hello"
PLUGINS_DIR = REPO / "tests" / "plugins"
BLOCK = 512

#: the smallest module ABI v1 accepts: a memory export, nothing else.
MINIMAL_WAT = '(module (memory (export "memory") 1))'
MINIMAL_WASM = wasm.wat_to_wasm(MINIMAL_WAT)

# ------------------------------------------------------------------------------ keys


@dataclass(frozen=True)
class KeyPair:
    """A key pair ``keygen`` wrote, with the loaded private key."""

    directory: Path
    private_path: Path
    public_path: Path
    fingerprint: str
    key: Ed25519PrivateKey

    def trust(self) -> signing.TrustStore:
        """A trust store holding only this key."""
        return signing.TrustStore(frozenset({self.fingerprint}), frozenset(), "test")


def make_keypair(directory: Path) -> KeyPair:
    """Run ``keygen`` into ``directory`` and load the result."""
    pair = signing.keygen(directory)
    key = signing.load_private_key(pair.private_path)
    return KeyPair(directory, pair.private_path, pair.public_path, pair.fingerprint, key)


@pytest.fixture
def keypair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A fresh signing key pair (the trusted signer in most tests)."""
    return make_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def other_keypair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A second key pair, trusted by nobody."""
    return make_keypair(tmp_path_factory.mktemp("other-keys"))


# ------------------------------------------------------------------------ manifests


def sha256(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()


def base_manifest(**overrides: Any) -> dict[str, Any]:
    """A valid manifest without ``files``; ``overrides`` replace keys (None removes one)."""
    obj: dict[str, Any] = {
        "name": "sample",
        "version": "1.0.0",
        "abi": 1,
        "entry": "plugin.wasm",
        "permissions": {
            "fs.read": [],
            "fs.write": [],
            "net.connect": [],
            "kv": False,
            "config": [],
        },
        "limits": {
            "memory_mb": 16,
            "cpu_percent": 50,
            "pids": 4,
            "io_bps": 1048576,
            "net_bps": 1000000,
            "timeout_s": 10,
        },
    }
    for key, value in overrides.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def manifest_for(files: Mapping[str, bytes], **overrides: Any) -> dict[str, Any]:
    """``base_manifest`` with ``files`` listing the sha256 of each of ``files``."""
    obj = base_manifest(**overrides)
    if "files" not in overrides:
        obj["files"] = {name: sha256(body) for name, body in sorted(files.items())}
    return obj


# ------------------------------------------------------------------------- raw tar


@dataclass
class Entry:
    """One raw tar entry: any type, any name, a declared size that may lie."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # the header's size field; None: len(data)
    pax: dict[str, str] = field(default_factory=dict)
    mode: int = 0o644
    fmt: int = tarfile.USTAR_FORMAT

    def header(self) -> bytes:
        """The header block(s) tarfile would write for this entry (pax/GNU ones included)."""
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.linkname = self.linkname
        info.size = len(self.data) if self.size is None else self.size
        info.mode = self.mode
        info.mtime = 0
        info.uname = info.gname = ""
        info.pax_headers = dict(self.pax)
        if self.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        if self.size is not None and self.size < 0:
            info.size = 0
            buf = bytearray(info.tobuf(self.fmt, "utf-8", "surrogateescape"))
            buf[-BLOCK + 124 : -BLOCK + 136] = base256(self.size)
            return fix_checksum(bytes(buf), len(buf) - BLOCK)
        return info.tobuf(self.fmt, "utf-8", "surrogateescape")

    def encode(self) -> bytes:
        """Header plus data padded to whole blocks."""
        return self.header() + pad(self.data)


def pad(data: bytes) -> bytes:
    """``data`` padded with NULs to a multiple of 512 bytes."""
    return data + b"\0" * (-len(data) % BLOCK)


def base256(n: int, width: int = 12) -> bytes:
    """GNU base-256 encoding of ``n`` (negative numbers too) in a ``width``-byte field."""
    if n >= 0:
        return b"\x80" + n.to_bytes(width - 1, "big")
    return b"\xff" + (256 ** (width - 1) + n).to_bytes(width - 1, "big")


def fix_checksum(raw: bytes, offset: int) -> bytes:
    """Recompute the checksum of the header block at ``offset``."""
    buf = bytearray(raw)
    block = buf[offset : offset + BLOCK]
    block[148:156] = b" " * 8
    chksum = sum(block)
    buf[offset + 148 : offset + 156] = b"%06o\0 " % chksum
    return bytes(buf)


def tar_bytes(entries: Iterable[Entry], *, end: bool = True) -> bytes:
    """A tar stream of ``entries``, with the two end-of-archive blocks unless ``end=False``."""
    out = b"".join(e.encode() for e in entries)
    return out + (b"\0" * (2 * BLOCK) if end else b"")


def gz(data: bytes) -> bytes:
    """Deterministic gzip."""
    return gzip.compress(data, compresslevel=6, mtime=0)


def gunzip(data: bytes) -> bytes:
    """Plain gzip decompression (test side)."""
    return gzip.decompress(data)


def signed_entries(
    key: Ed25519PrivateKey,
    files: Mapping[str, bytes],
    *,
    manifest: Mapping[str, Any] | bytes | None = None,
    sig: bytes | None = None,
) -> list[Entry]:
    """manifest.json, manifest.sig (over the manifest's exact bytes) and ``files``."""
    if manifest is None:
        manifest = manifest_for(files)
    body = manifest if isinstance(manifest, bytes) else mf.canonical_bytes(manifest)
    signature = signing.sign_manifest(key, body) if sig is None else sig
    entries = [Entry(mf.MANIFEST_NAME, body), Entry(mf.SIGNATURE_NAME, signature)]
    entries += [Entry(name, data) for name, data in files.items()]
    return entries


def signed_package(
    key: Ed25519PrivateKey,
    files: Mapping[str, bytes] | None = None,
    *,
    manifest: Mapping[str, Any] | bytes | None = None,
    sig: bytes | None = None,
    omit: Sequence[str] = (),
    extra: Sequence[Entry] = (),
    after_end: bytes = b"",
) -> bytes:
    """A gzip'd tar package signed by ``key``, from a dict of members.

    ``files`` defaults to a minimal valid plugin.wasm; ``manifest`` defaults to one listing
    ``files`` (a dict is serialised canonically, bytes are used as they are); ``sig``
    replaces manifest.sig; ``omit`` drops members by name; ``extra`` appends raw entries;
    ``after_end`` follows the end-of-archive blocks.
    """
    if files is None:
        files = {"plugin.wasm": MINIMAL_WASM}
    entries = [
        e for e in signed_entries(key, files, manifest=manifest, sig=sig) if e.name not in omit
    ]
    return gz(tar_bytes([*entries, *extra]) + after_end)


def write_zero_bomb(path: Path, total: int = 1 << 30, chunk: int = 1 << 20) -> int:
    """Write a gzip'd tar of one ``plugin.wasm`` of ``total`` zero bytes, streaming.

    Every chunk of zeros is compressed after a full flush, so its deflate bytes are the same
    each time: compressed once, written ``total // chunk`` times. Only the CRC walks the
    zeros, a chunk at a time. Returns the file's size.
    """
    header = Entry("plugin.wasm", size=total).header()
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(chunk)
    segment = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    for _ in range(total // chunk):
        crc = zlib.crc32(zeros, crc)
    with path.open("wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")
        f.write(first)
        for _ in range(total // chunk):
            f.write(segment)
        f.write(tail)
        f.write(struct.pack("<II", crc, (len(header) + total) & 0xFFFFFFFF))
    return path.stat().st_size


# --------------------------------------------------------------- plugin source dirs


def plugin_source(name: str, dest: Path) -> Path:
    """Copy a sample plugin into ``dest`` as a pack source dir (manifest.json + plugin.wat).

    ``hello`` is examples/hello; any other name is tests/plugins/NAME.{wat,json}.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if name == "hello":
        wat, man = HELLO_DIR / "plugin.wat", HELLO_DIR / "manifest.json"
    else:
        wat, man = PLUGINS_DIR / f"{name}.wat", PLUGINS_DIR / f"{name}.json"
    (dest / "plugin.wat").write_bytes(wat.read_bytes())
    (dest / mf.MANIFEST_NAME).write_bytes(man.read_bytes())
    return dest


# ---------------------------------------------------------------- disk write checks


def snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``roots`` with its mode, size and mtime (symlinks not followed)."""
    out: dict[str, tuple[int, int, int]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
        st = os.lstat(root)
        out[str(root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MUTATING_EVENTS = frozenset(
    {
        "os.mkdir",
        "os.rename",
        "os.remove",
        "os.rmdir",
        "os.symlink",
        "os.link",
        "os.chmod",
        "os.chown",
        "os.truncate",
        "os.utime",
        "shutil.copyfile",
        "shutil.move",
        "shutil.rmtree",
        "tempfile.mkstemp",
        "tempfile.mkdtemp",
    }
)
_recorders: list[list[str]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _recorders:
        return
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or "__pycache__" in str(path):
            return
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        ):
            _recorders[-1].append(f"open {path!s} {mode} {flags:#o}")
    elif event in _MUTATING_EVENTS:
        if "__pycache__" in repr(args):
            return
        _recorders[-1].append(f"{event} {args!r}")


sys.addaudithook(_audit)


@contextlib.contextmanager
def record_writes() -> Iterator[list[str]]:
    """Collect every file-system write this process attempts inside the block."""
    writes: list[str] = []
    _recorders.append(writes)
    try:
        yield writes
    finally:
        _recorders.remove(writes)


class DeadlineExceeded(Exception):
    """The block under ``deadline`` ran too long (a blocking call hung)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block with DeadlineExceeded after ``seconds`` (SIGALRM, main thread)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise DeadlineExceeded(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(err: str) -> str:
    """Assert ``err`` is exactly one line with no traceback, and return it."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    assert err.endswith("\n")
    return lines[0]


def make_plan(name: str = "seq", host_uid: int = 1_500_000_000) -> Any:
    """A SandboxPlan for a 16 MiB, 5 s plugin with ``start`` and no permissions (the
    sequence tests and the isolation check use it; nothing is launched)."""
    from forgeone_isolate import policy
    from forgeone_isolate.manifest import Limits, Manifest, Permissions
    from forgeone_isolate.plan import build_plan
    from forgeone_isolate.semver import Version

    manifest = Manifest(
        name=name,
        version=Version.parse("1.0.0"),
        abi=1,
        entry="plugin.wasm",
        files={"plugin.wasm": "0" * 64},
        permissions=Permissions(),
        limits=Limits(memory_mb=16, timeout_s=5),
    )
    return build_plan(manifest, "f" * 64, host_uid, ("start",), policy.Effective())
