"""forgeone_isolate.audit: the hash-chained audit log, ``verify`` and ``audit verify``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from forgeone_isolate import audit, cli
from forgeone_isolate.audit import ZERO_HASH, AuditError, AuditLog, seal, summarize, verify

REPO = Path(__file__).resolve().parent.parent


def record(i: int) -> dict[str, object]:
    return {
        "time": 1700000000.5 + i,
        "identity": {"signer": "ab" * 32, "plugin": "hello", "instance": "0123456789ab"},
        "op": ["log", "fs_open", "net_connect"][i % 3],
        "args": {"path": f"/srv/data/f{i}", "note": 'caf\u00e9 \u2603 "q" \\ \n'},
        "decision": "allow" if i % 2 else "deny",
        "reason": "granted" if i % 2 else "fs read: not under a granted read root",
        "latency_us": 12.5,
    }


def write_log(path: Path, n: int = 5) -> list[bytes]:
    with AuditLog(path) as log:
        for i in range(n):
            log.append(record(i), durable=i % 2 == 0)
    return path.read_bytes().splitlines(keepends=True)


def put(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


# --- the chain -------------------------------------------------------------------------------


def test_chain_ok(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 5)
    assert len(lines) == 5
    result = verify(path)
    assert result.ok
    assert (result.records, result.line) == (5, None)
    first = json.loads(lines[0])
    assert first["seq"] == 1
    assert first["prev"] == ZERO_HASH
    second = json.loads(lines[1])
    assert second["seq"] == 2
    assert second["prev"] == hashlib.sha256(lines[0].rstrip(b"\n")).hexdigest()
    assert first["args"]["note"] == record(0)["args"]["note"]  # type: ignore[index]
    assert all(line.isascii() and line.count(b"\n") == 1 for line in lines)


def test_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    AuditLog(path).close()
    assert verify(path) == audit.VerifyResult(True, 0, None, "0 records, hash chain intact")


def test_edit_one_byte_fails_at_that_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 5)
    for n in range(5):  # every line, the last one included
        edited = list(lines)
        edited[n] = edited[n].replace(b"/srv/data/f", b"/srv/data/g")
        put(path, edited)
        result = verify(path)
        assert not result.ok
        assert result.line == n + 1
        assert result.records == n
        assert "edited" in result.reason


def test_edit_with_recomputed_hash_breaks_the_next_prev(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 4)
    obj = json.loads(lines[1])
    obj["decision"] = "allow"
    obj["reason"] = "forged"
    forged = seal({k: v for k, v in obj.items() if k not in audit.RESERVED_FIELDS}, 2, obj["prev"])
    put(path, [lines[0], forged + b"\n", lines[2], lines[3]])
    result = verify(path)
    assert (result.ok, result.line) == (False, 3)
    assert "prev does not match" in result.reason


def test_delete_a_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 5)
    put(path, lines[:2] + lines[3:])
    result = verify(path)
    assert (result.ok, result.line) == (False, 3)
    assert "seq is 4, expected 3" in result.reason
    put(path, lines[1:])  # the first line
    assert verify(path).line == 1


def test_swap_two_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 5)
    put(path, [lines[0], lines[2], lines[1], *lines[3:]])
    result = verify(path)
    assert (result.ok, result.line) == (False, 2)
    assert "seq is 3, expected 2" in result.reason


def test_broken_seq_and_prev(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 3)
    prev = json.loads(lines[2])["prev"]
    put(path, [*lines[:2], seal(record(2), 7, prev) + b"\n"])
    result = verify(path)
    assert (result.line, result.reason) == (
        3,
        "seq is 7, expected 3 (a line was deleted, inserted or moved)",
    )
    put(path, [*lines[:2], seal(record(2), 3, ZERO_HASH) + b"\n"])
    result = verify(path)
    assert result.line == 3
    assert result.reason.startswith("prev does not match")


def test_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 3)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    result = verify(path)
    assert (result.ok, result.line, result.records) == (False, 3, 2)
    assert "truncated" in result.reason
    path.write_bytes(data[:-1])  # only the newline gone
    assert verify(path).line == 3


@pytest.mark.parametrize(
    ("junk", "reason"),
    [
        (b"not json\n", "not valid JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b"\n", "empty line"),
        (b'{"seq": 3}\n', "missing seq, prev or hash"),
        (b"\xff\xfe\n", "not valid JSON"),
        (b"x" * (audit.MAX_LINE_BYTES + 5) + b"\n", "line longer than"),
    ],
)
def test_bad_lines(tmp_path: Path, junk: bytes, reason: str) -> None:
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 3)
    put(path, [*lines[:2], junk, lines[2]])
    result = verify(path)
    assert (result.ok, result.line) == (False, 3)
    assert reason in result.reason


def test_non_canonical_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 2)
    spaced = json.dumps(json.loads(lines[1]), sort_keys=True).encode() + b"\n"  # ", " and ": "
    put(path, [lines[0], spaced])
    result = verify(path)
    assert (result.line, result.reason) == (2, "not in canonical form (edited)")
    put(path, [lines[0], lines[1].replace(b"\n", b"\r\n")])
    assert verify(path).line == 2


def test_deeply_nested_line_is_tampering_not_a_crash(tmp_path: Path) -> None:
    # A line nested just under json's depth limit loads but may fail to re-encode, at a
    # depth that depends on the caller's stack: try every depth near the limit, through
    # both verify() and the CLI, and expect a tampered line 2 each time, never an exception.
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 1)
    limit = sys.getrecursionlimit()
    for depth in range(max(1, limit - 250), limit + 10):
        deep = b"[" * depth + b"]" * depth
        line = b'{"hash":"%s","prev":"%s","seq":2,"x":%s}\n' % (b"0" * 64, b"0" * 64, deep)
        put(path, [lines[0], line])
        result = verify(path)
        assert (result.ok, result.records, result.line) == (False, 1, 2), depth
        out = io.StringIO()
        assert cli.main(["audit", "verify", str(path)], out) == 1, depth
        assert out.getvalue().startswith(f"TAMPERED: {path}: line 2: "), depth


# --- writers -----------------------------------------------------------------------------


def test_two_writers_interleave(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    with AuditLog(path) as a, AuditLog(path) as b:
        for i in range(10):
            (a if i % 3 else b).append(record(i), durable=False)
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == list(range(1, 11))
    assert verify(path).ok


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 3)
    write_log(path, 2)
    result = verify(path)
    assert (result.ok, result.records) == (True, 5)


def test_processes_append_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    code = (
        "import sys; from pathlib import Path; from forgeone_isolate.audit import AuditLog\n"
        "with AuditLog(Path(sys.argv[1]), fsync_every=1000) as log:\n"
        "    for i in range(200): log.append({'writer': sys.argv[2], 'i': i}, durable=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), str(w)], env=env) for w in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    result = verify(path)
    assert (result.ok, result.records) == (True, 800), result


def test_permissions(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit" / "log.jsonl"
    old = os.umask(0)
    try:
        AuditLog(path).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_refuses_a_symlink_and_a_directory(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with pytest.raises(AuditError, match=r"^audit log .*link\.jsonl: cannot open"):
        AuditLog(link)
    with pytest.raises(AuditError, match="cannot open"):
        AuditLog(tmp_path)


def test_fsync_durable_batched_and_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    log = AuditLog(tmp_path / "a.jsonl", fsync_every=3)
    monkeypatch.setattr(os, "fsync", counting)
    log.append(record(0), durable=True)
    assert len(calls) == 1  # before append returned
    log.append(record(1), durable=False)
    log.append(record(2), durable=False)
    assert len(calls) == 1
    log.append(record(3), durable=False)  # the third batched append
    assert len(calls) == 2
    log.append(record(4), durable=False)
    log.append(record(5), durable=True)
    assert len(calls) == 3
    log.append(record(6), durable=False)
    log.close()
    assert len(calls) == 4  # the pending one, on close
    log.close()
    assert len(calls) == 4
    assert verify(tmp_path / "a.jsonl").records == 7


def test_append_refusals(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    for bad in ({"seq": 1}, {"prev": "x"}, {"hash": "x"}):
        with pytest.raises(ValueError, match="may not set"):
            log.append(bad, durable=False)
    with pytest.raises(ValueError):
        log.append({"x": float("nan")}, durable=False)
    with pytest.raises(ValueError, match="not JSON data"):
        log.append({"x": b"bytes"}, durable=False)
    with pytest.raises(ValueError, match="more than"):
        log.append({"x": "y" * audit.MAX_LINE_BYTES}, durable=False)
    log.append({"x": 1}, durable=False)
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append({"x": 2}, durable=False)
    assert verify(tmp_path / "a.jsonl").records == 1


def test_refuses_to_chain_onto_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 2)
    with path.open("ab") as f:
        f.write(b'{"half":')
    with AuditLog(path) as log, pytest.raises(AuditError, match="incomplete"):
        log.append(record(9), durable=True)
    path.write_bytes(b"garbage\n")
    with AuditLog(path) as log, pytest.raises(AuditError, match="not an audit record"):
        log.append(record(9), durable=True)


def test_summarize_never_shows_bytes() -> None:
    secret = b"-----BEGIN PRIVATE KEY----- hunter2"
    s = summarize(secret)
    assert "hunter2" not in s
    assert s.startswith(f"<{len(secret)} bytes sha256:")
    assert summarize("short") == "short"
    long = "x" * 100
    s = summarize(long, limit=10)
    assert s.startswith("x" * 10 + "…<100 chars sha256:")
    assert len(s) < 60


# --- the command line ------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "forgeone_isolate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_audit_verify(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 4)
    ok = run_cli("audit", "verify", str(path))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"OK: {path}: 4 records, hash chain intact\n"

    put(path, [lines[0], lines[2], lines[1], lines[3]])
    bad = run_cli("audit", "verify", str(path))
    assert bad.returncode == 1
    assert bad.stdout.count("\n") == 1
    assert bad.stdout.startswith(f"TAMPERED: {path}: line 2: seq is 3, expected 2")

    absent = run_cli("audit", "verify", str(tmp_path / "absent.jsonl"))
    assert absent.returncode == 2
    assert "cannot read" in absent.stderr
    assert absent.stderr.count("\n") == 1
    directory = run_cli("audit", "verify", str(tmp_path))
    assert directory.returncode == 2
    assert "not a regular file" in directory.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert run_cli("audit", "verify", str(fifo)).returncode == 2


def test_verify_does_not_follow_a_symlink(tmp_path: Path) -> None:
    # A link in place of a log must not pass for it, however intact its target is.
    target = tmp_path / "elsewhere.jsonl"
    write_log(target, 3)
    link = tmp_path / "a.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError, match=r"symbolic link \(not followed\)"):
        verify(link)
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "absent")
    with pytest.raises(OSError, match="symbolic link"):
        verify(dangling)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "fifo-link").symlink_to(fifo)
    with pytest.raises(OSError, match="symbolic link"):
        verify(tmp_path / "fifo-link")
    cli_link = run_cli("audit", "verify", str(link))
    assert cli_link.returncode == 2
    assert cli_link.stdout == ""
    assert cli_link.stderr.count("\n") == 1
    assert "cannot read: a symbolic link (not followed)" in cli_link.stderr


def test_cli_audit_in_process(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, 2)
    out = io.StringIO()
    assert cli.main(["audit", "verify", str(path)], out) == 0
    assert out.getvalue().startswith("OK:")
    assert cli.main(["audit"], io.StringIO()) == 2


# --- any edit is detected --------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_log() -> Iterator[bytes]:
    with tempfile.TemporaryDirectory() as d:
        yield b"".join(write_log(Path(d) / "a.jsonl", 6))


@st.composite
def edits(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["replace", "insert", "delete", "splice"]))
    pos = draw(st.integers(0, len(data)))
    if kind == "replace":
        pos = min(pos, len(data) - 1)
        byte = draw(st.integers(0, 255).filter(lambda b: b != data[pos]))
        return data[:pos] + bytes([byte]) + data[pos + 1 :]
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    end = draw(st.integers(pos, min(len(data), pos + 300)))
    new = b"" if kind == "delete" else draw(st.binary(max_size=8))
    return data[:pos] + new + data[end:]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_edit_is_detected(valid_log: bytes, data: st.DataObject) -> None:
    edited = data.draw(edits(valid_log))
    assume(edited != valid_log)
    # Dropping whole lines at the end leaves a valid shorter log: no chain can see that.
    assume(not (valid_log.startswith(edited) and (edited == b"" or edited.endswith(b"\n"))))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "edited.jsonl"
        path.write_bytes(edited)
        assert not verify(path).ok


# --------------------------------------------------------------------------- rotation

SMALL = 2 * audit.MAX_LINE_BYTES  # the smallest max_bytes: a rotation every ~20 records below


def big_record(i: int) -> dict[str, object]:
    return {"op": "clock_now", "i": i, "pad": "x" * 3000}


def segments(path: Path, keep: int) -> list[Path]:
    """The log's files, oldest first."""
    older = [path.with_name(f"{path.name}.{k}") for k in range(keep, 0, -1)]
    return [p for p in older if p.exists()] + [path]


def test_rotation_bounds_the_file_and_keeps_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "busy.jsonl"
    with AuditLog(path, max_bytes=SMALL, keep=2) as log:
        for i in range(100):
            log.append(big_record(i), durable=False)
    files = segments(path, 2)
    assert len(files) == 3  # the name, .1 and .2; older ones were deleted
    assert not path.with_name("busy.jsonl.3").exists()
    assert all(p.stat().st_size <= SMALL for p in files)
    seqs: list[int] = []
    for p in files:
        result = verify(p)
        assert result.ok, (p, result)
        lines = p.read_bytes().splitlines()
        seqs += [json.loads(x)["seq"] for x in lines]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one chain, no gap
    first = json.loads(path.read_bytes().splitlines()[0])
    assert first["op"] == audit.ROTATED_OP
    last_of_previous = path.with_name("busy.jsonl.1").read_bytes().splitlines()[-1]
    assert first["prev"] == hashlib.sha256(last_of_previous).hexdigest()
    assert "continuing busy.jsonl.1" in verify(path).reason


def test_two_writers_follow_each_others_rotations(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    with (
        AuditLog(path, max_bytes=SMALL, keep=8) as a,
        AuditLog(path, max_bytes=SMALL, keep=8) as b,
    ):
        for i in range(120):
            (a if i % 3 else b).append(big_record(i), durable=False)
    files = segments(path, 8)
    assert len(files) >= 4
    seqs = [json.loads(x)["seq"] for p in files for x in p.read_bytes().splitlines()]
    assert seqs == list(range(1, len(seqs) + 1))
    mine = [json.loads(x).get("i") for p in files for x in p.read_bytes().splitlines()]
    assert [i for i in mine if i is not None] == list(range(120))  # none lost, in order
    assert all(verify(p).ok for p in files)


def test_a_forged_rotation_record_does_not_hide_a_removed_beginning(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 10)
    forged = seal({"op": audit.ROTATED_OP, "previous": "a.jsonl.1"}, 4, "f" * 64)
    put(path, [forged + b"\n", *lines[4:]])  # the first four records removed
    result = verify(path)
    assert not result.ok
    assert result.line == 2
    assert "prev" in result.reason


def test_a_rotated_file_that_does_not_end_where_the_next_begins_is_caught(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.jsonl"
    with AuditLog(path, max_bytes=SMALL, keep=2) as log:
        for i in range(70):
            log.append(big_record(i), durable=False)
    older = path.with_name("r.jsonl.1")
    lines = older.read_bytes().splitlines(keepends=True)
    put(older, lines[:-1])  # its last record removed
    result = verify(path)
    assert not result.ok
    assert "r.jsonl.1" in result.reason
    # and between two rotated files alike: .1 continues .2
    oldest = path.with_name("r.jsonl.2")
    assert verify(older).ok  # (its own chain still holds: only its end is gone)
    put(oldest, oldest.read_bytes().splitlines(keepends=True)[:-1])
    result = verify(older)
    assert not result.ok
    assert "r.jsonl.2" in result.reason
