"""The loader, attestation and the packer, called directly (the CLI is in test_pack_cli)."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import zlib
from pathlib import Path

import pytest
from helpers import (
    MINIMAL_WASM,
    Entry,
    KeyPair,
    base_manifest,
    deadline,
    gunzip,
    gz,
    manifest_for,
    plugin_source,
    record_writes,
    sha256,
    signed_package,
    tar_bytes,
)

from forgeone_isolate import manifest as mf
from forgeone_isolate import package, signing
from forgeone_isolate.errors import ManifestError, PackageError, VerificationError

pytest_plugins = ["helpers"]


# ------------------------------------------------------------ gunzip_bounded


def test_gunzip_round_trip() -> None:
    data = os.urandom(100_000)
    assert package.gunzip_bounded(gzip.compress(data)) == data
    assert package.gunzip_bounded(gzip.compress(b"")) == b""


def test_gunzip_limit_is_inclusive() -> None:
    data = gzip.compress(bytes(1000))
    assert package.gunzip_bounded(data, limit=1000) == bytes(1000)
    with pytest.raises(PackageError, match="exceeds 999 bytes"):
        package.gunzip_bounded(data, limit=999)


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b"", "not a gzip file"),
        (b"\x1f", "not a gzip file"),
        (b"PK\x03\x04", "not a gzip file"),
        (b"\x1f\x8b", "truncated gzip stream"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", "truncated gzip stream"),
        (b"\x1f\x8b\x09\x00\x00\x00\x00\x00\x02\xff\x03\x00", "corrupt gzip stream"),
        (gzip.compress(b"abc")[:-4], "truncated gzip stream"),
        (gzip.compress(b"abc") + b"\0", "trailing data"),
        (gzip.compress(b"abc") * 2, "trailing data"),
    ],
)
def test_gunzip_refuses(data: bytes, expect: str) -> None:
    with pytest.raises(PackageError, match=expect):
        package.gunzip_bounded(data)


def test_gunzip_bomb_stops_at_the_limit_without_decompressing_it_all() -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    bomb = b"".join(comp.compress(chunk) for _ in range(256)) + comp.flush()  # 256 MiB
    with pytest.raises(PackageError, match="compression bomb"):
        package.gunzip_bounded(bomb, limit=4 << 20)


# ----------------------------------------------------------------- read_members


def test_read_members_returns_every_member(keypair: KeyPair) -> None:
    files = {"plugin.wasm": MINIMAL_WASM, "data/a/b.txt": b"b", "_x": b""}
    members = package.read_members(signed_package(keypair.key, files))
    assert list(members)[:2] == ["manifest.json", "manifest.sig"]
    assert {k: v for k, v in members.items() if k in files} == files


def test_read_members_at_the_member_count_bound(keypair: KeyPair) -> None:
    extra = [Entry(f"f{i}", b"") for i in range(package.MAX_MEMBERS - 3)]
    data = signed_package(keypair.key, extra=extra)
    assert len(package.read_members(data)) == package.MAX_MEMBERS
    with pytest.raises(PackageError, match=f"more than {package.MAX_MEMBERS} members"):
        package.read_members(signed_package(keypair.key, extra=[*extra, Entry("one-more")]))


def test_member_size_bounds(monkeypatch: pytest.MonkeyPatch, keypair: KeyPair) -> None:
    monkeypatch.setattr(package, "MAX_MEMBER_BYTES", 1000)
    monkeypatch.setattr(package, "MAX_TOTAL_BYTES", 3000)
    at_bound = signed_package(keypair.key, extra=[Entry("a", bytes(1000))])
    assert len(package.read_members(at_bound)["a"]) == 1000
    with pytest.raises(PackageError, match="is 1001 bytes, more than 1000"):
        package.read_members(signed_package(keypair.key, extra=[Entry("a", bytes(1001))]))
    three = [Entry(n, bytes(1000)) for n in "abc"]
    with pytest.raises(PackageError, match="members total more than 3000 bytes"):
        package.read_members(signed_package(keypair.key, extra=three))


def test_truncated_member_data(keypair: KeyPair) -> None:
    raw = tar_bytes([Entry("a", b"x" * 2000)], end=False)[:1024]
    with pytest.raises(PackageError, match="member 'a' is truncated or corrupt"):
        package.read_members(gz(raw))


def test_zero_padding_after_the_end_is_fine(keypair: KeyPair) -> None:
    data = signed_package(keypair.key, after_end=b"\0" * 10 * 512)
    assert "plugin.wasm" in package.read_members(data)


def test_package_size_bound() -> None:
    with pytest.raises(PackageError, match=f"larger than {package.MAX_PACKAGE_BYTES}"):
        package.read_members(b"\x1f\x8b" + bytes(package.MAX_PACKAGE_BYTES))


@pytest.mark.parametrize(
    "name", ["a\\b", "/a", "../a", "a/../b", "a/./b", "./a", "a//b", ".a", "a/.b", "a b", "é"]
)
def test_member_names_refused(keypair: KeyPair, name: str) -> None:
    with pytest.raises(PackageError, match="member"):
        package.read_members(signed_package(keypair.key, extra=[Entry(name, b"x")]))


# ------------------------------------------------------------------- verify_bytes


def test_verify_bytes_returns_the_attested_package(keypair: KeyPair) -> None:
    files = {"plugin.wasm": MINIMAL_WASM, "data/x.txt": b"x"}
    data = signed_package(keypair.key, files)
    pkg = package.verify_bytes(data, keypair.trust())
    assert pkg.signer == keypair.fingerprint
    assert pkg.files == files
    assert pkg.wasm == MINIMAL_WASM
    assert pkg.digest == hashlib.sha256(data).hexdigest()
    assert pkg.manifest.name == "sample"
    assert dict(pkg.manifest.files) == {k: sha256(v) for k, v in files.items()}


def test_trust_is_checked_before_any_manifest_field(
    keypair: KeyPair, other_keypair: KeyPair
) -> None:
    # a stranger's manifest is never parsed: its signer is refused first
    data = signed_package(other_keypair.key, manifest=b"[" * 60_000)
    with pytest.raises(VerificationError, match="is not in the trust store"):
        package.verify_bytes(data, keypair.trust())


def test_signature_is_checked_before_any_manifest_field(keypair: KeyPair) -> None:
    sig = signing.sign_manifest(keypair.key, mf.canonical_bytes(manifest_for({})))
    data = signed_package(keypair.key, manifest=b"not json at all", sig=sig)
    with pytest.raises(VerificationError, match="bad signature"):
        package.verify_bytes(data, keypair.trust())


def test_revoked_beats_trusted(keypair: KeyPair) -> None:
    store = signing.TrustStore(
        frozenset({keypair.fingerprint}), frozenset({keypair.fingerprint}), "t"
    )
    with pytest.raises(VerificationError, match="is revoked"):
        package.verify_bytes(signed_package(keypair.key), store)


def test_oversized_signature_member(keypair: KeyPair) -> None:
    data = signed_package(keypair.key, sig=b"ed25519 " + b"0" * 2000 + b"\n")
    with pytest.raises(VerificationError, match=r"manifest\.sig: too large"):
        package.verify_bytes(data, keypair.trust())


def test_signature_key_that_is_not_a_point(keypair: KeyPair) -> None:
    # every 32 bytes is accepted as a key by some libraries; whatever happens, it must refuse
    sig = b"ed25519 " + b"f" * 64 + b" " + b"0" * 128 + b"\n"
    with pytest.raises(VerificationError):
        package.verify_bytes(signed_package(keypair.key, sig=sig), keypair.trust())


def test_entry_other_than_plugin_wasm(keypair: KeyPair) -> None:
    files = {"bin/main.wasm": MINIMAL_WASM}
    manifest = manifest_for(files, entry="bin/main.wasm")
    pkg = package.verify_bytes(
        signed_package(keypair.key, files, manifest=manifest), keypair.trust()
    )
    assert pkg.wasm == MINIMAL_WASM


# ------------------------------------------------------------------ inspect_bytes


def test_inspect_bytes_does_not_need_trust(other_keypair: KeyPair) -> None:
    data = signed_package(other_keypair.key)
    info = package.inspect_bytes(data)
    assert info.claimed_signer == other_keypair.fingerprint
    assert info.manifest.name == "sample"
    assert info.sizes["plugin.wasm"] == len(MINIMAL_WASM)
    assert set(info.sizes) == {"manifest.json", "manifest.sig", "plugin.wasm"}
    assert info.digest == sha256(data)


# -------------------------------------------------------------- read_bounded_file


def test_read_bounded_file(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_bytes(b"x" * 10)
    assert package.read_bounded_file(path, limit=10) == b"x" * 10
    with pytest.raises(PackageError, match="larger than 9 bytes"):
        package.read_bounded_file(path, limit=9)


def test_read_bounded_file_does_not_block_on_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with deadline(5), pytest.raises(PackageError, match="not a regular file"):
        package.read_bounded_file(tmp_path / "fifo")


def test_read_bounded_file_refuses_a_device() -> None:
    with pytest.raises(PackageError, match="not a regular file"):
        package.read_bounded_file(Path("/dev/zero"))


def test_verify_file_reads_through_a_symlink_to_a_regular_file(
    tmp_path: Path, keypair: KeyPair
) -> None:
    (tmp_path / "real").write_bytes(signed_package(keypair.key))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert package.verify_file(tmp_path / "link", keypair.trust()).signer == keypair.fingerprint


# -------------------------------------------------------------------- build_package


def test_build_package_matches_the_format(tmp_path: Path, keypair: KeyPair) -> None:
    src = plugin_source("hello", tmp_path / "src")
    data = package.build_package(src, keypair.key)
    assert data[:2] == b"\x1f\x8b"
    assert data[4:8] == b"\0\0\0\0"  # gzip mtime 0
    members = package.read_members(data)
    assert list(members) == ["manifest.json", "manifest.sig", "plugin.wasm"]
    manifest = mf.parse_manifest(members["manifest.json"])
    assert dict(manifest.files) == {"plugin.wasm": sha256(members["plugin.wasm"])}
    assert members["manifest.json"] == mf.canonical_bytes(manifest.as_dict())
    pkg = package.verify_bytes(data, keypair.trust())
    assert pkg.manifest.limits.memory_mb == 16


def test_build_package_is_deterministic(
    tmp_path: Path, keypair: KeyPair, other_keypair: KeyPair
) -> None:
    a = plugin_source("hello", tmp_path / "a")
    b = plugin_source("hello", tmp_path / "b")
    os.utime(b / "plugin.wat", (1, 1))
    os.chmod(b / "manifest.json", 0o600)
    first = package.build_package(a, keypair.key)
    assert package.build_package(a, keypair.key) == first
    assert package.build_package(b, keypair.key) == first
    assert package.build_package(a, other_keypair.key) != first


def test_build_package_keeps_subdirectories(tmp_path: Path, keypair: KeyPair) -> None:
    src = plugin_source("hello", tmp_path / "src")
    (src / "assets" / "img").mkdir(parents=True)
    (src / "assets" / "img" / "logo.svg").write_bytes(b"<svg/>")
    (src / "README.md").write_bytes(b"# hello")
    pkg = package.verify_bytes(package.build_package(src, keypair.key), keypair.trust())
    assert set(pkg.files) == {"plugin.wasm", "assets/img/logo.svg", "README.md"}


def test_build_package_too_long_for_ustar(tmp_path: Path, keypair: KeyPair) -> None:
    src = plugin_source("hello", tmp_path / "src")
    deep = src / ("a" * 100) / ("b" * 100)
    deep.mkdir(parents=True)
    (deep / ("c" * 60)).write_bytes(b"x")
    with pytest.raises(PackageError, match=r"pack:.*name is too long"):
        package.build_package(src, keypair.key)


def test_build_package_refuses_initial_memory_beyond_the_limit(
    tmp_path: Path, keypair: KeyPair
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "plugin.wat").write_text('(module (memory (export "memory") 17))')
    (src / "manifest.json").write_bytes(mf.canonical_bytes(base_manifest(limits={"memory_mb": 1})))
    with pytest.raises(ManifestError, match=r"exceeds limits\.memory_mb = 1"):
        package.build_package(src, keypair.key)


def test_build_package_takes_a_prebuilt_wasm(tmp_path: Path, keypair: KeyPair) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "plugin.wasm").write_bytes(MINIMAL_WASM)
    (src / "manifest.json").write_bytes(mf.canonical_bytes(base_manifest()))
    pkg = package.verify_bytes(package.build_package(src, keypair.key), keypair.trust())
    assert pkg.wasm == MINIMAL_WASM


def test_build_package_refuses_invalid_wasm(tmp_path: Path, keypair: KeyPair) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "plugin.wasm").write_bytes(b"\0asm\x01\0\0\0garbage")
    (src / "manifest.json").write_bytes(mf.canonical_bytes(base_manifest()))
    with pytest.raises(ManifestError, match="not a valid WebAssembly module"):
        package.build_package(src, keypair.key)


def test_build_package_roundtrips_gunzip(tmp_path: Path, keypair: KeyPair) -> None:
    data = package.build_package(plugin_source("wait", tmp_path / "src"), keypair.key)
    assert len(gunzip(data)) % 512 == 0


# --------------------------------------------------------------------- write_atomic


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "out.forgepkg"
    package.write_atomic(target, b"first")
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    package.write_atomic(target, b"second", mode=0o600)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["out.forgepkg"]


def test_write_atomic_to_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="cannot write"):
        package.write_atomic(tmp_path / "absent" / "out", b"x")


def test_write_atomic_onto_a_directory_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(PackageError, match="cannot write"):
        package.write_atomic(tmp_path / "out", b"x")
    assert os.listdir(tmp_path) == ["out"]


def test_record_writes_sees_writes(tmp_path: Path) -> None:
    with record_writes() as writes:
        (tmp_path / "x").read_bytes() if (tmp_path / "x").exists() else None
    assert writes == []
    with record_writes() as writes:
        package.write_atomic(tmp_path / "x", b"x")
    assert writes
