"""Keys, signatures over the manifest's exact bytes, the trust store, and bad key files."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import KeyPair, deadline, make_keypair, one_line, plugin_source

from forgeone_isolate import cli, signing
from forgeone_isolate.errors import EXIT_BAD_INPUT, KeyFileError, VerificationError

pytest_plugins = ["helpers"]

#: an EC key on secp112r1, a curve OpenSSL parses and cryptography does not support
EC112_PRIVATE = b"""-----BEGIN PRIVATE KEY-----
ME4CAQAwEAYHKoZIzj0CAQYFK4EEAAYENzA1AgEBBA7WS8DgXOyN62eoroRGnaEg
Ax4ABGuPiryuhzBoTaoIvDc8xwl41rfXzy4M+2S2ous=
-----END PRIVATE KEY-----
"""
EC112_PUBLIC = b"""-----BEGIN PUBLIC KEY-----
MDIwEAYHKoZIzj0CAQYFK4EEAAYDHgAEa4+KvK6HMGhNqgi8NzzHCXjWt9fPLgz7
ZLai6w==
-----END PUBLIC KEY-----
"""

#: finite-field Diffie-Hellman keys: cryptography warns (deprecated) while loading them
DH_PRIVATE = b"""-----BEGIN PRIVATE KEY-----
MIGcAgEAMFMGCSqGSIb3DQEDATBGAkEAhnF9KbJ56bAc1bgIV5tuktvnpQKXmJ3c
TXarSO4/G8LaaqKpriE0LJXZCI5BFObKbszMU/OXOm6TPqCEMDjklwIBAgRCAkAn
FfzX1neQ5QN1eMbYqMTlQCZ5iuIBqCrDrYPSXHEp+Nbm6gPmn7XrkaD/ii5i/0ty
OmzFtLwk5zECWXwKvrEi
-----END PRIVATE KEY-----
"""
DH_PUBLIC = b"""-----BEGIN PUBLIC KEY-----
MIGaMFMGCSqGSIb3DQEDATBGAkEAhnF9KbJ56bAc1bgIV5tuktvnpQKXmJ3cTXar
SO4/G8LaaqKpriE0LJXZCI5BFObKbszMU/OXOm6TPqCEMDjklwIBAgNDAAJAc97U
gJpuWKF71la9pjfMUkyoNlrRdgoR+7tUhbLW00wCdrORxnYv6aVjbhLPSw8yGLCt
0DXpAzPake+9WOiabA==
-----END PUBLIC KEY-----
"""


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ------------------------------------------------------------------- keygen


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_keygen_private_key_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        pair = signing.keygen(tmp_path / "keys")
    finally:
        os.umask(old)
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.public_path.stat().st_mode) == 0o644
    assert pair.private_path.name == "signer.key"
    assert pair.public_path.name == "signer.pub"
    assert b"BEGIN PRIVATE KEY" in pair.private_path.read_bytes()
    assert b"BEGIN PUBLIC KEY" in pair.public_path.read_bytes()


def test_fingerprint_is_sha256_of_the_raw_public_key(keypair: KeyPair) -> None:
    raw = raw_public(keypair.key)
    assert len(raw) == 32
    assert keypair.fingerprint == hashlib.sha256(raw).hexdigest()
    public = signing.load_public_key(keypair.public_path)
    assert signing.fingerprint(public) == keypair.fingerprint


def test_keygen_makes_a_new_key_each_time(tmp_path: Path) -> None:
    a = signing.keygen(tmp_path / "a")
    b = signing.keygen(tmp_path / "b")
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize("existing", ["signer.key", "signer.pub"])
def test_keygen_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    out = tmp_path / "keys"
    out.mkdir()
    (out / existing).write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="already exists; refusing to overwrite"):
        signing.keygen(out)
    assert (out / existing).read_bytes() == b"precious"
    assert sorted(os.listdir(out)) == [existing]


def test_keygen_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    out.mkdir()
    (out / "signer.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeyFileError):
        signing.keygen(out)
    assert not (tmp_path / "elsewhere").exists()


def test_keygen_cli_prints_the_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keygen", "--out", str(tmp_path / "k")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    public = signing.load_public_key(tmp_path / "k" / "signer.pub")
    assert f"signer fingerprint: {signing.fingerprint(public)}" in out
    assert "(0600)" in out


def test_keygen_cli_refuses_overwrite_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keygen", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "signer.key").read_bytes()
    capsys.readouterr()
    assert cli.main(["keygen", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "refusing to overwrite" in one_line(capsys.readouterr().err)
    assert (tmp_path / "signer.key").read_bytes() == before


def test_keygen_cli_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"")
    assert cli.main(["keygen", "--out", str(target)]) == EXIT_BAD_INPUT
    assert "cannot create directory" in one_line(capsys.readouterr().err)


# --------------------------------------------------------------- signatures


def test_sign_and_verify_round_trip(keypair: KeyPair) -> None:
    sig_bytes = signing.sign_manifest(keypair.key, b'{"name": "x"}\n')
    assert sig_bytes.startswith(b"ed25519 ")
    assert sig_bytes.endswith(b"\n")
    assert sig_bytes.count(b"\n") == 1
    sig = signing.Signature.parse(sig_bytes)
    assert sig.fingerprint == keypair.fingerprint
    sig.verify(b'{"name": "x"}\n')


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b: b + b" ",
        lambda b: b[:-1],
        lambda b: b.replace(b"x", b"y"),
        lambda b: b.replace(b"\n", b"\r\n"),
        lambda b: b"",
    ],
)
def test_signature_covers_the_exact_bytes(
    keypair: KeyPair, tamper: Callable[[bytes], bytes]
) -> None:
    body = b'{"name": "x"}\n'
    sig = signing.Signature.parse(signing.sign_manifest(keypair.key, body))
    with pytest.raises(VerificationError, match="bad signature"):
        sig.verify(tamper(body))


def test_signature_from_another_key_does_not_verify(
    keypair: KeyPair, other_keypair: KeyPair
) -> None:
    body = b"{}"
    forged = b"ed25519 %s %s\n" % (
        raw_public(keypair.key).hex().encode(),
        other_keypair.key.sign(body).hex().encode(),
    )
    sig = signing.Signature.parse(forged)
    assert sig.fingerprint == keypair.fingerprint
    with pytest.raises(VerificationError, match="bad signature"):
        sig.verify(body)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s.upper(),
        lambda s: s.rstrip(b"\n"),
        lambda s: s + b"\n",
        lambda s: s.replace(b"\n", b"\r\n"),
        lambda s: s.replace(b"ed25519", b"ed448"),
        lambda s: s.replace(b" ", b"  ", 1),
        lambda s: b" " + s,
        lambda s: s[:-3] + b"\n",
        lambda s: s[:-1] + b"00\n",
        lambda s: s.replace(b" ", b"\t"),
        lambda s: b"",
        lambda s: s[:72] + b"g" + s[73:],
    ],
)
def test_signature_format_is_strict(keypair: KeyPair, mangle: Callable[[bytes], bytes]) -> None:
    good = signing.sign_manifest(keypair.key, b"{}")
    with pytest.raises(VerificationError, match=r"manifest\.sig: malformed"):
        signing.Signature.parse(mangle(good))


# ------------------------------------------------------------- trust store


def test_trust_single_key_file(keypair: KeyPair) -> None:
    store = signing.TrustStore.load(keypair.public_path)
    assert store.trusted == {keypair.fingerprint}
    assert store.revoked == frozenset()
    store.check(keypair.fingerprint)


def test_trust_directory_takes_every_pub_file(
    tmp_path: Path, keypair: KeyPair, other_keypair: KeyPair
) -> None:
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "alice.pub").write_bytes(keypair.public_path.read_bytes())
    (trust / "bob.pub").write_bytes(other_keypair.public_path.read_bytes())
    (trust / "README").write_text("not a key, ignored")
    (trust / "carol.pem").write_text("not *.pub, ignored")
    store = signing.TrustStore.load(trust)
    assert store.trusted == {keypair.fingerprint, other_keypair.fingerprint}


def test_keygen_directory_is_a_trust_store(keypair: KeyPair) -> None:
    # it holds signer.key too; only *.pub counts
    assert signing.TrustStore.load(keypair.directory).trusted == {keypair.fingerprint}


def test_unknown_signer_is_refused(keypair: KeyPair, other_keypair: KeyPair) -> None:
    store = signing.TrustStore.load(keypair.public_path)
    with pytest.raises(VerificationError, match="is not in the trust store"):
        store.check(other_keypair.fingerprint)


def test_revoked_signer_is_refused_even_when_trusted(tmp_path: Path, keypair: KeyPair) -> None:
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "signer.pub").write_bytes(keypair.public_path.read_bytes())
    (trust / "revoked").write_text(
        f"# revocation list\n\n  {keypair.fingerprint}  # leaked\n{'0' * 64}\n"
    )
    store = signing.TrustStore.load(trust)
    assert store.revoked == {keypair.fingerprint, "0" * 64}
    with pytest.raises(VerificationError, match=f"signer {keypair.fingerprint} is revoked"):
        store.check(keypair.fingerprint)


@pytest.mark.parametrize(
    "line", ["ABCDEF" + "0" * 58, "0" * 63, "0" * 65, "sha256:" + "0" * 64, "g" * 64]
)
def test_malformed_revocation_list(tmp_path: Path, keypair: KeyPair, line: str) -> None:
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "signer.pub").write_bytes(keypair.public_path.read_bytes())
    (trust / "revoked").write_text(f"# ok\n{line}\n")
    with pytest.raises(KeyFileError, match=r"revoked:2: not a sha256 fingerprint"):
        signing.TrustStore.load(trust)


def test_empty_trust_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="holds no public keys"):
        signing.TrustStore.load(tmp_path)


def test_missing_trust_store(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such file or directory"):
        signing.TrustStore.load(tmp_path / "absent")


# -------------------------------------------------- bad key files via the CLI


def _ed448_pem() -> bytes:
    return Ed448PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _encrypted_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


def _write(content: bytes | None) -> Callable[[Path, KeyPair], Path]:
    def make(d: Path, pair: KeyPair) -> Path:
        path = d / "key"
        if content is not None:
            path.write_bytes(content)
        return path

    return make


def _fifo(d: Path, pair: KeyPair) -> Path:
    os.mkfifo(d / "key")
    return d / "key"


def _directory(d: Path, pair: KeyPair) -> Path:
    (d / "key").mkdir()
    return d / "key"


def _public_instead(d: Path, pair: KeyPair) -> Path:
    return pair.public_path


BAD_PRIVATE_KEYS: dict[str, tuple[Callable[[Path, KeyPair], Path], str]] = {
    "missing": (_write(None), "No such file or directory"),
    "empty": (_write(b""), "not an unencrypted PEM private key"),
    "garbage": (_write(b"hello\n"), "not an unencrypted PEM private key"),
    "binary": (_write(os.urandom(64)), "not an unencrypted PEM private key"),
    "public key": (_public_instead, "not an unencrypted PEM private key"),
    "encrypted": (_write(_encrypted_pem()), "not an unencrypted PEM private key"),
    "ed448": (_write(_ed448_pem()), "not an ed25519 key"),
    "unsupported curve": (_write(EC112_PRIVATE), "not an unencrypted PEM private key"),
    "dh": (_write(DH_PRIVATE), "not an ed25519 key"),
    "too large": (_write(b"-" * (signing.MAX_KEY_FILE + 1)), "larger than"),
    "directory": (_directory, "Is a directory"),
    "fifo": (_fifo, "not a regular file"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PRIVATE_KEYS))
def test_pack_with_a_bad_private_key(
    kind: str, tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expect = BAD_PRIVATE_KEYS[kind]
    key = make(tmp_path, keypair)
    src = plugin_source("hello", tmp_path / "src")
    out = tmp_path / "out.forgepkg"
    with deadline(10):
        status = cli.main(["pack", str(src), "--key", str(key), "--out", str(out)])
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT
    assert "private key" in line
    assert expect in line
    assert not out.exists()
    with pytest.raises(KeyFileError):
        signing.load_private_key(key)


def _private_instead(d: Path, pair: KeyPair) -> Path:
    return pair.private_path


def _dir_with(content: bytes) -> Callable[[Path, KeyPair], Path]:
    def make(d: Path, pair: KeyPair) -> Path:
        trust = d / "trust"
        trust.mkdir()
        (trust / "signer.pub").write_bytes(pair.public_path.read_bytes())
        (trust / "broken.pub").write_bytes(content)
        return trust

    return make


def _dir_with_bad_revoked(d: Path, pair: KeyPair) -> Path:
    trust = d / "trust"
    trust.mkdir()
    (trust / "signer.pub").write_bytes(pair.public_path.read_bytes())
    (trust / "revoked").write_text("not-a-fingerprint\n")
    return trust


def _dir_with_fifo_key(d: Path, pair: KeyPair) -> Path:
    trust = d / "trust"
    trust.mkdir()
    os.mkfifo(trust / "pipe.pub")
    return trust


def _empty_dir(d: Path, pair: KeyPair) -> Path:
    (d / "trust").mkdir()
    return d / "trust"


BAD_TRUST: dict[str, tuple[Callable[[Path, KeyPair], Path], str]] = {
    "missing": (_write(None), "no such file or directory"),
    "garbage file": (_write(b"ssh-ed25519 AAAA...\n"), "not a PEM public key"),
    "private key as trust": (_private_instead, "not a PEM public key"),
    "ed448 public": (
        _write(
            Ed448PrivateKey.generate()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ),
        "not an ed25519 key",
    ),
    "unsupported curve": (_write(EC112_PUBLIC), "not a PEM public key"),
    "dh public": (_write(DH_PUBLIC), "not an ed25519 key"),
    "fifo": (_fifo, "not a regular file"),
    "dir with a broken key": (_dir_with(b"garbage"), "broken.pub: not a PEM public key"),
    "dir with a bad revocation list": (_dir_with_bad_revoked, "not a sha256 fingerprint"),
    "dir with a fifo key": (_dir_with_fifo_key, "not a regular file"),
    "empty dir": (_empty_dir, "holds no public keys"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TRUST))
def test_verify_with_a_bad_trust_store(
    kind: str, tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expect = BAD_TRUST[kind]
    src = plugin_source("hello", tmp_path / "src")
    pkg = tmp_path / "hello.forgepkg"
    assert cli.main(["pack", str(src), "--key", str(keypair.private_path), "--out", str(pkg)]) == 0
    capsys.readouterr()
    trust = make(tmp_path, keypair)
    with deadline(10):
        status = cli.main(["verify", str(pkg), "--trust", str(trust)])
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT
    assert expect in line
    assert "internal error" not in line


def test_load_private_key_returns_a_usable_key(keypair: KeyPair) -> None:
    key = signing.load_private_key(keypair.private_path)
    assert raw_public(key) == raw_public(keypair.key)


def test_make_keypair_helper(tmp_path: Path) -> None:
    pair = make_keypair(tmp_path / "k")
    assert pair.trust().trusted == {pair.fingerprint}
