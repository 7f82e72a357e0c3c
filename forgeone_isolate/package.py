"""The .forgepkg format: a bounded in-memory loader, attestation, and a deterministic packer.

A package is a gzip-compressed ustar archive of regular files: ``manifest.json``,
``manifest.sig`` and every file the manifest's ``files`` lists (``plugin.wasm`` at least).
Nothing is ever extracted to disk. The loader refuses, naming the problem, anything that
is not exactly that: links, devices, FIFOs, directories, absolute or ``..`` paths, duplicate
names, unlisted or missing members, and input beyond the bounds below. Decompression is
bounded as it runs, so a gzip bomb is refused after at most ``MAX_UNCOMPRESSED`` bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forgeone_isolate import manifest as mf
from forgeone_isolate import signing, wasm
from forgeone_isolate.errors import ManifestError, PackageError, VerificationError

MAX_PACKAGE_BYTES: Final = 32 * 1024 * 1024
MAX_MEMBERS: Final = 66  # manifest.json + manifest.sig + manifest.MAX_FILES
MAX_MEMBER_BYTES: Final = 16 * 1024 * 1024
MAX_TOTAL_BYTES: Final = 32 * 1024 * 1024
MAX_SIG_BYTES: Final = 1024
#: tar headers, padding and the end-of-archive blocks on top of the member data
MAX_UNCOMPRESSED: Final = MAX_TOTAL_BYTES + MAX_MEMBERS * 3 * 512 + 20 * 512
_CHUNK: Final = 64 * 1024


def read_bounded_file(path: Path, limit: int = MAX_PACKAGE_BYTES) -> bytes:
    """Read a package file, refusing one larger than ``limit``. Raises: PackageError."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before fstat refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise PackageError(f"package {path}: not a regular file")
            data = f.read(limit + 1)
    except OSError as e:
        raise PackageError(f"package {path}: {e.strerror}") from None
    if len(data) > limit:
        raise PackageError(f"package {path}: larger than {limit} bytes")
    return data


def gunzip_bounded(data: bytes, limit: int = MAX_UNCOMPRESSED) -> bytes:
    """Decompress one gzip member, refusing output beyond ``limit`` as soon as it appears.

    Raises: PackageError (not gzip, corrupt, truncated, trailing data, too large).
    """
    if data[:2] != b"\x1f\x8b":
        raise PackageError("package: not a gzip file (bad magic)")
    d = zlib.decompressobj(wbits=31)
    out = bytearray()
    view = memoryview(data)
    pos = 0
    try:
        while not d.eof:
            if d.unconsumed_tail:
                chunk = d.decompress(d.unconsumed_tail, limit + 1 - len(out))
            elif pos < len(view):
                chunk = d.decompress(view[pos : pos + _CHUNK], limit + 1 - len(out))
                pos += _CHUNK
            else:
                raise PackageError("package: truncated gzip stream")
            out += chunk
            if len(out) > limit:
                raise PackageError(
                    f"package: uncompressed size exceeds {limit} bytes (compression bomb?)"
                )
    except zlib.error as e:
        raise PackageError(f"package: corrupt gzip stream ({e})") from None
    if d.unused_data or pos < len(view):
        raise PackageError("package: trailing data after the gzip stream")
    return bytes(out)


def _check_member_name(name: str) -> None:
    if "\x00" in name or "\\" in name:
        raise PackageError(f"package: member {name[:80]!r}: NUL or backslash in name")
    if name.startswith("/"):
        raise PackageError(f"package: member {name[:80]!r}: absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise PackageError(f"package: member {name[:80]!r}: '..' in path")
    if name not in mf.RESERVED_MEMBERS and not mf.MEMBER_RE.match(name):
        raise PackageError(f"package: member {name[:80]!r}: not a plain relative file name")


def read_members(data: bytes) -> dict[str, bytes]:
    """Parse the archive in memory into {name: bytes}, enforcing every structural rule.

    Raises: PackageError.
    """
    if len(data) > MAX_PACKAGE_BYTES:
        raise PackageError(f"package: larger than {MAX_PACKAGE_BYTES} bytes")
    raw = gunzip_bounded(data)
    _refuse_extension_headers(raw)
    members: dict[str, bytes] = {}
    total = 0
    # tarfile is not hardened against hostile input: besides TarError it raises ValueError,
    # RecursionError and others from deep inside its header parsing.
    try:
        tf = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")  # noqa: SIM115 - in memory
    except Exception as e:
        raise PackageError(f"package: not a tar archive ({_why(e)})") from None
    with tf:
        while True:
            try:
                m = tf.next()
            except Exception as e:
                raise PackageError(f"package: corrupt tar archive ({_why(e)})") from None
            if m is None:
                break
            if len(members) >= MAX_MEMBERS:
                raise PackageError(f"package: more than {MAX_MEMBERS} members")
            name = m.name
            kind = _kind(m)
            if kind != "file":
                raise PackageError(f"package: member {name[:80]!r} is a {kind}, not a regular file")
            _check_member_name(name)
            if name in members:
                raise PackageError(f"package: duplicate member {name[:80]!r}")
            if m.size < 0:
                raise PackageError(f"package: member {name[:80]!r} has a negative size")
            if m.size > MAX_MEMBER_BYTES:
                raise PackageError(
                    f"package: member {name[:80]!r} is {m.size} bytes, more than {MAX_MEMBER_BYTES}"
                )
            total += m.size
            if total > MAX_TOTAL_BYTES:
                raise PackageError(f"package: members total more than {MAX_TOTAL_BYTES} bytes")
            try:
                f = tf.extractfile(m)
                body = f.read(m.size + 1) if f is not None else b""
            except Exception as e:
                raise PackageError(
                    f"package: member {name[:80]!r} is truncated or corrupt ({_why(e)})"
                ) from None
            if len(body) != m.size:
                raise PackageError(f"package: member {name[:80]!r} is truncated")
            members[name] = body
        end = tf.offset
    # tarfile stops quietly at the first bad header after the first member; anything but
    # zero padding past the end it saw would be read differently by another parser.
    if raw[end:].strip(b"\0"):
        raise PackageError(
            "package: data after the end of the tar archive (corrupt or hidden member)"
        )
    return members


def _why(e: Exception) -> str:
    text = " ".join(str(e).split())[:120]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


#: header types that modify the header after them; pack writes plain ustar, never these.
_EXTENSION_HEADERS: Final = {
    b"x": "pax extended header",
    b"g": "pax global header",
    b"X": "Solaris extended header",
    b"L": "GNU long name header",
    b"K": "GNU long link name header",
}


def _header_size(field: bytes) -> int | None:
    """A header's size field as tarfile reads it (octal or GNU base-256); None if invalid."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    try:
        return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except (UnicodeDecodeError, ValueError):
        return None


def _refuse_extension_headers(raw: bytes) -> None:
    """Walk the headers as tarfile will and refuse pax and GNU extension headers.

    They are where tar parsers disagree (a pax ``path`` renames a member only for parsers
    that read it), and CPython 3.11's tarfile parses them recursively and in quadratic time
    (a few hundred bytes of pax header cost minutes). The walk stops at the end marker or at
    the first header that is not a regular file: read_members refuses that member before
    tarfile parses past it.

    Raises: PackageError.
    """
    offset = 0
    while offset + 512 <= len(raw):
        block = raw[offset : offset + 512]
        if not block.strip(b"\0"):
            return
        typeflag = block[156:157]
        if typeflag in _EXTENSION_HEADERS:
            raise PackageError(
                f"package: {_EXTENSION_HEADERS[typeflag]} at offset {offset};"
                " packages are plain ustar archives"
            )
        name = block[:100].split(b"\0", 1)[0]
        if typeflag not in (tarfile.REGTYPE, tarfile.AREGTYPE) or name.endswith(b"/"):
            return
        size = _header_size(block[124:136])
        if size is None or size < 0:
            return
        offset += 512 + -(-size // 512) * 512


def _kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hard link"
    if m.ischr() or m.isblk():
        return "device node"
    if m.isfifo():
        return "FIFO"
    if m.isdir():
        return "directory"
    if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not m.issparse():
        return "file"
    return f"tar member of type {m.type!r}"


@dataclass(frozen=True)
class VerifiedPackage:
    """A package whose signature, signer, hashes and member set all checked out."""

    manifest: mf.Manifest
    signer: str
    files: dict[str, bytes]
    digest: str  # sha256 of the package bytes
    manifest_bytes: bytes = b""  # the exact bytes the signature covers

    @property
    def wasm(self) -> bytes:
        """The entry module's bytes."""
        return self.files[self.manifest.entry]


@dataclass(frozen=True)
class UnverifiedPackage:
    """What ``inspect`` shows without a trust store: parsed, NOT attested."""

    manifest: mf.Manifest
    claimed_signer: str
    sizes: dict[str, int]
    digest: str


def _split(members: dict[str, bytes]) -> tuple[bytes, signing.Signature]:
    if mf.MANIFEST_NAME not in members:
        raise PackageError("package: missing manifest.json")
    if mf.SIGNATURE_NAME not in members:
        raise VerificationError("package: missing manifest.sig (unsigned package)")
    sig_bytes = members[mf.SIGNATURE_NAME]
    if len(sig_bytes) > MAX_SIG_BYTES:
        raise VerificationError("manifest.sig: too large")
    return members[mf.MANIFEST_NAME], signing.Signature.parse(sig_bytes)


def verify_bytes(data: bytes, trust: signing.TrustStore) -> VerifiedPackage:
    """Load and attest a package held in memory.

    Order: structure; signer trusted and not revoked; the signature over the manifest's
    exact bytes; only then the manifest's fields; then the member set and every hash.

    Raises: PackageError, VerificationError, ManifestError.
    """
    members = read_members(data)
    manifest_bytes, sig = _split(members)
    trust.check(sig.fingerprint)
    sig.verify(manifest_bytes)
    manifest = mf.parse_manifest(manifest_bytes)
    payload = {k: v for k, v in members.items() if k not in mf.RESERVED_MEMBERS}
    for name in sorted(payload):
        if name not in manifest.files:
            raise VerificationError(f"package: member {name!r} is not listed in the manifest")
    for name, digest in sorted(manifest.files.items()):
        if name not in payload:
            raise VerificationError(f"package: {name!r} is listed in the manifest but missing")
        actual = hashlib.sha256(payload[name]).hexdigest()
        if actual != digest:
            raise VerificationError(
                f"package: sha256 of {name!r} is {actual[:16]}…, the manifest says {digest[:16]}…"
            )
    return VerifiedPackage(
        manifest, sig.fingerprint, payload, hashlib.sha256(data).hexdigest(), manifest_bytes
    )


def verify_file(path: Path, trust: signing.TrustStore) -> VerifiedPackage:
    """:func:`verify_bytes` on a file. Raises: PackageError, VerificationError, ManifestError."""
    return verify_bytes(read_bounded_file(path), trust)


def inspect_bytes(data: bytes) -> UnverifiedPackage:
    """Parse without attesting (for ``inspect``). Raises: PackageError, VerificationError,
    ManifestError."""
    members = read_members(data)
    manifest_bytes, sig = _split(members)
    manifest = mf.parse_manifest(manifest_bytes)
    return UnverifiedPackage(
        manifest,
        sig.fingerprint,
        {k: len(v) for k, v in sorted(members.items())},
        hashlib.sha256(data).hexdigest(),
    )


# ---------------------------------------------------------------------------------- pack

SOURCE_WAT: Final = "plugin.wat"


def _collect_sources(src: Path) -> dict[str, bytes]:
    if not src.is_dir():
        raise PackageError(f"pack: {src} is not a directory")
    files: dict[str, bytes] = {}
    for root, dirs, names in os.walk(src, followlinks=False):
        dirs.sort()
        for name in sorted(names) + [d for d in dirs if (Path(root) / d).is_symlink()]:
            path = Path(root) / name
            rel = path.relative_to(src).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise PackageError(f"pack: {rel} is a symlink; packages hold regular files only")
            if not stat.S_ISREG(st.st_mode):
                raise PackageError(f"pack: {rel} is not a regular file")
            if rel in (mf.MANIFEST_NAME, mf.SIGNATURE_NAME):
                continue
            if not mf.MEMBER_RE.match(rel):
                raise PackageError(f"pack: {rel!r} is not an allowed member name")
            if st.st_size > MAX_MEMBER_BYTES:
                raise PackageError(f"pack: {rel} is larger than {MAX_MEMBER_BYTES} bytes")
            files[rel] = path.read_bytes()
    return files


def build_package(src: Path, key: Ed25519PrivateKey) -> bytes:
    """Validate ``src`` and return the signed package bytes (deterministic).

    Raises: PackageError, ManifestError.
    """
    man_path = src / mf.MANIFEST_NAME
    if not man_path.is_file():
        raise PackageError(f"pack: {man_path} not found")
    if man_path.stat().st_size > mf.MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest: larger than {mf.MAX_MANIFEST_BYTES} bytes")
    source_manifest = mf.parse_manifest(man_path.read_bytes(), require_files=False)
    obj = mf.load_json(man_path.read_bytes())
    if "files" in obj:
        raise ManifestError("manifest: leave out 'files'; pack computes it")

    files = _collect_sources(src)
    entry = source_manifest.entry
    if SOURCE_WAT in files:
        if entry != "plugin.wasm":
            raise ManifestError("pack: plugin.wat compiles to plugin.wasm; set entry accordingly")
        if "plugin.wasm" in files:
            raise PackageError("pack: both plugin.wat and plugin.wasm present; keep one")
        files["plugin.wasm"] = wasm.wat_to_wasm(files.pop(SOURCE_WAT).decode("utf-8", "replace"))
    if entry not in files:
        raise PackageError(f"pack: entry {entry!r} not found in {src}")
    if len(files) > mf.MAX_FILES:
        raise PackageError(f"pack: more than {mf.MAX_FILES} files")
    wasm.check_module(files[entry], source_manifest.limits.memory_mb)

    obj["files"] = {name: hashlib.sha256(body).hexdigest() for name, body in sorted(files.items())}
    manifest_bytes = mf.canonical_bytes(obj)
    mf.parse_manifest(manifest_bytes)  # the packed manifest must pass the launch-time parser
    members = {
        mf.MANIFEST_NAME: manifest_bytes,
        mf.SIGNATURE_NAME: signing.sign_manifest(key, manifest_bytes),
        **files,
    }
    return _deterministic_targz(members)


def _deterministic_targz(members: dict[str, bytes]) -> bytes:
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in [
            mf.MANIFEST_NAME,
            mf.SIGNATURE_NAME,
            *sorted(set(members) - mf.RESERVED_MEMBERS),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            try:
                tf.addfile(info, io.BytesIO(members[name]))
            except ValueError as e:  # ustar: a name longer than 100 + 155 bytes
                raise PackageError(f"pack: {name[:80]!r}: {e}") from None
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(tar_buf.getvalue())
    return out.getvalue()


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename: no half-written output.

    Raises: PackageError.
    """
    directory = path.parent if str(path.parent) else Path()
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise PackageError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        # the rename itself, on disk: a power loss after a caller recorded the file (a
        # registry row, say) must not leave the name missing
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise PackageError(f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
