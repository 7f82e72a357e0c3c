"""Ed25519 keys, signatures over the manifest's exact bytes, and the trust store.

Formats:
- private key: PKCS#8 PEM, unencrypted, mode 0600 (``keygen``);
- public key: SubjectPublicKeyInfo PEM (``keygen``); the trust store takes these;
- ``manifest.sig``: one ASCII line ``ed25519 <public key, 64 hex> <signature, 128 hex>\\n``;
- fingerprint: sha256 of the raw 32-byte public key, lowercase hex;
- trust store: a directory of ``*.pub`` files, one key each, with an optional
  ``revoked`` file (one fingerprint per line, ``#`` comments), or a single key file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.utils import CryptographyDeprecationWarning

from forgeone_isolate.errors import KeyFileError, VerificationError

SIG_RE: Final = re.compile(rb"^ed25519 ([0-9a-f]{64}) ([0-9a-f]{128})\n\Z")
MAX_KEY_FILE: Final = 16 * 1024
MAX_TRUSTED_KEYS: Final = 1024
REVOKED_NAME: Final = "revoked"
PRIVATE_NAME: Final = "signer.key"
PUBLIC_NAME: Final = "signer.pub"


def fingerprint(public: Ed25519PublicKey) -> str:
    """sha256 of the raw public key, hex."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class KeyPair:
    """Where ``keygen`` wrote a key pair, and its fingerprint."""

    private_path: Path
    public_path: Path
    fingerprint: str


def keygen(out_dir: Path) -> KeyPair:
    """Create ``signer.key`` (0600) and ``signer.pub`` in ``out_dir``; never overwrites.

    Raises: KeyFileError if either file exists or cannot be written.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise KeyFileError(f"keygen: cannot create directory {out_dir}: {e.strerror}") from None
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    priv_path, pub_path = out_dir / PRIVATE_NAME, out_dir / PUBLIC_NAME
    for path in (priv_path, pub_path):
        if path.exists():
            raise KeyFileError(f"keygen: {path} already exists; refusing to overwrite it")
    _write_new(priv_path, priv, 0o600)
    try:
        _write_new(pub_path, pub, 0o644)
    except KeyFileError:
        priv_path.unlink(missing_ok=True)
        raise
    return KeyPair(priv_path, pub_path, fingerprint(key.public_key()))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as e:
        raise KeyFileError(f"keygen: cannot create {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow it
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_small(path: Path, what: str) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before fstat refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise KeyFileError(f"{what} {path}: not a regular file")
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"{what} {path}: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{what} {path}: larger than {MAX_KEY_FILE} bytes")
    return data


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence cryptography's deprecation warnings (e.g. for a DH key): an error is one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PKCS#8 PEM ed25519 private key. Raises: KeyFileError."""
    data = _read_small(path, "private key")
    try:
        with _quiet():
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"private key {path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path}: not an ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM ed25519 public key. Raises: KeyFileError."""
    data = _read_small(path, "public key")
    try:
        with _quiet():
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"public key {path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key {path}: not an ed25519 key")
    return key


def sign_manifest(key: Ed25519PrivateKey, manifest: bytes) -> bytes:
    """The ``manifest.sig`` bytes for ``manifest``."""
    raw_pub = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return b"ed25519 %s %s\n" % (raw_pub.hex().encode(), key.sign(manifest).hex().encode())


@dataclass(frozen=True)
class Signature:
    """A parsed ``manifest.sig``: the claimed signer and the signature bytes."""

    public_key: Ed25519PublicKey
    signature: bytes

    @property
    def fingerprint(self) -> str:
        """The claimed signer's fingerprint (not yet trusted)."""
        return fingerprint(self.public_key)

    @classmethod
    def parse(cls, data: bytes) -> Signature:
        """Parse the strict one-line format. Raises: VerificationError."""
        m = SIG_RE.match(data)
        if m is None:
            raise VerificationError(
                "manifest.sig: malformed (expected 'ed25519 <64 hex key> <128 hex signature>')"
            )
        try:
            public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(m.group(1).decode()))
        except ValueError:
            raise VerificationError(
                "manifest.sig: the public key is not a valid ed25519 key"
            ) from None
        return cls(public, bytes.fromhex(m.group(2).decode()))

    def verify(self, manifest: bytes) -> None:
        """Check the signature over ``manifest``'s exact bytes. Raises: VerificationError."""
        try:
            self.public_key.verify(self.signature, manifest)
        except InvalidSignature:
            raise VerificationError(
                "signature: manifest.sig does not match manifest.json (bad signature)"
            ) from None


@dataclass(frozen=True)
class TrustStore:
    """Trusted signer fingerprints and the revoked ones."""

    trusted: frozenset[str]
    revoked: frozenset[str]
    source: str

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        """A directory of ``*.pub`` files (+ optional ``revoked``), or one key file.

        Raises: KeyFileError.
        """
        if path.is_dir():
            keys = sorted(p for p in path.iterdir() if p.suffix == ".pub")
            if len(keys) > MAX_TRUSTED_KEYS:
                raise KeyFileError(f"trust store {path}: more than {MAX_TRUSTED_KEYS} keys")
            trusted = frozenset(fingerprint(load_public_key(p)) for p in keys)
            revoked_path = path / REVOKED_NAME
            revoked = _parse_revoked(revoked_path) if revoked_path.exists() else frozenset[str]()
        elif path.exists():
            trusted = frozenset({fingerprint(load_public_key(path))})
            revoked = frozenset()
        else:
            raise KeyFileError(f"trust store {path}: no such file or directory")
        if not trusted:
            raise KeyFileError(f"trust store {path}: holds no public keys (*.pub)")
        return cls(trusted, revoked, str(path))

    def check(self, signer: str) -> None:
        """Refuse a revoked or unknown signer. Raises: VerificationError."""
        if signer in self.revoked:
            raise VerificationError(f"signer {signer} is revoked in {self.source}")
        if signer not in self.trusted:
            raise VerificationError(f"signer {signer} is not in the trust store {self.source}")


def _parse_revoked(path: Path) -> frozenset[str]:
    out: set[str] = set()
    text = _read_small(path, "revocation list")
    for lineno, raw in enumerate(text.decode("ascii", "replace").splitlines(), 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        if not re.fullmatch(r"[0-9a-f]{64}", entry):
            raise KeyFileError(f"revocation list {path}:{lineno}: not a sha256 fingerprint")
        out.add(entry)
    return frozenset(out)
