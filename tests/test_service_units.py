"""Service parts without a running service (no root needed): the control protocol and its
client, peer checks, sd_notify, the fork server, cgroup helpers, the plugin host's command
source."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from helpers import make_plan

from forgeone_isolate import control, sdnotify, service
from forgeone_isolate import protocol as p
from forgeone_isolate.errors import EXIT_BAD_INPUT, EXIT_PLUGIN_FAILED
from forgeone_isolate.forkserver import ForkServer, ForkServerError
from forgeone_isolate.pluginhost import ChannelCommands, HostChannel

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- protocol


def test_parse_request_accepts_each_op() -> None:
    assert control.parse_request(b'{"op": "ping"}\n') == control.Request("ping", {})
    req = control.parse_request(b'{"op": "call", "name": "hello", "input": "abc"}')
    assert (req.op, req.name, req.input_bytes()) == ("call", "hello", b"abc")
    req = control.parse_request(b'{"op": "call", "name": "hello", "input_b64": "AAE="}')
    assert req.input_bytes() == b"\x00\x01"
    assert control.parse_request(b'{"op": "call", "name": "hello"}').input_bytes() == b""
    req = control.parse_request(
        b'{"op": "install", "package_b64": "AAAA", "allow_downgrade": true, "max_restarts": 2}'
    )
    assert req.fields == {"package_b64": "AAAA", "allow_downgrade": True, "max_restarts": 2}
    assert control.parse_request(b'{"op": "logs", "name": "a.b-c_d", "n": 5}').fields["n"] == 5


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"nope", "not valid JSON"),
        (b"\xff", "not UTF-8"),
        (b"[1]", "must be a JSON object"),
        (b'{"op": "dance"}', "unknown op"),
        (b'{"name": "x"}', "unknown op"),
        (b'{"op": "start"}', "name is required"),
        (b'{"op": "start", "name": "x", "force": true}', "unknown field"),
        (b'{"op": "start", "name": 1}', "name must be str"),
        (b'{"op": "start", "name": "Bad Name"}', "not a plugin name"),
        (b'{"op": "logs", "name": "x", "n": true}', "n must be an integer"),
        (b'{"op": "logs", "name": "x", "n": 0}', "n must be in"),
        (b'{"op": "install"}', "exactly one of package_b64 and path"),
        (b'{"op": "install", "path": "/a", "package_b64": ""}', "exactly one"),
        (b'{"op": "call", "name": "x", "input": "a", "input_b64": "YQ=="}', "not both"),
        (b"[" * 50_000 + b"]" * 50_000, "one flat JSON object"),
        # which duplicate counts is a parser's choice: json.loads took the last ('evil')
        (b'{"op":"start","name":"good","name":"evil"}', "gives the field 'name' twice"),
        (b'{"op":"stop","op":"start","name":"a"}', "gives the field 'op' twice"),
        (b'{"op":"ping","x":[{},{}]}', "one flat JSON object: a field is an array or object"),
        (b'{"op":"ping","x":{"y":1}}', "one flat JSON object"),
        (b'{"op":"ping",' + b"".join(b'"a%d":"",' % i for i in range(8)) + b'"b":1}', "16 strings"),
    ],
)
def test_parse_request_refusals(line: bytes, problem: str) -> None:
    with pytest.raises(control.RequestError, match=problem) as info:
        control.parse_request(line)
    assert info.value.exit_status == EXIT_BAD_INPUT


def test_a_huge_request_is_refused_before_json_builds_it() -> None:
    # 44 MB of "{}," made json.loads build 15 million dicts: 1.1 GB in the service
    count = (control.MAX_REQUEST_BYTES - 64) // 3
    line = b'{"op":"ping","x":[' + b"{}," * (count - 1) + b"{}]}"
    assert len(line) <= control.MAX_REQUEST_BYTES
    with pytest.raises(control.RequestError, match="one flat JSON object") as info:
        control.parse_request(line)
    assert info.value.exit_status == EXIT_BAD_INPUT


def test_brackets_and_quotes_inside_strings_do_not_count() -> None:
    text = '[{"x": [1]}] \\' + '"' * 40 + "{" * 40
    req = control.parse_request(json.dumps({"op": "call", "name": "a", "input": text}).encode())
    assert req.input_bytes() == text.encode()


def test_call_input_bounds() -> None:
    big = "x" * (control.MAX_CALL_INPUT + 1)
    with pytest.raises(control.RequestError, match="more than"):
        control.parse_request(
            json.dumps({"op": "call", "name": "a", "input": big}).encode()
        ).input_bytes()
    with pytest.raises(control.RequestError, match="not valid base64"):
        control.b64decode("@@@", "x", 10)
    with pytest.raises(control.RequestError, match="more than 2 bytes"):
        control.b64decode(base64.b64encode(b"abc").decode(), "x", 2)


def test_responses_are_one_line() -> None:
    assert control.ok({"a": 1}) == b'{"ok":true,"result":{"a":1}}\n'
    line = control.error("two\nlines\there", EXIT_BAD_INPUT)
    assert line.count(b"\n") == 1
    assert json.loads(line) == {"ok": False, "error": "two lines here", "status": 2}


def serve_once(replies: list[bytes]) -> tuple[Path, threading.Thread, list[bytes]]:
    """A one-connection fake service answering each request line with the next reply."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / "s.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    seen: list[bytes] = []

    def run() -> None:
        conn, _ = srv.accept()
        with conn, conn.makefile("rb") as r:
            for reply in replies:
                seen.append(r.readline())
                conn.sendall(reply)
        srv.close()

    t = threading.Thread(target=run)
    t.start()
    return path, t, seen


def test_client_maps_errors_to_exit_status() -> None:
    path, t, seen = serve_once(
        [
            control.ok({"pid": 1}),
            control.error("bad thing", 2),
            control.error("broke", 1),
            b"junk\n",
        ]
    )
    with control.Client(path) as c:
        assert c.request("ping") == {"pid": 1}
        with pytest.raises(control.ServiceError, match="bad thing") as info:
            c.request("start", name="x")
        assert info.value.exit_status == EXIT_BAD_INPUT
        with pytest.raises(control.ServiceError) as info:
            c.request("stop", name="x")
        assert info.value.exit_status == EXIT_PLUGIN_FAILED
        with pytest.raises(control.ServiceUnavailable, match="not JSON"):
            c.request("list")
    t.join()
    assert json.loads(seen[1]) == {"op": "start", "name": "x"}


def test_client_without_service(tmp_path: Path) -> None:
    with pytest.raises(control.ServiceUnavailable, match="no service at"):
        control.Client(tmp_path / "none.sock")
    (tmp_path / "file").write_text("")
    with pytest.raises(control.ServiceUnavailable, match="cannot connect"):
        control.Client(tmp_path / "file")


def test_default_socket_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(control.SOCKET_ENV, raising=False)
    assert control.default_socket() == Path("/run/forgeone/control.sock")
    monkeypatch.setenv(control.SOCKET_ENV, "/tmp/x.sock")
    assert control.default_socket() == Path("/tmp/x.sock")


# ----------------------------------------------------------------------------- peers


def test_authorize_uses_peer_credentials() -> None:
    a, b = socket.socketpair()
    with a, b:
        peer, refusal = service.authorize(a, None)
        assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
        if os.getuid() == 0:
            assert refusal is None
        else:
            assert refusal is not None
            assert f"uid {os.getuid()}" in refusal
            assert service.authorize(a, os.getgid())[1] is None


# ----------------------------------------------------------------------------- sd_notify


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_datagram(tmp_path: Path, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        if abstract:
            name = f"forgeone-test-{os.getpid()}"
            listener.bind(b"\0" + name.encode())
            env = {"NOTIFY_SOCKET": "@" + name}
        else:
            path = tmp_path / "notify"
            listener.bind(str(path))
            env = {"NOTIFY_SOCKET": str(path)}
        listener.settimeout(5)
        assert sdnotify.notify("READY=1\nSTATUS=up", env)
        assert listener.recv(4096) == b"READY=1\nSTATUS=up"


def test_sd_notify_outside_systemd() -> None:
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative"}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/sock"}) is False


# ----------------------------------------------------------------------------- fork server

FORK_SERVER_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, socket, sys, time
    from forgeone_isolate.forkserver import ForkServer

    def host_main(spec, chan):
        chan.send(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "spec": spec}).encode())
        while True:
            msg = chan.recv(65536)
            if not msg:
                os._exit(0)
            if msg == b"exit7":
                os._exit(7)
            chan.send(msg.upper())

    fs = ForkServer.start(host_main, preload=None)
    out = {"fs_pid": fs.pid, "ping": fs.ping()}
    a = fs.spawn({"name": "alpha"})
    hello = json.loads(a.channel.recv(65536))
    out["hello"] = hello
    a.channel.send(b"shout")
    out["echo"] = a.channel.recv(65536).decode()
    with open(f"/proc/{hello['pid']}/comm") as f:
        out["comm"] = f.read().strip()
    a.channel.send(b"exit7")
    b = fs.spawn({"name": "beta"})
    json.loads(b.channel.recv(65536))
    out["signalled"] = b.signal(signal.SIGKILL)
    exits = {}
    deadline = time.monotonic() + 10
    while len(exits) < 2 and time.monotonic() < deadline:
        for ev in fs.read_events() or []:
            exits[ev["pid"]] = ev["status"]
        time.sleep(0.01)
    out["exits"] = {str(k): v for k, v in exits.items()}
    out["a_pid"], out["b_pid"] = a.pid, b.pid
    c = fs.spawn({"name": "gamma"})
    out["c_pid"] = c.pid
    json.loads(c.channel.recv(65536))
    fs.close()
    out["c_gone_after_close"] = c.channel.recv(65536) == b""
    print(json.dumps(out))
    """
)


def test_fork_server_spawns_reports_and_dies_with_its_children() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SERVER_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ping"]["ok"] is True
    assert out["hello"]["ppid"] == out["fs_pid"]  # forked by the fork server, not the caller
    assert out["hello"]["spec"] == {"name": "alpha"}
    assert out["echo"] == "SHOUT"
    assert out["comm"] == "fo-alpha"
    assert out["signalled"] is True
    status_a = out["exits"][str(out["a_pid"])]
    status_b = out["exits"][str(out["b_pid"])]
    assert os.WIFEXITED(status_a)
    assert os.WEXITSTATUS(status_a) == 7
    assert os.WIFSIGNALED(status_b)
    assert os.WTERMSIG(status_b) == 9
    assert out["c_gone_after_close"] is True


def test_fork_server_refuses_to_start_with_threads() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(ForkServerError, match="before any thread exists"):
            ForkServer.start(lambda spec, chan: os._exit(0), preload=None)  # type: ignore[arg-type,return-value]
    finally:
        stop.set()
        t.join()


# ----------------------------------------------------------------------------- plugin host


def test_channel_commands_feed_the_guest_in_order() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        source = ChannelCommands(HostChannel(theirs))
        assert source.fileno() == theirs.fileno()
        assert source.next_command() is None  # nothing yet, but "ready" was announced
        assert json.loads(ours.recv(4096)) == {"ev": "ready"}
        ours.send(
            json.dumps({"cmd": "call", "id": 3, "input": base64.b64encode(b"hi").decode()}).encode()
        )
        ours.send(b"garbage is ignored")
        ours.send(json.dumps({"cmd": "pause", "id": 4}).encode())
        assert source.next_command() == (p.Command.CALL, b"hi")
        source.on_result(p.Command.CALL, 0, p.DoneKind.OK, b"HI")
        result = json.loads(ours.recv(4096))
        assert result == {
            "ev": "result",
            "id": 3,
            "cmd": "call",
            "code": 0,
            "kind": "OK",
            "output": base64.b64encode(b"HI").decode(),
        }
        assert source.next_command() == (p.Command.PAUSE, b"")
        source.on_paused(True)
        assert json.loads(ours.recv(4096)) == {"ev": "paused", "paused": True}
        assert source.next_command() is None
        ours.shutdown(socket.SHUT_RDWR)
        assert source.next_command() == (p.Command.STOP, b"")  # the service went away


# ----------------------------------------------------------------------------- cgroup helpers


def test_cgroup_usage_reads_v1_and_v2_files(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "cpuacct.usage").write_text("12345\n")
    (v1 / "pids.current").write_text("2\n")
    (v1 / "freezer.state").write_text("FROZEN\n")
    assert service.cgroup_usage([str(v1)]) == {
        "cpu_usage_ns": 12345,
        "pids": 2,
        "freezer": "FROZEN",
    }
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.stat").write_text("usage_usec 7\nuser_usec 5\n")
    (v2 / "memory.current").write_text("4096\n")
    (v2 / "cgroup.freeze").write_text("0\n")
    assert service.cgroup_usage([str(v2)]) == {
        "cpu_usage_ns": 7000,
        "memory_bytes": 4096,
        "freezer": "THAWED",
    }
    assert service.cgroup_usage([str(tmp_path / "absent")]) == {}


def test_remove_cgroup_dirs_removes_leaves_and_an_empty_parent(tmp_path: Path) -> None:
    parent = tmp_path / "forgeone"
    leaves = [parent / "a-1", parent / "b-2"]
    for leaf in leaves:
        leaf.mkdir(parents=True)
    assert service.remove_cgroup_dirs([str(leaves[0])]) == []
    assert not leaves[0].exists()
    assert parent.exists()  # b-2 still lives there
    assert service.remove_cgroup_dirs([str(leaves[1]), str(tmp_path / "gone")]) == []
    assert not parent.exists()


def test_tail_lines(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"".join(f"line {i}\n".encode() for i in range(5000)))
    assert service._tail_lines(path, 3, 100) == [b"line 4997", b"line 4998", b"line 4999"]
    assert len(service._tail_lines(path, 5000, 100)) == 5000
    assert service._tail_lines(path, 1, 100, chunk=7) == [b"line 4999"]
    path.write_bytes(b"first\nlast without newline")
    assert service._tail_lines(path, 5, 100) == [b"first", b"last without newline"]


def test_tail_lines_of_a_hostile_log_read_a_bounded_amount(tmp_path: Path) -> None:
    """A log whose end is 64 MiB of zeros (no newline; a crash can leave that) or one huge
    line: the tail reads about n lines' worth of the longest record, not the file (this was
    quadratic: 21 s at 64 MiB), and cuts what it returns; a symlink is not followed."""
    path = tmp_path / "log"
    with open(path, "wb") as f:
        f.write(b'{"ok": 1}\n')
        f.truncate(64 << 20)  # sparse zeros

    def bytes_read() -> int:  # by this process's read(2) calls
        with open("/proc/self/io", encoding="ascii") as f:
            return int(next(ln for ln in f if ln.startswith("rchar:")).split()[1])

    before = bytes_read()
    lines = service._tail_lines(path, 3, 1000, chunk=4096)
    spent = bytes_read() - before
    assert spent <= 3 * 1001 + 2 * 4096 + 4096, spent  # (+ this counter's own read)
    assert len(lines) == 1
    assert len(lines[0]) == 1001  # cut: longer than any record, reported as unparsable
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(OSError):
        service._tail_lines(link, 3, 1000)


# ----------------------------------------------------------------------------- artifacts

ARTIFACT_WAT = (
    '(module (memory (export "memory") 1) (func (export "init") (result i32) (i32.const 0)))'
)


def test_artifacts_compile_once_and_refuse_what_they_did_not_make(tmp_path: Path) -> None:
    import hashlib

    from forgeone_isolate import artifacts, wasm

    module = wasm.wat_to_wasm(ARTIFACT_WAT)
    digest = hashlib.sha256(module).hexdigest()
    store = artifacts.ArtifactStore(tmp_path / "artifacts")
    assert (tmp_path / "artifacts" / "key").stat().st_mode & 0o777 == 0o600
    path = store.ensure(module, ("init",))
    assert path == store.path_for(digest)
    assert store.known_good(digest)
    found = artifacts.load_artifact(path, store.key, digest)
    assert found is not None
    assert found.lifecycle == ("init",)
    assert found.serialized
    mtime = path.stat().st_mtime_ns
    assert store.ensure(module, ("init",)) == path  # not compiled again
    assert path.stat().st_mtime_ns == mtime
    # Another key, another module's digest, a flipped byte: all refused.
    assert artifacts.load_artifact(path, bytes(32), digest) is None
    assert artifacts.load_artifact(path, store.key, "0" * 64) is None
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert artifacts.load_artifact(path, store.key, digest) is None
    # The same key reopened (a service restart) repairs the file.
    again = artifacts.ArtifactStore(tmp_path / "artifacts")
    assert again.key == store.key
    again.ensure(module, ("init",))
    assert artifacts.load_artifact(path, store.key, digest) is not None
    # (A plugin host with a bad artifact compiles by itself instead: see the _module test.)
    again.remove_unused(set())
    assert not path.exists()


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000 + b"\nxx",  # RecursionError in json.loads
        '{"hmac":"\u00e9"}\nxx'.encode(),  # compare_digest: TypeError on non-ASCII text
        b'{"hmac":"' + b"\xc3\xa9" * 32 + b'"}\nxx',
        b'{"hmac":"' + b"A" * 64 + b'"}\nxx',  # hexdigest() is lower case
        b'{"hmac":1}\nxx',
        b'{"hmac":"00","v":' + b"9" * 5000 + b"}\nxx",
        b"\xff\nxx",
    ],
)
def test_artifact_decode_returns_none_for_what_it_cannot_use(data: bytes) -> None:
    from forgeone_isolate import artifacts

    assert artifacts.decode(bytes(32), data, "0" * 64) is None


def test_warm_up_runs_without_side_effects(tmp_path: Path) -> None:
    from forgeone_isolate import seccomp_filter
    from forgeone_isolate.plan import NOFILE, SECCOMP_ALLOW
    from forgeone_isolate.pluginhost import warm_up

    before = set(Path(tempfile_dir()).glob("forgeone-warm-*"))
    seccomp_filter.filter_for.cache_clear()
    warm_up()
    assert set(Path(tempfile_dir()).glob("forgeone-warm-*")) == before
    # every plan's one filter is built (hosts forked after this only look it up)
    hits = seccomp_filter.filter_for.cache_info().hits
    seccomp_filter.filter_for(SECCOMP_ALLOW, make_plan().seccomp_min_fd, NOFILE - 1)
    assert seccomp_filter.filter_for.cache_info().hits == hits + 1


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def test_host_takes_the_services_module_only_as_its_hmacd_artifact(tmp_path: Path) -> None:
    """pluginhost._module: the HMAC'd artifact of the module digest the service attested
    -> used as is; a wrong digest, no artifact or a bad key -> the host reads and verifies
    the stored package itself, which must hold that very module (a tampered package, one
    of another name or holding another module is refused)."""
    import dataclasses
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from forgeone_isolate import artifacts, package, signing, wasm
    from forgeone_isolate.errors import VerificationError
    from forgeone_isolate.pluginhost import _module

    src = tmp_path / "src"
    src.mkdir()
    (src / "plugin.wasm").write_bytes(
        wasm.wat_to_wasm(
            '(module (memory (export "memory") 1) (func (export "init") (result i32) (i32.const 0)))'
        )
    )
    (src / "manifest.json").write_text(
        json.dumps({"name": "hv", "version": "1.0.0", "abi": 1, "entry": "plugin.wasm"})
    )
    key = Ed25519PrivateKey.generate()
    data = package.build_package(src, key)
    stored = tmp_path / "p.forgepkg"
    stored.write_bytes(data)
    fp = signing.fingerprint(key.public_key())
    pkg = package.verify_bytes(data, signing.TrustStore(frozenset({fp}), frozenset(), "t"))
    store = artifacts.ArtifactStore(tmp_path / "artifacts")
    path = store.ensure(pkg.wasm, ("init",))
    digest = hashlib.sha256(pkg.wasm).hexdigest()
    spec: dict[str, object] = {
        "wasm_sha256": digest,
        "artifact": str(path),
        "artifact_key": store.key.hex(),
        "package": str(stored),
        "sha256": pkg.digest,
        "trust": "t",
        "trusted": [fp],
        "revoked": [],
    }
    plan = make_plan(name="hv")
    from_artifact = artifacts.load_artifact(path, store.key, digest)
    assert from_artifact is not None
    assert _module(spec, plan) == from_artifact.serialized
    # No usable artifact: the host verifies the stored package; tampered, it is refused.
    stored.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    for bent in ({"artifact": ""}, {"artifact_key": "00" * 32}, {"wasm_sha256": "0" * 64}):
        with pytest.raises(VerificationError, match="does not hash to its registry digest"):
            _module({**spec, **bent}, plan)
    stored.write_bytes(data)
    assert _module({**spec, "artifact": ""}, plan) == wasm.compile_serialized(pkg.wasm)
    with pytest.raises(VerificationError, match="holds another module"):
        _module({**spec, "wasm_sha256": "0" * 64}, plan)
    with pytest.raises(VerificationError, match="names 'hv', not 'other'"):
        _module({**spec, "artifact": ""}, dataclasses.replace(plan, plugin="other"))
    with pytest.raises(VerificationError, match="not in the trust store"):
        _module({**spec, "artifact": "", "trusted": ["ab" * 32]}, plan)
