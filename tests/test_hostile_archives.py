"""Hostile packages, generated here, each refused by the CLI with exit 2 and one line.

Every case runs ``verify`` in-process and asserts: exit status 2, exactly one line on
stderr naming the problem, no traceback, nothing on stdout, nothing written to disk (the
temporary tree and the working directory are unchanged, and an audit hook saw no write).
Structural cases are also refused by ``inspect``. The gzip bomb is also run in a subprocess
that measures time and peak memory. Property tests (hypothesis) then throw random bytes
and random mutations of a valid package at the loader: nothing but the package's own
errors may come out.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import (
    MINIMAL_WASM,
    REPO,
    Entry,
    KeyPair,
    base_manifest,
    deadline,
    fix_checksum,
    gunzip,
    gz,
    manifest_for,
    one_line,
    record_writes,
    signed_entries,
    signed_package,
    snapshot,
    tar_bytes,
    write_zero_bomb,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgeone_isolate import cli, package, signing
from forgeone_isolate import manifest as mf
from forgeone_isolate.errors import (
    EXIT_BAD_INPUT,
    IsolateError,
    ManifestError,
    PackageError,
    VerificationError,
)

pytest_plugins = ["helpers"]

FILES = {"plugin.wasm": MINIMAL_WASM}


@dataclass(frozen=True)
class Ctx:
    """What a case builder may use."""

    signer: KeyPair  # trusted
    stranger: KeyPair  # not trusted
    work: Path  # where package and trust files go (inside the snapshotted tree)


@dataclass(frozen=True)
class Case:
    """One hostile input and the substring its one-line refusal must contain."""

    id: str
    expect: str
    build: Callable[[Ctx], bytes | Path]
    trust: Callable[[Ctx], Path] | None = None
    attest_only: bool = False  # inspect (which does not attest) accepts it
    max_seconds: float | None = None


CASES: list[Case] = []


def case(
    expect: str,
    *,
    trust: Callable[[Ctx], Path] | None = None,
    attest_only: bool = False,
    max_seconds: float | None = None,
) -> Callable[[Callable[[Ctx], bytes | Path]], Callable[[Ctx], bytes | Path]]:
    """Register the decorated builder as a hostile case."""

    def register(fn: Callable[[Ctx], bytes | Path]) -> Callable[[Ctx], bytes | Path]:
        CASES.append(Case(fn.__name__, expect, fn, trust, attest_only, max_seconds))
        return fn

    return register


def _key(c: Ctx) -> Ed25519PrivateKey:
    return c.signer.key


def _canonical(**overrides: object) -> bytes:
    return mf.canonical_bytes(manifest_for(FILES, **overrides))


# ------------------------------------------------------------------- paths and types


@case("absolute path")
def absolute_path(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("/etc/cron.d/evil", b"* * * * * root sh\n")])


@case("'..' in path")
def dotdot_path(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("../evil.wasm", b"x")])


@case("'..' in path")
def nested_dotdot_path(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("a/../../x", b"x")])


@case("is a symlink")
def symlink(c: Ctx) -> bytes:
    link = Entry("plugin.wasm", type=tarfile.SYMTYPE, linkname="/etc/shadow")
    return signed_package(_key(c), omit=["plugin.wasm"], extra=[link])


@case("is a hard link")
def hard_link(c: Ctx) -> bytes:
    return signed_package(
        _key(c), extra=[Entry("data.bin", type=tarfile.LNKTYPE, linkname="plugin.wasm")]
    )


@case("is a device node")
def char_device(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("mem", type=tarfile.CHRTYPE)])


@case("is a device node")
def block_device(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("sda", type=tarfile.BLKTYPE)])


@case("is a FIFO")
def fifo_member(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("pipe", type=tarfile.FIFOTYPE)])


@case("is a directory")
def directory_member(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("lib", type=tarfile.DIRTYPE, mode=0o755)])


@case("is a tar member of type b'7'")
def contiguous_file_member(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("data.bin", b"x", type=tarfile.CONTTYPE)])


@case("is a tar member of type b'S'")
def gnu_sparse_member(c: Ctx) -> bytes:
    sparse = Entry("data.bin", b"x", type=tarfile.GNUTYPE_SPARSE, fmt=tarfile.GNU_FORMAT)
    return signed_package(_key(c), extra=[sparse])


@case("NUL or backslash in name")
def backslash_name(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("..\\..\\evil.wasm", b"x")])


@case("not a plain relative file name")
def hidden_dotfile(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry(".bashrc", b"x")])


# ------------------------------------------------------- names and the member set


@case("duplicate member 'plugin.wasm'")
def duplicate_names(c: Ctx) -> bytes:
    # a parser differential: verify one copy, run the other
    evil = Entry("plugin.wasm", MINIMAL_WASM + b"\0evil")
    return signed_package(_key(c), extra=[evil])


@case("duplicate member 'manifest.json'")
def duplicate_manifest(c: Ctx) -> bytes:
    evil = Entry("manifest.json", _canonical(name="evil"))
    return signed_package(_key(c), extra=[evil])


@case("'extra.txt' is not listed in the manifest", attest_only=True)
def unlisted_member(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("extra.txt", b"smuggled")])


@case("'data.bin' is listed in the manifest but missing", attest_only=True)
def listed_member_missing(c: Ctx) -> bytes:
    manifest = manifest_for({**FILES, "data.bin": b"payload"})
    return signed_package(_key(c), manifest=manifest)


@case("sha256 of 'plugin.wasm'", attest_only=True)
def hash_mismatch(c: Ctx) -> bytes:
    manifest = manifest_for({"plugin.wasm": MINIMAL_WASM + b"original"})
    return signed_package(_key(c), manifest=manifest)


@case("missing manifest.json")
def missing_manifest(c: Ctx) -> bytes:
    return signed_package(_key(c), omit=["manifest.json"])


# ------------------------------------------------------------------- signatures


@case("bad signature", attest_only=True)
def bad_signature(c: Ctx) -> bytes:
    body = _canonical()
    sig = signing.sign_manifest(_key(c), body)
    flipped = bytearray(body)
    flipped[body.index(b"sample") + 1] ^= 0x03  # "sbmple": still a valid manifest
    return signed_package(_key(c), manifest=bytes(flipped), sig=sig)


@case("bad signature", attest_only=True)
def signature_from_another_key(c: Ctx) -> bytes:
    body = _canonical()
    raw_pub = c.signer.key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    forged = c.stranger.key.sign(body)
    sig = b"ed25519 %s %s\n" % (raw_pub.hex().encode(), forged.hex().encode())
    return signed_package(_key(c), manifest=body, sig=sig)


@case("missing manifest.sig")
def missing_signature(c: Ctx) -> bytes:
    return signed_package(_key(c), omit=["manifest.sig"])


@case("manifest.sig: malformed")
def malformed_signature(c: Ctx) -> bytes:
    good = signing.sign_manifest(_key(c), _canonical())
    return signed_package(_key(c), sig=good.upper())


@case("manifest.sig: malformed")
def signature_with_extra_line(c: Ctx) -> bytes:
    good = signing.sign_manifest(_key(c), _canonical())
    return signed_package(_key(c), sig=good + b"\n")


@case("is not in the trust store", attest_only=True)
def unknown_signer(c: Ctx) -> bytes:
    return signed_package(c.stranger.key)


def _revoking_trust_dir(c: Ctx) -> Path:
    trust = c.work / "trust"
    trust.mkdir()
    (trust / "signer.pub").write_bytes(c.signer.public_path.read_bytes())
    (trust / "other.pub").write_bytes(c.stranger.public_path.read_bytes())
    (trust / signing.REVOKED_NAME).write_text(f"# leaked 2024-01-01\n{c.signer.fingerprint}\n")
    return trust


@case("is revoked", trust=_revoking_trust_dir, attest_only=True)
def revoked_signer(c: Ctx) -> bytes:
    return signed_package(_key(c))


# ---------------------------------------------------------------------- gzip layer


@case("truncated gzip stream")
def truncated_gzip(c: Ctx) -> bytes:
    data = signed_package(_key(c))
    return data[: len(data) // 2]


@case("not a gzip file")
def not_gzip(c: Ctx) -> bytes:
    return tar_bytes(signed_entries(_key(c), FILES))


@case("not a gzip file")
def empty_file(c: Ctx) -> bytes:
    return b""


@case("trailing data after the gzip stream")
def trailing_data_after_gzip(c: Ctx) -> bytes:
    return signed_package(_key(c)) + b"MZ\x90\x00trailing"


@case("trailing data after the gzip stream")
def second_gzip_member(c: Ctx) -> bytes:
    # `gzip -d` would concatenate both members: a second archive nobody verified
    return signed_package(_key(c)) + gz(tar_bytes([Entry("evil.wasm", b"x")]))


@case("corrupt gzip stream")
def gzip_crc_mismatch(c: Ctx) -> bytes:
    data = bytearray(signed_package(_key(c)))
    data[-8] ^= 0xFF  # the CRC32 in the trailer
    return bytes(data)


@case("compression bomb", max_seconds=2.0)
def gzip_bomb_1gib(c: Ctx) -> Path:
    path = c.work / "bomb.forgepkg"
    write_zero_bomb(path)
    return path


# ---------------------------------------------------------------------- tar layer


@case(f"more than {package.MAX_MEMBERS} members")
def too_many_members(c: Ctx) -> bytes:
    extra = [Entry(f"f{i:03d}.bin", b"") for i in range(package.MAX_MEMBERS)]
    return signed_package(_key(c), extra=extra)


@case(f"more than {package.MAX_MEMBER_BYTES}")
def member_over_size_bound(c: Ctx) -> bytes:
    # the header declares the size; the data is not there (a tiny gzip)
    return signed_package(_key(c), extra=[Entry("big.bin", size=package.MAX_MEMBER_BYTES + 1)])


@case(f"members total more than {package.MAX_TOTAL_BYTES} bytes")
def members_total_over_bound(c: Ctx) -> bytes:
    full = bytes(package.MAX_MEMBER_BYTES)
    extra = [Entry("a.bin", full), Entry("b.bin", full), Entry("c.bin", size=1)]
    return signed_package(_key(c), extra=extra)


@case("negative size")
def negative_size(c: Ctx) -> bytes:
    return signed_package(_key(c), extra=[Entry("neg.bin", size=-1024)])


@case("member 'plugin.wasm' is truncated or corrupt")
def truncated_member_data(c: Ctx) -> bytes:
    raw = tar_bytes(signed_entries(_key(c), {"plugin.wasm": bytes(4096)}), end=False)
    return gz(raw[:-2048])


@case("not a tar archive")
def bad_header_checksum(c: Ctx) -> bytes:
    raw = bytearray(tar_bytes(signed_entries(_key(c), FILES)))
    raw[148:156] = b"0000000\0"
    return gz(bytes(raw))


@case("data after the end of the tar archive")
def hidden_member_after_end(c: Ctx) -> bytes:
    hidden = Entry("plugin.wasm", MINIMAL_WASM + b"\0hidden").encode()
    return signed_package(_key(c), after_end=hidden)


@case("data after the end of the tar archive")
def member_after_corrupt_header(c: Ctx) -> bytes:
    # tarfile stops quietly at a bad header after the first member; other tars go on
    raw = tar_bytes(signed_entries(_key(c), FILES), end=False)
    bad = bytearray(Entry("evil.wasm", b"x").encode())
    bad[148:156] = b"1234567\0"
    return gz(raw + bytes(bad) + b"\0" * 1024)


@case("pax extended header")
def pax_renames_to_absolute_path(c: Ctx) -> bytes:
    # the ustar name says plugin.wasm; pax-aware readers see /etc/passwd
    renamed = Entry(
        "plugin.wasm", MINIMAL_WASM, pax={"path": "/etc/passwd"}, fmt=tarfile.PAX_FORMAT
    )
    return signed_package(_key(c), omit=["plugin.wasm"], extra=[renamed])


@case("pax global header")
def pax_global_header_renames_everything(c: Ctx) -> bytes:
    glob = tarfile.TarInfo.create_pax_global_header({"path": "/tmp/x"})
    return gz(glob + tar_bytes(signed_entries(_key(c), FILES)))


@case("GNU long name header")
def gnu_longname_dotdot(c: Ctx) -> bytes:
    name = "a" * 120 + "/../../../../etc/cron.d/evil"
    return signed_package(_key(c), extra=[Entry(name, b"x", fmt=tarfile.GNU_FORMAT)])


@case("GNU long link name header")
def gnu_longlink(c: Ctx) -> bytes:
    link = Entry("link", type=tarfile.SYMTYPE, linkname="/" + "a" * 200, fmt=tarfile.GNU_FORMAT)
    return signed_package(_key(c), extra=[link])


@case("packages are plain ustar")
def pax_header_quadratic_parse(c: Ctx) -> bytes:
    # CPython 3.11's pax parser is quadratic in this: minutes for a few hundred bytes
    digits = b"1" * (256 * 1024)
    ext = tarfile.TarInfo("././@PaxHeader")
    ext.type, ext.size = tarfile.XHDTYPE, len(digits)
    raw = ext.tobuf(tarfile.USTAR_FORMAT) + digits + tar_bytes(signed_entries(_key(c), FILES))
    return gz(raw)


@case("packages are plain ustar")
def gnu_longname_chain(c: Ctx) -> bytes:
    # each GNU header makes tarfile recurse once: thousands of them, a RecursionError
    link = tarfile.TarInfo("././@LongLink")
    link.type, link.size = tarfile.GNUTYPE_LONGNAME, 4
    one = link.tobuf(tarfile.USTAR_FORMAT) + b"abc\0".ljust(512, b"\0")
    return gz(one * 5000 + tar_bytes(signed_entries(_key(c), FILES)))


# ---------------------------------------------------------------------- manifest


@case("not JSON")
def manifest_not_json(c: Ctx) -> bytes:
    return signed_package(_key(c), manifest=b"name = 'sample'\nversion = '1.0.0'\n")


@case(f"more than {mf.MAX_MANIFEST_BYTES}")
def manifest_too_large(c: Ctx) -> bytes:
    big = manifest_for(FILES)
    body = mf.canonical_bytes(big)[:-2] + b',\n  "padding": "' + b"a" * 70_000 + b'"\n}\n'
    return signed_package(_key(c), manifest=body)


@case(f"nested deeper than {mf.MAX_DEPTH}")
def manifest_nested_too_deep(c: Ctx) -> bytes:
    # below the size bound, far beyond the recursion limit of a naive parser
    return signed_package(_key(c), manifest=b"[" * 60_000)


@case("duplicate key 'name'")
def manifest_duplicate_keys(c: Ctx) -> bytes:
    body = _canonical().replace(b"{", b'{\n  "name": "evil",', 1)
    return signed_package(_key(c), manifest=body)


@case("NaN is not allowed")
def manifest_nan(c: Ctx) -> bytes:
    body = _canonical().replace(b'"memory_mb": 16', b'"memory_mb": NaN')
    return signed_package(_key(c), manifest=body)


@case("not acceptable JSON")
def manifest_huge_integer(c: Ctx) -> bytes:
    body = _canonical().replace(b'"memory_mb": 16', b'"memory_mb": ' + b"9" * 5000)
    return signed_package(_key(c), manifest=body)


@case("unsupported ABI version 2")
def wrong_abi_version(c: Ctx) -> bytes:
    return signed_package(_key(c), manifest=manifest_for(FILES, abi=2))


@case("manifest: top level must be a JSON object")
def manifest_not_an_object(c: Ctx) -> bytes:
    return signed_package(_key(c), manifest=b'["plugin.wasm"]\n')


@case("manifest: unknown key 'exec'")
def manifest_unknown_key(c: Ctx) -> bytes:
    return signed_package(_key(c), manifest=manifest_for(FILES, exec="/bin/sh"))


# ------------------------------------------------------------- the package file


@case("larger than 33554432 bytes")
def package_file_too_large(c: Ctx) -> Path:
    path = c.work / "huge.forgepkg"
    with path.open("wb") as f:
        f.truncate(package.MAX_PACKAGE_BYTES + 1)  # sparse: costs no disk
    return path


@case("not a regular file")
def package_is_a_fifo(c: Ctx) -> Path:
    path = c.work / "pipe.forgepkg"
    os.mkfifo(path)
    return path


@case("Is a directory")
def package_is_a_directory(c: Ctx) -> Path:
    path = c.work / "dir.forgepkg"
    path.mkdir()
    return path


@case("No such file or directory")
def package_missing(c: Ctx) -> Path:
    return c.work / "absent.forgepkg"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture
def ctx(tmp_path: Path, keypair: KeyPair, other_keypair: KeyPair) -> Ctx:
    work = tmp_path / "work"
    work.mkdir()
    return Ctx(keypair, other_keypair, work)


def _materialise(case: Case, c: Ctx) -> tuple[Path, Path]:
    built = case.build(c)
    if isinstance(built, Path):
        path = built
    else:
        path = c.work / f"{case.id}.forgepkg"
        path.write_bytes(built)
    trust = case.trust(c) if case.trust else c.signer.public_path
    return path, trust


def _run_refused(
    argv: list[str], root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, float]:
    cwd = root / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    before = snapshot(root)
    cwd_before = sorted(os.listdir(cwd))
    capsys.readouterr()
    with record_writes() as writes, deadline(30):
        start = time.monotonic()
        status = cli.main(argv)
        elapsed = time.monotonic() - start
    out, err = capsys.readouterr()
    assert out == ""
    assert writes == [], f"the CLI wrote to disk: {writes}"
    assert snapshot(root) == before, "the temporary tree changed"
    assert sorted(os.listdir(cwd)) == cwd_before
    return status, one_line(err), elapsed


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_verify_refuses_hostile_package(
    case: Case,
    ctx: Ctx,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, trust = _materialise(case, ctx)
    status, line, elapsed = _run_refused(
        ["verify", str(path), "--trust", str(trust)], tmp_path, monkeypatch, capsys
    )
    assert status == EXIT_BAD_INPUT
    assert line.startswith("forgeone-isolate: error: ")
    assert case.expect in line
    assert "internal error" not in line
    if case.max_seconds is not None:
        assert elapsed < case.max_seconds, f"refused after {elapsed:.2f} s"


STRUCTURAL = [c for c in CASES if not c.attest_only]


@pytest.mark.parametrize("case", STRUCTURAL, ids=[c.id for c in STRUCTURAL])
def test_inspect_refuses_hostile_package(
    case: Case,
    ctx: Ctx,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = _materialise(case, ctx)
    status, line, _ = _run_refused(["inspect", str(path)], tmp_path, monkeypatch, capsys)
    assert status == EXIT_BAD_INPUT
    assert case.expect in line


ATTEST_ONLY = [c for c in CASES if c.attest_only]


@pytest.mark.parametrize("case", ATTEST_ONLY, ids=[c.id for c in ATTEST_ONLY])
def test_inspect_shows_what_only_verify_refuses(
    case: Case, ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = _materialise(case, ctx)
    with deadline(30):
        assert cli.main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "NOT ATTESTED" in out


_MEASURE = """
import json, resource, sys, time
from forgeone_isolate import cli, package, signing  # imported before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
status = cli.main(["verify", sys.argv[1], "--trust", sys.argv[2]])
elapsed = time.monotonic() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"status": status, "seconds": elapsed, "rss_delta_kib": after - before}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("FORGEONE_DEBUG", None)
    return env


def test_gzip_bomb_is_refused_fast_and_small_in_a_subprocess(
    tmp_path: Path, keypair: KeyPair
) -> None:
    bomb = tmp_path / "bomb.forgepkg"
    assert write_zero_bomb(bomb) < 2 * 1024 * 1024  # 1 GiB of zeros in about 1 MiB
    listing = sorted(os.listdir(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(bomb), str(keypair.public_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=60,
        check=False,
    )
    report = json.loads(proc.stdout)
    assert report["status"] == EXIT_BAD_INPUT
    assert "compression bomb" in one_line(proc.stderr)
    assert report["seconds"] < 2.0
    assert report["rss_delta_kib"] < 200 * 1024, report
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize(
    "case_id", ["symlink", "pax_renames_to_absolute_path", "manifest_nested_too_deep"]
)
def test_python_dash_m_refuses_without_traceback(case_id: str, ctx: Ctx, tmp_path: Path) -> None:
    (case,) = [c for c in CASES if c.id == case_id]
    path, trust = _materialise(case, ctx)
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "forgeone_isolate", "verify", str(path), "--trust", str(trust)],
        capture_output=True,
        text=True,
        cwd=ctx.work,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stdout == ""
    assert case.expect in one_line(proc.stderr)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ property tests

ALLOWED = (PackageError, VerificationError, ManifestError)
_PROP_KEY = Ed25519PrivateKey.generate()
_PROP_FILES = {"plugin.wasm": MINIMAL_WASM, "data/readme.txt": b"hello, plugin\n"}
_PROP_TRUST = signing.TrustStore(
    frozenset({signing.fingerprint(_PROP_KEY.public_key())}), frozenset(), "test"
)
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def valid_package() -> bytes:
    return signed_package(_PROP_KEY, _PROP_FILES)


@functools.cache
def valid_tar() -> bytes:
    return gunzip(valid_package())


@functools.cache
def header_offsets() -> tuple[int, ...]:
    raw, offsets, offset = valid_tar(), [], 0
    while raw[offset : offset + 512].strip(b"\0"):
        offsets.append(offset)
        size = int(raw[offset + 124 : offset + 136].rstrip(b"\0 ") or b"0", 8)
        offset += 512 + -(-size // 512) * 512
    return tuple(offsets)


def exercise(data: bytes) -> None:
    """Every loader entry point: nothing but the package errors, each one line."""
    calls: list[Callable[[bytes], object]] = [
        package.read_members,
        package.inspect_bytes,
        lambda d: package.verify_bytes(d, _PROP_TRUST),
    ]
    for call in calls:
        error: IsolateError | None = None
        try:
            call(data)
        except ALLOWED as e:
            error = e
        if error is not None:
            assert error.exit_status == EXIT_BAD_INPUT
            assert str(error)
            assert "\n" not in str(error)


def test_the_unmutated_package_verifies() -> None:
    assert package.verify_bytes(valid_package(), _PROP_TRUST).files == _PROP_FILES
    assert len(header_offsets()) == 4


@st.composite
def mutations(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=600))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 600))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=32))
            data[pos : pos + len(chunk)] = chunk
    return bytes(data)


#: (offset, length) of every ustar header field
FIELDS = [
    (0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (156, 1),
    (157, 100), (257, 6), (263, 2), (265, 32), (297, 32), (329, 8), (337, 8), (345, 155),
]  # fmt: skip
INTERESTING = [
    b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K", b"S",
    b"V", b"M", b"N", b"X", b"/etc/passwd", b"../x", b"plugin.wasm", b"manifest.json",
    b"\x80" + b"\0" * 10 + b"\x10", b"\xff" * 12, b"77777777777", b"-1", b"0o17", b"1_0",
    b" 12 ", b"ustar\0", b"ustar ", b"\0" * 12,
]  # fmt: skip


@st.composite
def header_edits(draw: st.DrawFn) -> bytes:
    """Rewrite one header field (random or nasty bytes) and fix the checksum, so the edit
    gets past tarfile's checksum gate."""
    raw = bytearray(valid_tar())
    for _ in range(draw(st.integers(1, 3))):
        header = draw(st.sampled_from(header_offsets()))
        start, length = draw(st.sampled_from(FIELDS))
        value = draw(st.one_of(st.sampled_from(INTERESTING), st.binary(max_size=length)))
        value = value[:length].ljust(length, b"\0") if draw(st.booleans()) else value[:length]
        raw[header + start : header + start + len(value)] = value
        raw = bytearray(fix_checksum(bytes(raw), header))
    return gz(bytes(raw))


@PROPERTY
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    exercise(data)


@PROPERTY
@given(st.binary(max_size=4096))
def test_random_bytes_behind_gzip_magic(data: bytes) -> None:
    exercise(b"\x1f\x8b" + data)


@PROPERTY
@given(st.binary(max_size=8192))
def test_random_tar_bytes_gzipped(data: bytes) -> None:
    exercise(gz(data))


@PROPERTY
@given(st.data())
def test_mutated_gzip_bytes(data: st.DataObject) -> None:
    exercise(data.draw(mutations(valid_package())))


@PROPERTY
@given(st.data())
def test_mutated_tar_bytes_regzipped(data: st.DataObject) -> None:
    exercise(gz(data.draw(mutations(valid_tar()))))


@PROPERTY
@given(header_edits())
def test_edited_tar_headers_with_valid_checksums(data: bytes) -> None:
    exercise(data)


@PROPERTY
@given(st.lists(st.sampled_from(["manifest.json", "manifest.sig", "plugin.wasm", "x"]), max_size=8))
def test_member_sets(names: list[str]) -> None:
    """Any multiset of plausible members, in any order: refused or exactly right."""
    entries = {e.name: e for e in signed_entries(_PROP_KEY, {"plugin.wasm": MINIMAL_WASM})}
    chosen = [entries.get(n, Entry(n, b"x")) for n in names]
    data = gz(tar_bytes(chosen))
    exercise(data)
    if sorted(names) == ["manifest.json", "manifest.sig", "plugin.wasm"]:
        assert package.verify_bytes(data, _PROP_TRUST).wasm == MINIMAL_WASM


def test_base_manifest_helper_is_valid() -> None:
    obj = base_manifest()
    assert "files" not in obj
    assert mf.parse_manifest(mf.canonical_bytes(obj), require_files=False).name == "sample"
