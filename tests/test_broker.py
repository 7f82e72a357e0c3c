"""Broker unit tests: ``Broker.handle`` driven directly with frames from the protocol encoders.

No fork, no sandbox: a broker bound to a fixed identity, a temporary AuditLog and KvStore, a
fake resolver, and (for rate limits) a fake clock. Every op is exercised allowed and denied;
every denial must leave one audit record (decision ``deny`` and a reason) on disk before the
answer is returned; the fs tests try every path escape we know of, including a symlink
swapped in during the call (deterministically, between the policy check and the open, and
racing against a separate process that flips a file and a directory thousands of times).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import json
import os
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import deadline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgeone_isolate import broker as broker_mod
from forgeone_isolate import fsaccess, policy
from forgeone_isolate import protocol as p
from forgeone_isolate._sys import libc
from forgeone_isolate.audit import AuditLog, verify
from forgeone_isolate.broker import (
    MAX_OUTPUT,
    MAX_RATE_DENIALS,
    MAX_VIOLATIONS,
    Broker,
    Identity,
    Reply,
)
from forgeone_isolate.errors import BrokerProtocolError
from forgeone_isolate.kvstore import KEY_COST, KvStore
from forgeone_isolate.policy import Effective

SIGNER = "ab" * 32
OTHER_SIGNER = "cd" * 32
EPERM = -errno.EPERM
ENOENT = -errno.ENOENT
EINVAL = -errno.EINVAL
ELOOP = -errno.ELOOP
EISDIR = -errno.EISDIR
ENXIO = -errno.ENXIO
EAGAIN = -errno.EAGAIN
EDQUOT = -errno.EDQUOT
E2BIG = -errno.E2BIG
ENOTDIR = -errno.ENOTDIR
ECONNREFUSED = -errno.ECONNREFUSED
INSIDE = b"inside the root\n"
SECRET = b"SECRET outside the root\n"
#: generous limits so that only the rate-limit tests ever meet the limiter
UNLIMITED = {"rate_per_s": 100_000.0, "burst": 1_000_000}


# --------------------------------------------------------------------------- machinery


class FakeResolver:
    """Answers from a table; records every name it was asked about."""

    def __init__(self, table: dict[str, Sequence[str]] | None = None) -> None:
        self.table: dict[str, Sequence[str] | Exception] = dict(table or {})
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        answer = self.table.get(host, OSError(errno.ENOENT, f"no such name {host}"))
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Answer:
    """A decoded reply."""

    result: int
    data: bytes
    fd: int | None


@dataclass
class Rig:
    """One broker with its audit file, kv store and captured log lines."""

    broker: Broker
    audit: AuditLog
    audit_path: Path
    resolver: FakeResolver
    logs: list[tuple[int, str]] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    seq: int = 0

    # -- frames

    def send(self, op: p.Op, body: bytes = b"", fds_received: int = 0) -> Answer:
        """Encode one request, hand it to the broker, decode the reply."""
        self.seq += 1
        reply = self.broker.handle(p.encode(op, self.seq, body), fds_received)
        assert reply is not None, f"no reply to a valid {op.name} frame"
        result, data = p.decode_reply(reply.frame, op, self.seq)
        if reply.fd is not None:
            self.fds.append(reply.fd)
            assert result >= 0, "a descriptor came with a failure"
        return Answer(result, data, reply.fd)

    def raw(self, frame: bytes, fds_received: int = 0) -> Reply | None:
        return self.broker.handle(frame, fds_received)

    def log(self, level: int, message: bytes) -> Answer:
        return self.send(p.Op.LOG, struct.pack("!i", level) + message)

    def clock_now(self) -> Answer:
        return self.send(p.Op.CLOCK_NOW)

    def random(self, length: int) -> Answer:
        return self.send(p.Op.RANDOM, struct.pack("!I", length))

    def config_get(self, key: bytes, buflen: int = 4096) -> Answer:
        return self.send(p.Op.CONFIG_GET, struct.pack("!I", buflen) + key)

    def kv_get(self, key: bytes, buflen: int = 4096) -> Answer:
        return self.send(p.Op.KV_GET, struct.pack("!I", buflen) + key)

    def kv_set(self, key: bytes, value: bytes) -> Answer:
        return self.send(p.Op.KV_SET, struct.pack("!H", len(key)) + key + value)

    def fs_open(self, path: str | bytes, flags: int) -> Answer:
        raw = path.encode() if isinstance(path, str) else path
        return self.send(p.Op.FS_OPEN, struct.pack("!i", flags) + raw)

    def net_connect(self, host: str | bytes, port: int) -> Answer:
        raw = host.encode() if isinstance(host, str) else host
        return self.send(p.Op.NET_CONNECT, struct.pack("!i", port) + raw)

    def output(self, data: bytes) -> Answer:
        return self.send(p.Op.OUTPUT, data)

    # -- fs helpers

    def read_file(self, path: str | bytes) -> bytes | int:
        """Open for reading through the broker: the content, or the negative errno."""
        a = self.fs_open(path, 0)
        if a.result < 0:
            return a.result
        assert a.fd is not None
        data = os.read(a.fd, 1 << 16)
        self.close_fd(a.fd)
        return data

    def close_fd(self, fd: int) -> None:
        self.fds.remove(fd)
        os.close(fd)

    # -- audit

    def records(self) -> list[dict[str, Any]]:
        text = self.audit_path.read_text(encoding="ascii")
        return [json.loads(line) for line in text.splitlines()]

    def last(self) -> dict[str, Any]:
        return self.records()[-1]


RigFactory = Callable[..., Rig]


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[RigFactory]:
    """Build brokers: ``make_rig(effective_fields..., plugin=, signer=, kv=, clock=, resolver=)``."""
    made: list[Rig] = []
    stores: list[KvStore] = []

    def factory(
        *,
        plugin: str = "unit",
        signer: str = SIGNER,
        kv_path: Path | None = None,
        clock: Callable[[], float] | None = None,
        resolver: FakeResolver | None = None,
        **eff_fields: Any,
    ) -> Rig:
        eff = Effective(**{**UNLIMITED, **eff_fields})
        kv = None
        if kv_path is not None:
            kv = KvStore(kv_path)
            stores.append(kv)
        audit_path = tmp_path / "audit" / f"{plugin}-{len(made)}.jsonl"
        log = AuditLog(audit_path)
        res = resolver or FakeResolver()
        rig = Rig(
            broker=Broker(
                Identity(signer, plugin, "1.0.0", f"inst{len(made):08d}"),
                eff,
                lambda lv, text: rig.logs.append((lv, text)),
                audit=log,
                kv=kv,
                resolver=res,
                clock=clock or time.monotonic,
            ),
            audit=log,
            audit_path=audit_path,
            resolver=res,
        )
        made.append(rig)
        return rig

    yield factory
    for rig in made:
        for fd in rig.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        rig.broker.close()
    for kv in stores:
        kv.close()


def assert_denial_audited(rig: Rig, op: str, reason_part: str = "") -> dict[str, Any]:
    """The last audit record is a denial of ``op`` with a non-empty reason."""
    rec = rig.last()
    assert rec["op"] == op
    assert rec["decision"] == "deny"
    assert isinstance(rec["reason"], str)
    assert rec["reason"]
    assert reason_part.lower() in rec["reason"].lower(), rec["reason"]
    assert rec["identity"] == rig.broker.identity.as_dict()
    return rec


@dataclass(frozen=True)
class Tree:
    """A granted read root, a granted write root, and an outside directory with a secret."""

    base: Path
    root: Path  # granted for reading
    out: Path  # granted for writing
    outside: Path

    @property
    def secret(self) -> Path:
        return self.outside / "secret.txt"


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    base = tmp_path / "fs"
    root, out, outside = base / "data", base / "out", base / "outside"
    for d in (root, root / "sub", out, outside, outside / "sub"):
        d.mkdir(parents=True)
    (root / "a.txt").write_bytes(INSIDE)
    (root / "sub" / "f.txt").write_bytes(INSIDE)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "sub" / "f.txt").write_bytes(SECRET)
    (out / "existing.txt").write_bytes(b"old content that is longer\n")
    return Tree(base, root, out, outside)


@pytest.fixture
def fs_rig(make_rig: RigFactory, tree: Tree) -> Rig:
    return make_rig(fs_read=(str(tree.root),), fs_write=(str(tree.out),))


# --------------------------------------------------------------------------- log, clock, random


def test_log_allowed_sanitised_and_audited_without_text(make_rig: RigFactory) -> None:
    rig = make_rig()
    a = rig.log(3, b"hello \x1b[31mred\x07\n\xff")
    assert (a.result, a.data, a.fd) == (0, b"", None)
    assert len(rig.logs) == 1
    level, text = rig.logs[0]
    assert level == 3
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\n" not in text
    assert text.startswith("hello \\x1b[31mred")
    rec = rig.last()
    assert (rec["op"], rec["decision"]) == ("log", "allow")
    assert rec["args"]["level"] == "warning"
    assert "hello" not in json.dumps(rec)
    assert rig.broker.stats.allowed == 1


@pytest.mark.parametrize("level", [-1, 5, 2**31 - 1, -(2**31)])
def test_log_bad_level_is_a_violation_with_no_reply(make_rig: RigFactory, level: int) -> None:
    rig = make_rig()
    assert rig.raw(p.encode_log(1, level, b"x")) is None
    assert rig.broker.stats.violations == 1
    assert not rig.logs
    assert_denial_audited(rig, "malformed", "level")


def test_log_too_long_is_a_violation(make_rig: RigFactory) -> None:
    rig = make_rig()
    frame = p.encode(p.Op.LOG, 1, struct.pack("!i", 1) + b"x" * (p.MAX_LOG + 1))
    assert rig.raw(frame) is None
    assert rig.broker.stats.violations == 1
    assert_denial_audited(rig, "malformed")


def test_clock_now(make_rig: RigFactory) -> None:
    rig = make_rig()
    before = time.time_ns()
    a = rig.clock_now()
    after = time.time_ns()
    assert before <= a.result <= after
    assert rig.last()["decision"] == "allow"


def test_clock_now_with_a_body_is_a_violation(make_rig: RigFactory) -> None:
    rig = make_rig()
    assert rig.raw(p.encode(p.Op.CLOCK_NOW, 1, b"\x00")) is None
    assert rig.broker.stats.violations == 1


@pytest.mark.parametrize("length", [0, 1, 32, p.MAX_DATA])
def test_random_fill(make_rig: RigFactory, length: int) -> None:
    rig = make_rig()
    a = rig.random(length)
    assert a.result == length
    assert len(a.data) == length
    if length >= 32:
        assert a.data != bytes(length)


@pytest.mark.parametrize("length", [p.MAX_DATA + 1, 2**32 - 1])
def test_random_fill_too_long_is_a_violation(make_rig: RigFactory, length: int) -> None:
    rig = make_rig()
    assert rig.raw(p.encode(p.Op.RANDOM, 1, struct.pack("!I", length))) is None
    assert rig.broker.stats.violations == 1
    assert_denial_audited(rig, "malformed")


# --------------------------------------------------------------------------- config, output


def test_config_get_granted_key_and_secret_never_audited(make_rig: RigFactory) -> None:
    rig = make_rig(config={"greeting": "s3cr3t-value-42"})
    a = rig.config_get(b"greeting")
    assert a.result == len("s3cr3t-value-42")
    assert a.data == b"s3cr3t-value-42"
    short = rig.config_get(b"greeting", buflen=4)
    assert (short.result, short.data) == (15, b"s3cr")
    assert rig.records()[-1]["decision"] == "allow"
    assert "s3cr3t" not in rig.audit_path.read_text()


def test_config_get_other_key_denied_and_audited(make_rig: RigFactory) -> None:
    rig = make_rig(config={"greeting": "hi"})
    a = rig.config_get(b"password")
    assert (a.result, a.data) == (EPERM, b"")
    assert_denial_audited(rig, "config_get", "not granted")
    assert rig.broker.stats.denied == 1


def test_output_accumulates_and_is_bounded(make_rig: RigFactory) -> None:
    rig = make_rig()
    chunk = b"o" * (p.MAX_FRAME - p.HEADER.size)
    sent = 0
    while sent + len(chunk) <= MAX_OUTPUT:
        assert rig.output(chunk).result == len(chunk)
        sent += len(chunk)
    a = rig.output(chunk)
    assert a.result == E2BIG
    assert_denial_audited(rig, "output", "output beyond")
    assert len(rig.broker.output) == sent
    assert "ooo" not in rig.audit_path.read_text()


# --------------------------------------------------------------------------- kv


def test_kv_denied_without_grant(make_rig: RigFactory, tmp_path: Path) -> None:
    rig = make_rig(kv_path=tmp_path / "kv.sqlite3", kv=False)
    assert rig.kv_set(b"k", b"v").result == EPERM
    assert_denial_audited(rig, "kv_set", "kv: not granted")
    assert rig.kv_get(b"k").result == EPERM
    assert_denial_audited(rig, "kv_get", "kv: not granted")


def test_kv_set_get_missing_and_truncated(make_rig: RigFactory, tmp_path: Path) -> None:
    rig = make_rig(kv_path=tmp_path / "kv.sqlite3", kv=True)
    assert rig.kv_get(b"nothing").result == ENOENT
    assert rig.kv_set(b"k", b"value-\x00-\xff").result == 0
    a = rig.kv_get(b"k")
    assert (a.result, a.data) == (9, b"value-\x00-\xff")
    short = rig.kv_get(b"k", buflen=3)
    assert (short.result, short.data) == (9, b"val")
    assert b"value-" not in rig.audit_path.read_bytes()


def test_kv_quota_edquot(make_rig: RigFactory, tmp_path: Path) -> None:
    quota = 100 + KEY_COST  # one key's overhead: then the sums below are of keys and values
    rig = make_rig(kv_path=tmp_path / "kv.sqlite3", kv=True, kv_quota_bytes=quota)
    assert rig.kv_set(b"k", b"v" * 90).result == 0  # 91 bytes + a key's cost
    assert rig.kv_set(b"k2", b"v" * 10).result == EDQUOT  # 91 + 12 + two keys' cost
    assert EDQUOT == -122
    assert_denial_audited(rig, "kv_set", "quota")
    assert rig.kv_get(b"k2").result == ENOENT
    assert rig.kv_set(b"k", b"w" * 99).result == 0  # a replacement counts once: 100
    assert rig.kv_set(b"k", b"w" * 100).result == EDQUOT
    assert rig.kv_get(b"k").data == b"w" * 99


def test_kv_many_small_keys_pay_for_their_rows(make_rig: RigFactory, tmp_path: Path) -> None:
    """Each key costs KEY_COST besides its bytes: a quota of 1 MiB holds about 16 thousand
    one-byte keys, not a million (which took 30 MiB of database)."""
    quota = 10 * (KEY_COST + 2)
    rig = make_rig(kv_path=tmp_path / "kv.sqlite3", kv=True, kv_quota_bytes=quota)
    results = [rig.kv_set(bytes([i]), b"v").result for i in range(11)]
    assert results == [0] * 10 + [EDQUOT]


def test_kv_usage_is_kept_not_summed(tmp_path: Path) -> None:
    """What an owner holds is a row updated with each set (no sum over its rows inside the
    write transaction every plugin shares), and it stays right across replacements, other
    owners and a reopened store."""
    store = KvStore(tmp_path / "kv.sqlite3")
    for i in range(50):
        store.set("a/one", b"key%d" % i, b"x" * i, 10**9)
    store.set("a/one", b"key7", b"y", 10**9)  # replaced: 7 bytes become 1
    store.set("b/two", b"k", b"zz", 10**9)
    expected = sum(len(b"key%d" % i) + i + KEY_COST for i in range(50)) - 6
    assert store.used("a/one") == expected
    kept = store._db.execute("SELECT bytes FROM kv_usage WHERE owner=?", ("a/one",)).fetchone()
    assert kept == (expected,)  # the row itself, not a sum made on demand
    store.close()
    again = KvStore(tmp_path / "kv.sqlite3")
    assert again.used("a/one") == expected
    assert again.used("b/two") == 1 + 2 + KEY_COST
    plan = " ".join(
        str(r)
        for r in again._db.execute(
            "EXPLAIN QUERY PLAN SELECT bytes FROM kv_usage WHERE owner=?", ("a/one",)
        )
    )
    assert "SEARCH" in plan, plan  # one row by its key, whatever the owner holds
    again.close()


def test_kv_store_busy_is_an_error_for_the_call_not_the_plugin(
    make_rig: RigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another plugin holding the shared database past the busy timeout: this call gets
    EIO (audited); the broker goes on."""
    rig = make_rig(kv_path=tmp_path / "kv.sqlite3", kv=True)

    def locked(*_a: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(KvStore, "set", locked)
    monkeypatch.setattr(KvStore, "get", locked)
    assert rig.kv_set(b"k", b"v").result == -errno.EIO
    assert_denial_audited(rig, "kv_set", "database is locked")
    assert rig.kv_get(b"k").result == -errno.EIO
    assert rig.log(2, b"still serving").result == 0


def test_kv_zero_quota(make_rig: RigFactory, tmp_path: Path) -> None:
    rig = make_rig(kv_path=tmp_path / "kv.sqlite3", kv=True, kv_quota_bytes=0)
    assert rig.kv_set(b"k", b"").result == EDQUOT


def test_kv_persists_per_identity_and_is_isolated(make_rig: RigFactory, tmp_path: Path) -> None:
    db = tmp_path / "kv.sqlite3"
    first = make_rig(kv_path=db, kv=True, plugin="alpha")
    assert first.kv_set(b"counter", b"1").result == 0
    first.broker.close()
    # a second launch of the same identity (a new store connection, a new instance id)
    again = make_rig(kv_path=db, kv=True, plugin="alpha")
    assert again.kv_get(b"counter").data == b"1"
    # another plugin of the same signer, and the same plugin name from another signer
    other = make_rig(kv_path=db, kv=True, plugin="beta")
    assert other.kv_get(b"counter").result == ENOENT
    impostor = make_rig(kv_path=db, kv=True, plugin="alpha", signer=OTHER_SIGNER)
    assert impostor.kv_get(b"counter").result == ENOENT
    assert impostor.kv_set(b"counter", b"666").result == 0
    assert again.kv_get(b"counter").data == b"1"


# --------------------------------------------------------------------------- fs: allowed


def test_fs_read_allowed(fs_rig: Rig, tree: Tree) -> None:
    assert fs_rig.read_file(str(tree.root / "a.txt")) == INSIDE
    assert fs_rig.read_file(str(tree.root / "sub" / "f.txt")) == INSIDE
    rec = fs_rig.last()
    assert (rec["op"], rec["decision"]) == ("fs_open", "allow")
    assert INSIDE.decode().strip() not in fs_rig.audit_path.read_text()


def test_fs_read_fd_is_read_only_and_not_truncating(fs_rig: Rig, tree: Tree) -> None:
    a = fs_rig.fs_open(str(tree.root / "a.txt"), 0)
    assert a.fd is not None
    assert os.get_inheritable(a.fd) is False
    with pytest.raises(OSError) as e:
        os.write(a.fd, b"overwrite")
    assert e.value.errno == errno.EBADF
    assert (tree.root / "a.txt").read_bytes() == INSIDE


def test_fs_create_and_write_under_a_write_root(fs_rig: Rig, tree: Tree) -> None:
    a = fs_rig.fs_open(str(tree.out / "new.txt"), 2)
    assert a.result >= 0
    assert a.fd is not None
    os.write(a.fd, b"written by the plugin")
    with pytest.raises(OSError) as e:
        os.read(a.fd, 10)  # write-only
    assert e.value.errno == errno.EBADF
    fs_rig.close_fd(a.fd)
    assert (tree.out / "new.txt").read_bytes() == b"written by the plugin"
    assert stat.S_IMODE((tree.out / "new.txt").stat().st_mode) == fsaccess.CREATE_MODE
    # create truncates, write (1) does not
    b = fs_rig.fs_open(str(tree.out / "existing.txt"), 1)
    assert b.fd is not None
    os.write(b.fd, b"NEW")
    fs_rig.close_fd(b.fd)
    assert (tree.out / "existing.txt").read_bytes() == b"NEW content that is longer\n"
    c = fs_rig.fs_open(str(tree.out / "existing.txt"), 2)
    assert c.fd is not None
    fs_rig.close_fd(c.fd)
    assert (tree.out / "existing.txt").read_bytes() == b""


def test_fs_write_existing_only_for_flags_1(fs_rig: Rig, tree: Tree) -> None:
    assert fs_rig.fs_open(str(tree.out / "absent.txt"), 1).result == ENOENT
    assert not (tree.out / "absent.txt").exists()
    assert_denial_audited(fs_rig, "fs_open", "ENOENT")


def test_fs_most_specific_root_wins(make_rig: RigFactory, tree: Tree) -> None:
    rig = make_rig(fs_read=(str(tree.base), str(tree.root)))
    assert rig.read_file(str(tree.root / "a.txt")) == INSIDE
    assert str(tree.root) in rig.last()["reason"]


# --------------------------------------------------------------------------- fs: denied


def test_fs_write_through_a_read_grant_refused(fs_rig: Rig, tree: Tree) -> None:
    for flags in (1, 2):
        assert fs_rig.fs_open(str(tree.root / "a.txt"), flags).result == EPERM
        assert_denial_audited(fs_rig, "fs_open", "not under a granted write root")
        assert fs_rig.fs_open(str(tree.root / "created.txt"), flags).result == EPERM
    assert (tree.root / "a.txt").read_bytes() == INSIDE
    assert not (tree.root / "created.txt").exists()


def test_fs_write_grant_does_not_imply_read(fs_rig: Rig, tree: Tree) -> None:
    assert fs_rig.fs_open(str(tree.out / "existing.txt"), 0).result == EPERM
    assert_denial_audited(fs_rig, "fs_open", "not under a granted read root")


@pytest.mark.parametrize(
    ("suffix", "why"),
    [
        ("/../outside/secret.txt", "'..'"),
        ("/sub/../../outside/secret.txt", "'..'"),
        ("/./a.txt", "'.'"),
        ("//a.txt", "'//'"),
        ("/a.txt/", "ends with '/'"),
        ("/sub/", "ends with '/'"),
    ],
)
def test_fs_path_tricks_denied(fs_rig: Rig, tree: Tree, suffix: str, why: str) -> None:
    assert fs_rig.read_file(str(tree.root) + suffix) == EPERM
    assert_denial_audited(fs_rig, "fs_open", why)


@pytest.mark.parametrize(
    "path",
    [
        "a.txt",
        "data/a.txt",
        "/etc/passwd",
        "/",
        "/proc/self/root/etc/passwd",
        "/proc/self/cwd/a.txt",
        "/dev/zero",
    ],
)
def test_fs_outside_or_relative_denied(fs_rig: Rig, path: str) -> None:
    assert fs_rig.read_file(path) == EPERM
    assert_denial_audited(fs_rig, "fs_open")


def test_fs_proc_self_root_spelling_of_the_root_denied(fs_rig: Rig, tree: Tree) -> None:
    assert fs_rig.read_file(f"/proc/self/root{tree.root}/a.txt") == EPERM
    assert fs_rig.read_file(f"/proc/{os.getpid()}/root{tree.secret}") == EPERM


def test_fs_sibling_prefix_is_not_under_the_root(fs_rig: Rig, tree: Tree) -> None:
    sibling = Path(str(tree.root) + "2")
    sibling.mkdir()
    (sibling / "x.txt").write_bytes(SECRET)
    assert fs_rig.read_file(str(sibling / "x.txt")) == EPERM


def test_fs_magic_links_under_a_slash_grant(make_rig: RigFactory, tree: Tree) -> None:
    """Even an operator granting ``/`` cannot be walked through /proc magic links."""
    rig = make_rig(fs_read=("/",))
    for path in (
        f"/proc/self/root{tree.secret}",
        f"/proc/{os.getpid()}/root{tree.secret}",
        "/proc/self/cwd",
        "/proc/self/exe",
    ):
        got = rig.read_file(path)
        assert isinstance(got, int), f"{path} was opened"
        assert got < 0
    fd = os.open(tree.secret, os.O_RDONLY)
    try:
        got = rig.read_file(f"/proc/self/fd/{fd}")
        assert isinstance(got, int)
        assert got < 0
    finally:
        os.close(fd)


def test_fs_symlink_inside_pointing_out_eloop(fs_rig: Rig, tree: Tree) -> None:
    (tree.root / "link").symlink_to(tree.secret)
    (tree.root / "rel").symlink_to("../outside/secret.txt")
    (tree.root / "dirlink").symlink_to(tree.outside)
    (tree.root / "magic").symlink_to(f"/proc/self/root{tree.outside}")
    assert fs_rig.read_file(str(tree.root / "link")) == ELOOP
    assert_denial_audited(fs_rig, "fs_open", "ELOOP")
    assert fs_rig.read_file(str(tree.root / "rel")) == ELOOP
    assert fs_rig.read_file(str(tree.root / "dirlink" / "secret.txt")) == ELOOP
    assert fs_rig.read_file(str(tree.root / "magic" / "secret.txt")) == ELOOP


def test_fs_a_symlink_in_the_manifests_part_of_a_root_is_not_followed(
    make_rig: RigFactory, tree: Tree
) -> None:
    """The operator grants a directory; the manifest (the plugin author's) asks for a path
    under it that passes through a symlink out of it. The file is opened beneath the
    operator's root, so that symlink is refused like any other, reading and writing."""
    (tree.root / "current").symlink_to("..")  # data/current -> fs/, which holds outside/
    (tree.out / "current").symlink_to(tree.outside)
    grant = policy.Grant(
        signer=SIGNER, plugin="unit", fs_read=(str(tree.root),), fs_write=(str(tree.out),)
    )
    asked = policy.manifest.Permissions(
        fs_read=(str(tree.root / "current" / "outside"),),
        fs_write=(str(tree.out / "current"),),
    )
    eff = policy.effective(asked, grant, policy.Defaults())
    assert eff.fs_read == (str(tree.root / "current" / "outside"),)  # its roots are granted
    assert eff.fs_read_grants == (str(tree.root),)
    fields = {
        f: getattr(eff, f) for f in ("fs_read", "fs_write", "fs_read_grants", "fs_write_grants")
    }
    rig = make_rig(**fields)
    assert rig.read_file(str(tree.root / "current" / "outside" / "secret.txt")) == ELOOP
    assert rig.fs_open(str(tree.out / "current" / "planted.txt"), 2).result == ELOOP
    assert not (tree.outside / "planted.txt").exists()
    assert tree.secret.read_bytes() == SECRET


def test_fs_symlink_pointing_inside_is_refused_too(fs_rig: Rig, tree: Tree) -> None:
    (tree.root / "alias").symlink_to("a.txt")
    assert fs_rig.read_file(str(tree.root / "alias")) == ELOOP


def test_fs_symlink_through_a_write_grant_creates_nothing_outside(fs_rig: Rig, tree: Tree) -> None:
    (tree.out / "evil").symlink_to(tree.outside / "planted.txt")
    assert fs_rig.fs_open(str(tree.out / "evil"), 2).result == ELOOP
    assert not (tree.outside / "planted.txt").exists()
    (tree.out / "victim").symlink_to(tree.secret)
    assert fs_rig.fs_open(str(tree.out / "victim"), 2).result == ELOOP
    assert tree.secret.read_bytes() == SECRET


def test_fs_directory_is_an_error(fs_rig: Rig, tree: Tree) -> None:
    assert fs_rig.read_file(str(tree.root / "sub")) == EISDIR
    assert_denial_audited(fs_rig, "fs_open", "EISDIR")
    assert fs_rig.read_file(str(tree.root)) == EISDIR  # the root itself
    assert fs_rig.fs_open(str(tree.out), 1).result == EISDIR


def test_fs_fifo_does_not_block(fs_rig: Rig, tree: Tree) -> None:
    os.mkfifo(tree.root / "fifo")
    os.mkfifo(tree.out / "fifo")
    started = time.monotonic()
    with deadline(5.0):
        assert fs_rig.read_file(str(tree.root / "fifo")) == EINVAL
        assert_denial_audited(fs_rig, "fs_open", "EINVAL")
        assert fs_rig.fs_open(str(tree.out / "fifo"), 1).result == ENXIO
        assert fs_rig.fs_open(str(tree.out / "fifo"), 2).result == ENXIO
    assert time.monotonic() - started < 1.0


def test_fs_unix_socket_is_an_error(fs_rig: Rig, tree: Tree) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(tree.root / "sock"))
        with deadline(5.0):
            got = fs_rig.read_file(str(tree.root / "sock"))
        assert isinstance(got, int)
        assert got < 0
    finally:
        s.close()


@pytest.mark.requires_root
def test_fs_device_node_is_an_error(fs_rig: Rig, tree: Tree) -> None:
    os.mknod(tree.root / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    with deadline(5.0):
        got = fs_rig.read_file(str(tree.root / "zero"))
    assert isinstance(got, int)
    assert got < 0


def test_fs_non_utf8_and_odd_bytes_never_crash(fs_rig: Rig, tree: Tree) -> None:
    root = str(tree.root).encode()
    for raw in (root + b"/\xff\xfe", root + b"/a.txt\r\n", root + b"/\x1b[2J", b"\xff" * 100):
        got = fs_rig.read_file(raw)
        assert isinstance(got, int)
        assert got < 0
        assert_denial_audited(fs_rig, "fs_open")


def test_fs_nul_in_path_is_a_violation(fs_rig: Rig, tree: Tree) -> None:
    frame = p.encode_i32_text(p.Op.FS_OPEN, 1, 0, str(tree.root / "a.txt").encode() + b"\x00x")
    assert fs_rig.raw(frame) is None
    assert fs_rig.broker.stats.violations == 1


# --------------------------------------------------------------------------- fs: flags

_I32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_SINGLE_BITS = [struct.unpack("!i", struct.pack("!I", 1 << k))[0] for k in range(32)]


@pytest.mark.parametrize("flags", sorted({*range(-3, 9), *_SINGLE_BITS, 2**31 - 1, 0x241}))
def test_fs_every_flag_value(fs_rig: Rig, tree: Tree, flags: int) -> None:
    """Only 0 (read), 1 (write) and 2 (create) mean anything; every other value is EINVAL."""
    target = tree.out / "flags.txt"
    target.write_bytes(b"keep")
    a = fs_rig.fs_open(str(target), flags)
    if flags in (1, 2):
        assert a.result >= 0
        assert a.fd is not None
        fs_rig.close_fd(a.fd)
    elif flags == 0:
        assert a.result == EPERM  # a write root is not a read root
    else:
        assert a.result == EINVAL
        assert_denial_audited(fs_rig, "fs_open", "flags")
        assert target.read_bytes() == b"keep"
    r = fs_rig.fs_open(str(tree.root / "a.txt"), flags)
    if flags == 0:
        assert r.fd is not None
        fs_rig.close_fd(r.fd)
    else:
        assert r.result == (EPERM if flags in (1, 2) else EINVAL)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(flags=_I32)
def test_fs_random_flags(fs_rig: Rig, tree: Tree, flags: int) -> None:
    a = fs_rig.fs_open(str(tree.root / "a.txt"), flags)
    if flags == 0:
        assert a.fd is not None
        fs_rig.close_fd(a.fd)
    elif flags in (1, 2):
        assert a.result == EPERM
    else:
        assert a.result == EINVAL
    assert (tree.root / "a.txt").read_bytes() == INSIDE


# --------------------------------------------------------------------------- fs: swaps during the call


def _swap_file_for_link(path: Path, target: Path) -> None:
    tmp = path.with_name(path.name + ".swap")
    tmp.symlink_to(target)
    os.replace(tmp, path)


def test_fs_symlink_swapped_in_after_the_policy_check(
    fs_rig: Rig, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = policy.check_fs
    victim = tree.root / "a.txt"

    def check_then_swap(eff: Effective, path: str, write: bool) -> Any:
        decision = real(eff, path, write)
        _swap_file_for_link(victim, tree.secret)
        return decision

    monkeypatch.setattr(policy, "check_fs", check_then_swap)
    assert fs_rig.read_file(str(victim)) == ELOOP
    assert_denial_audited(fs_rig, "fs_open", "ELOOP")


def test_fs_directory_swapped_for_a_link_just_before_openat2(
    fs_rig: Rig, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = libc.openat2
    sub = tree.root / "sub"

    def swap_then_open(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
        if sub.is_dir() and not sub.is_symlink():
            os.rename(sub, tree.base / "sub-moved")
            sub.symlink_to(tree.outside / "sub")
        return real(dirfd, path, flags, mode, resolve)

    monkeypatch.setattr(libc, "openat2", swap_then_open)
    assert fs_rig.read_file(str(sub / "f.txt")) == ELOOP


def test_fs_root_itself_swapped_for_a_link(
    fs_rig: Rig, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = policy.check_fs

    def check_then_swap(eff: Effective, path: str, write: bool) -> Any:
        decision = real(eff, path, write)
        os.rename(tree.root, tree.base / "data-moved")
        tree.root.symlink_to(tree.outside)
        return decision

    monkeypatch.setattr(policy, "check_fs", check_then_swap)
    got = fs_rig.read_file(str(tree.root / "secret.txt"))
    assert got == ENOTDIR


_FLIPPER = textwrap.dedent(
    """
    import os, sys
    d = sys.argv[1]
    f, sub = os.path.join(d, "f.txt"), os.path.join(d, "sub")
    real_f, link_f = os.path.join(d, ".real_f"), os.path.join(d, ".link_f")
    real_s, link_s = os.path.join(d, ".real_sub"), os.path.join(d, ".link_sub")
    print("ready", flush=True)
    while True:
        # f.txt: a regular file one moment, a symlink to the secret the next
        os.link(real_f, f + ".n"); os.replace(f + ".n", f)
        os.symlink(sys.argv[2], f + ".n"); os.replace(f + ".n", f)
        # sub/: a directory one moment, a symlink to an outside directory the next
        os.rename(sub, real_s); os.rename(link_s, sub)
        os.rename(sub, link_s); os.rename(real_s, sub)
    """
)


def test_fs_racing_flips_never_leak_the_outside_file(
    fs_rig: Rig, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A separate process flips a file and a directory between real and symlink as fast as
    it can while the broker opens them: every open is either the inside file or ELOOP."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # thousands of denials
    (tree.root / ".real_f").write_bytes(INSIDE)
    (tree.root / "f.txt").write_bytes(INSIDE)
    (tree.root / ".link_sub").symlink_to(tree.outside / "sub")
    proc = subprocess.Popen(
        [sys.executable, "-c", _FLIPPER, str(tree.root), str(tree.secret)],
        stdout=subprocess.PIPE,
    )
    outcomes: dict[object, int] = {}
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        started = time.monotonic()
        n = 0
        while n < 6000 or (len(outcomes) < 2 and time.monotonic() - started < 10):
            n += 1
            for path in (tree.root / "f.txt", tree.root / "sub" / "f.txt"):
                got = fs_rig.read_file(str(path))
                assert got != SECRET, f"the outside file leaked after {n} opens"
                key = "inside" if got == INSIDE else got
                outcomes[key] = outcomes.get(key, 0) + 1
        assert proc.poll() is None, "the flipper died: the race did not run"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # ENOENT: sub/ is briefly absent between two renames of the directory flip
    assert set(outcomes) <= {"inside", ELOOP, ENOENT}, outcomes
    assert outcomes.get("inside", 0) > 0, outcomes
    assert outcomes.get(ELOOP, 0) > 0, outcomes


# --------------------------------------------------------------------------- net


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A listening TCP socket on 127.0.0.1 (non-blocking accept)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


def _accepted(srv: socket.socket, wait: float = 0.2) -> socket.socket | None:
    end = time.monotonic() + wait
    while True:
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            if time.monotonic() >= end:
                return None
            time.sleep(0.01)
            continue
        conn.setblocking(True)
        conn.settimeout(5)
        return conn


def _net_rig(make_rig: RigFactory, port: int, answers: Sequence[str], **kw: Any) -> Rig:
    return make_rig(
        net_connect=frozenset({("svc.test", port)}),
        net_allow_networks=(ipaddress.ip_network("127.0.0.0/8"),),
        resolver=FakeResolver({"svc.test": answers}),
        **kw,
    )


def test_net_connect_without_grant_denied_and_never_resolved(
    make_rig: RigFactory, server: socket.socket
) -> None:
    port = server.getsockname()[1]
    rig = make_rig(resolver=FakeResolver({"svc.test": ["127.0.0.1"]}))
    assert rig.net_connect("svc.test", port).result == EPERM
    assert_denial_audited(rig, "net_connect", "not granted")
    assert rig.net_connect("127.0.0.1", port).result == EPERM
    assert rig.resolver.calls == []  # no DNS query leaks for an ungranted name
    assert _accepted(server) is None


def test_net_connect_resolving_inside_connects(make_rig: RigFactory, server: socket.socket) -> None:
    port = server.getsockname()[1]
    rig = _net_rig(make_rig, port, ["127.0.0.1"])
    a = rig.net_connect("SVC.Test", port)  # names compare case-insensitively
    assert a.result >= 0
    assert a.fd is not None
    assert rig.resolver.calls == [("svc.test", port)]
    conn = _accepted(server)
    assert conn is not None
    with conn:
        os.write(a.fd, b"ping")
        assert conn.recv(4) == b"ping"
        conn.sendall(b"pong")
        assert os.read(a.fd, 4) == b"pong"
    rec = rig.last()
    assert (rec["decision"], rec["args"]["resolved"]) == ("allow", ["127.0.0.1"])


@pytest.mark.parametrize(
    "answers",
    [["192.0.2.10"], ["127.0.0.1", "192.0.2.10"], ["192.0.2.10", "127.0.0.1"], ["::1"]],
)
def test_net_connect_resolving_outside_denied(
    make_rig: RigFactory, server: socket.socket, answers: list[str]
) -> None:
    port = server.getsockname()[1]
    rig = _net_rig(make_rig, port, answers)
    assert rig.net_connect("svc.test", port).result == EPERM
    rec = assert_denial_audited(rig, "net_connect", "outside net_allow_networks")
    assert rec["args"]["resolved"] == answers
    assert _accepted(server) is None  # not even the inside address was dialled


def test_net_connect_rebinding_between_calls(make_rig: RigFactory, server: socket.socket) -> None:
    port = server.getsockname()[1]
    rig = _net_rig(make_rig, port, ["127.0.0.1"])
    first = rig.net_connect("svc.test", port)
    assert first.fd is not None
    conn = _accepted(server)
    assert conn is not None
    conn.close()
    rig.resolver.table["svc.test"] = ["203.0.113.5"]
    assert rig.net_connect("svc.test", port).result == EPERM
    assert len(rig.resolver.calls) == 2  # exactly one resolution per call


def test_net_connect_ip_literal_grant_needs_that_address(
    make_rig: RigFactory, server: socket.socket
) -> None:
    port = server.getsockname()[1]
    rig = make_rig(
        net_connect=frozenset({("127.0.0.1", port)}),
        resolver=FakeResolver({"127.0.0.1": ["127.0.0.2"]}),
    )
    assert rig.net_connect("127.0.0.1", port).result == EPERM
    assert_denial_audited(rig, "net_connect", "not the granted address")
    rig.resolver.table["127.0.0.1"] = ["127.0.0.1"]
    a = rig.net_connect("127.0.0.1", port)
    assert a.fd is not None
    assert rig.net_connect("127.0.0.1", port + 1 if port < 65535 else port - 1).result == EPERM


def test_net_connect_resolver_failures(make_rig: RigFactory) -> None:
    rig = _net_rig(make_rig, 8080, [])
    assert rig.net_connect("svc.test", 8080).result == EPERM
    assert_denial_audited(rig, "net_connect", "no address")
    rig.resolver.table["svc.test"] = OSError(errno.ENOENT, "no such name")
    assert rig.net_connect("svc.test", 8080).result == ENOENT
    assert_denial_audited(rig, "net_connect", "cannot resolve")
    rig.resolver.table["svc.test"] = ["not-an-address"]
    assert rig.net_connect("svc.test", 8080).result == EPERM


def test_net_connect_refused(make_rig: RigFactory) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    rig = _net_rig(make_rig, port, ["127.0.0.1"])
    assert rig.net_connect("svc.test", port).result == ECONNREFUSED
    assert_denial_audited(rig, "net_connect", "connect failed")


def test_net_connect_has_one_budget_for_all_its_addresses(
    make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name resolving to many silent addresses: at most MAX_CONNECT_ADDRESSES are tried,
    each with what is left of the call's one CONNECT_TIMEOUT_S, so the plugin's supervisor
    is never blocked longer than that by one call (it was 5 s per address)."""
    monkeypatch.setattr(broker_mod, "CONNECT_TIMEOUT_S", 0.6)
    answers = [f"127.0.0.{i}" for i in range(2, 40)]
    rig = _net_rig(make_rig, 9, answers)
    tried: list[tuple[str, float]] = []

    def silent(addr: str, port: int, timeout: float) -> int:
        tried.append((addr, timeout))
        time.sleep(min(timeout, 0.25))  # a blackhole: the whole timeout, or 0.25 s here
        raise TimeoutError(errno.ETIMEDOUT, "timed out")

    rig.broker.connector = silent
    assert rig.net_connect("svc.test", 9).result == -errno.ETIMEDOUT
    assert [a for a, _ in tried] == answers[: len(tried)]
    assert 1 <= len(tried) <= broker_mod.MAX_CONNECT_ADDRESSES
    # each attempt gets what is left of the one budget: together they never exceed it
    assert all(0 < t <= 0.6 for _, t in tried)
    assert all(later <= earlier - 0.2 for (_, earlier), (_, later) in itertools.pairwise(tried))
    many = _net_rig(make_rig, 9, answers)
    refused: list[str] = []

    def refusing(addr: str, port: int, timeout: float) -> int:
        refused.append(addr)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    many.broker.connector = refusing
    assert many.net_connect("svc.test", 9).result == ECONNREFUSED
    assert refused == answers[: broker_mod.MAX_CONNECT_ADDRESSES]


@pytest.mark.parametrize("port", [0, -1, 65536, 2**31 - 1, -(2**31)])
def test_net_connect_bad_port(make_rig: RigFactory, port: int) -> None:
    rig = _net_rig(make_rig, 8080, ["127.0.0.1"])
    assert rig.net_connect("svc.test", port).result == EINVAL
    assert_denial_audited(rig, "net_connect", "port")
    assert rig.resolver.calls == []


@pytest.mark.parametrize("host", [b"svc.test.", b"svc.test:80", b"\xffsvc", b"svc test", b"*"])
def test_net_connect_odd_hosts_denied(make_rig: RigFactory, host: bytes) -> None:
    rig = _net_rig(make_rig, 8080, ["127.0.0.1"])
    assert rig.net_connect(host, 8080).result == EPERM
    assert rig.resolver.calls == []


# --------------------------------------------------------------------------- every denial


def _denials(tree: Tree) -> list[tuple[str, Callable[[Rig], Answer], int]]:
    return [
        ("config", lambda r: r.config_get(b"nope"), EPERM),
        ("kv", lambda r: r.kv_set(b"k", b"v"), EPERM),
        ("fs-outside", lambda r: r.fs_open(str(tree.secret), 0), EPERM),
        ("fs-flags", lambda r: r.fs_open(str(tree.root / "a.txt"), 7), EINVAL),
        ("fs-write-on-read", lambda r: r.fs_open(str(tree.root / "a.txt"), 2), EPERM),
        ("fs-missing", lambda r: r.fs_open(str(tree.root / "none"), 0), ENOENT),
        ("net", lambda r: r.net_connect("example.com", 443), EPERM),
        ("net-port", lambda r: r.net_connect("example.com", 0), EINVAL),
    ]


def test_every_denial_is_audited_and_fsynced_before_the_answer(
    fs_rig: Rig, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    for n, (name, call, expected) in enumerate(_denials(tree), 1):
        before = len(synced)
        a = call(fs_rig)
        assert a.result == expected, name
        assert len(synced) > before, f"{name}: the denial was not fsynced before the reply"
        recs = fs_rig.records()
        assert len(recs) == n, name
        assert recs[-1]["decision"] == "deny", name
        assert recs[-1]["reason"], name
    assert fs_rig.broker.stats.denied == len(_denials(tree))
    assert fs_rig.broker.stats.allowed == 0


def test_audit_records_carry_the_channel_identity_and_chain(fs_rig: Rig, tree: Tree) -> None:
    fs_rig.log(1, b"a")
    fs_rig.clock_now()
    fs_rig.read_file(str(tree.root / "a.txt"))
    fs_rig.read_file(str(tree.secret))
    assert fs_rig.raw(b"\x01\x02garbage") is None  # clock_now with a body: malformed
    fs_rig.broker.close()
    recs = fs_rig.records()
    assert [r["op"] for r in recs] == ["log", "clock_now", "fs_open", "fs_open", "malformed"]
    for r in recs:
        assert r["identity"] == fs_rig.broker.identity.as_dict()
        assert {"time", "op", "args", "decision", "reason", "latency_us"} <= set(r)
    assert verify(fs_rig.audit_path).ok
    lines = fs_rig.audit_path.read_bytes().splitlines(keepends=True)
    fs_rig.audit_path.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    assert not verify(fs_rig.audit_path).ok


# --------------------------------------------------------------------------- violations


@pytest.mark.parametrize("op", [0, max(p.Op) + 1, 0x63, 0xFF])
def test_unknown_op_is_answered_enosys_and_audited(make_rig: RigFactory, op: int) -> None:
    rig = make_rig()
    reply = rig.raw(bytes([1, op, 0, 0, 0, 7]))
    assert reply is not None
    assert reply.frame[:6] == bytes([1, op, 0, 0, 0, 7])
    assert struct.unpack_from("!q", reply.frame, 6)[0] == -38  # -ENOSYS
    assert rig.broker.stats.violations == 0
    assert rig.broker.stats.denied == 1
    assert [r["reason"] for r in rig.records()] == ["unknown call: -ENOSYS"]


def test_unknown_ops_are_within_the_rate(make_rig: RigFactory) -> None:
    """A flood of unknown ops (each an fsync'd denial record) is rate-limited like any call:
    every one is answered -ENOSYS, only the first is audited in full."""
    clock = FakeClock()
    rig = make_rig(clock=clock, rate_per_s=1.0, burst=1)
    for seq in range(50):
        reply = rig.raw(bytes([1, 0xFF, 0, 0, 0, seq]))
        assert reply is not None
        assert struct.unpack_from("!q", reply.frame, 6)[0] == -38
    assert rig.broker.stats.rate_denied == 49
    reasons = [r["reason"] for r in rig.records()]
    assert reasons[0] == "unknown call: -ENOSYS"
    assert len(reasons) == 2, reasons
    assert reasons[1].startswith("rate limit exceeded"), reasons


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01",
        b"\x01\x02\x00\x00\x00",  # truncated header
        b"\x02\x02\x00\x00\x00\x01",  # version 2
        b"\x00\x02\x00\x00\x00\x01",  # version 0
        p.encode(p.Op.LOG, 1, b"\x00\x00"),  # truncated body
        p.encode(p.Op.KV_SET, 1, b"\xff\xffk"),  # key length past the frame
        p.encode(p.Op.KV_GET, 1, struct.pack("!I", 16)),  # empty key
        p.encode(p.Op.CONFIG_GET, 1, struct.pack("!I", 16) + b"k" * (p.MAX_KEY + 1)),
        p.encode(p.Op.FS_OPEN, 1, struct.pack("!i", 0)),  # empty path
        p.encode(p.Op.NET_CONNECT, 1, struct.pack("!i", 80) + b"h" * (p.MAX_HOST + 1)),
        p.encode(p.Op.DONE, 0, b"\x00\x00\x00\x00\x00\x09"),  # unknown done kind
        p.encode(p.Op.IDLE, 1, b"\x00\x00\x00\x00\x09"),  # unknown idle kind
        p.encode(p.Op.IDLE, 1, b"\x00\x00\x00\x00\x00\x00"),  # trailing byte
        p.encode(p.Op.OUTPUT, 1, b"o" * p.MAX_FRAME),  # oversized frame
    ],
)
def test_malformed_frames_get_no_reply_and_are_audited(make_rig: RigFactory, frame: bytes) -> None:
    rig = make_rig()
    assert rig.raw(frame) is None
    assert rig.broker.stats.violations == 1
    assert rig.broker.stats.denied == 1
    assert rig.broker.stats.allowed == 0
    assert rig.broker.done is None
    rec = assert_denial_audited(rig, "malformed", "protocol")
    assert f"({len(frame)} bytes)" in rec["reason"]


def test_descriptors_from_the_child_are_a_violation(make_rig: RigFactory) -> None:
    rig = make_rig()
    assert rig.raw(p.encode_log(1, 1, b"with an fd"), fds_received=1) is None
    assert rig.raw(p.encode(p.Op.CLOCK_NOW, 2), fds_received=3) is None
    assert rig.broker.stats.violations == 2
    assert not rig.logs  # the request itself was not served
    rec = assert_denial_audited(rig, "fds", "3 descriptor")
    assert rec["args"] == {}


def test_sixteen_violations_make_the_child_abusive(make_rig: RigFactory) -> None:
    rig = make_rig()
    for i in range(MAX_VIOLATIONS - 1):
        rig.raw(b"junk" * i)
        assert not rig.broker.abusive
    assert rig.clock_now().result > 0  # valid requests are still served meanwhile
    rig.raw(b"junk", fds_received=0)
    assert rig.broker.abusive
    assert MAX_VIOLATIONS == 16


def test_done_frame(make_rig: RigFactory) -> None:
    rig = make_rig()
    assert rig.raw(p.encode_done(1, 0, p.DoneKind.OK, b"")) is None
    assert rig.raw(p.encode_done(2, 7, p.DoneKind.TRAP, b"later")) is None
    assert rig.broker.done == p.Done(1, 0, p.DoneKind.OK, b"")
    # the first DONE is the child's last word; a second one breaks the protocol
    assert rig.broker.stats.violations == 1
    assert (rig.broker.stats.allowed, rig.broker.stats.denied) == (0, 1)


def test_idle_is_held_until_a_command_and_twice_is_a_violation(make_rig: RigFactory) -> None:
    rig = make_rig()
    assert rig.output(b"from start").result == 10
    assert rig.raw(p.encode_idle(7, 3, p.DoneKind.FAILED)) is None
    assert rig.broker.idle_seq == 7
    assert rig.broker.last_result == (3, p.DoneKind.FAILED)
    assert rig.raw(p.encode_idle(8, 0, p.DoneKind.OK)) is None
    assert rig.broker.stats.violations == 1
    assert_denial_audited(rig, "idle", "already idle")
    answer = rig.broker.answer_idle(p.Command.CALL, b"input")
    assert p.decode_reply(answer.frame, p.Op.IDLE, 7) == (p.Command.CALL, b"input")
    assert rig.broker.idle_seq is None
    assert rig.broker.output == b""  # each command's output starts empty
    with pytest.raises(BrokerProtocolError):
        rig.broker.answer_idle(p.Command.STOP)


# --------------------------------------------------------------------------- rate limits


def test_rate_limit_eagain_after_burst_one_record_per_window(make_rig: RigFactory) -> None:
    clock = FakeClock()
    rig = make_rig(clock=clock, rate_per_s=10.0, burst=3)
    results = [rig.log(1, b"x").result for _ in range(50)]
    assert results[:3] == [0, 0, 0]
    assert results[3:] == [EAGAIN] * 47
    assert EAGAIN == -11
    assert rig.broker.stats.rate_denied == 47
    assert rig.broker.stats.denied == 47
    assert len(rig.logs) == 3
    rate_records = [r for r in rig.records() if r["reason"].startswith("rate limit")]
    assert len(rate_records) == 1
    assert rate_records[0]["decision"] == "deny"
    # a token comes back after 0.1 s: one call passes; a flood within the same second adds
    # no record, one a second later does
    clock.now += 0.1
    assert rig.clock_now().result > 0
    assert [rig.log(1, b"y").result for _ in range(10)] == [EAGAIN] * 10
    assert len([r for r in rig.records() if r["reason"].startswith("rate limit")]) == 1
    clock.now += 1.0
    assert [rig.log(1, b"z").result for _ in range(3)] == [0, 0, 0]
    assert [rig.log(1, b"z").result for _ in range(10)] == [EAGAIN] * 10
    rate_records = [r for r in rig.records() if r["reason"].startswith("rate limit")]
    assert len(rate_records) == 2
    assert not rig.broker.abusive


def test_rate_limit_applies_to_every_op_but_done(make_rig: RigFactory, tree: Tree) -> None:
    clock = FakeClock()
    rig = make_rig(clock=clock, rate_per_s=1.0, burst=1, fs_read=(str(tree.root),))
    assert rig.clock_now().result > 0
    assert rig.random(8).result == EAGAIN
    assert rig.fs_open(str(tree.root / "a.txt"), 0) == Answer(EAGAIN, b"", None)
    assert rig.config_get(b"k").result == EAGAIN
    assert rig.output(b"o").result == EAGAIN
    assert rig.raw(p.encode_done(255, 0, p.DoneKind.OK, b"")) is None
    assert rig.broker.done is not None


def test_a_sustained_flood_becomes_abuse(make_rig: RigFactory) -> None:
    clock = FakeClock()
    rig = make_rig(clock=clock, rate_per_s=1.0, burst=1)
    rig.log(1, b"first")
    for _ in range(MAX_RATE_DENIALS - 1):
        rig.log(1, b"flood")
    assert not rig.broker.abusive
    rig.log(1, b"flood")
    assert rig.broker.abusive
    assert len(rig.records()) == 2  # one allow, one rate-limit record for the whole flood


def test_rate_limit_from_policy_defaults(make_rig: RigFactory) -> None:
    clock = FakeClock()
    eff = Effective()
    rig = make_rig(clock=clock, rate_per_s=eff.rate_per_s, burst=eff.burst)
    ok = sum(rig.clock_now().result > 0 for _ in range(eff.burst + 10))
    assert ok == eff.burst == policy.DEFAULT_BURST
