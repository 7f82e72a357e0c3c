"""The broker end to end: real guests, launched isolated, calling the ABI through the broker.

Most tests build a package with ``tests/guestgen.py``, load a policy file with
``policy.Policy.load`` and launch in-process with ``launch.run_plan`` (so the test can hand
the broker a fake resolver and read its audit file and kv store); the reference test goes
through the command line (``launch --json --policy``, then ``audit verify``). Fake children
(custom payloads instead of wasmtime) write raw frames into the broker socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import time_scale
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from guestgen import PRELUDE, Guest, results, write_plugin  # tests/ is on sys.path
from helpers import make_plan

from forgeone_isolate import cgroup, child, fds, netns, package, policy, signing, wasm
from forgeone_isolate import protocol as p
from forgeone_isolate.audit import AuditLog, verify
from forgeone_isolate.broker import MAX_RATE_DENIALS, MAX_VIOLATIONS
from forgeone_isolate.errors import SetupError
from forgeone_isolate.kvstore import KEY_COST, KvStore
from forgeone_isolate.launch import MAX_KEPT_LOGS, LaunchResult, run_plan
from forgeone_isolate.plan import build_plan
from forgeone_isolate.uidpool import UidLease, default_lease_dir, lease_uid

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.requires_userns,
    pytest.mark.requires_seccomp,
    pytest.mark.requires_cgroup,
]

REPO = Path(__file__).resolve().parent.parent
INSIDE = b"inside the root\n"
SECRET = b"SECRET outside the root\n"
FAST = {"rate_per_s": 100000, "burst": 1000000}
IP_FREEBIND = 15  # <linux/in.h>: bind an address that is not (yet) configured
#: every plugin these tests launch is named with this prefix, so the cgroup leak check can
#: tell our directories from those of other suites running on the same host
PREFIX = f"brk{secrets.token_hex(3)}-"


@pytest.fixture(autouse=True)
def our_cgroups_removed() -> Iterator[None]:
    """Fail the test if a cgroup directory of a plugin it launched outlives it."""
    yield
    deadline = time.monotonic() + 2.0
    while True:
        host = cgroup.detect()
        left = [d for d in host.existing_plugin_dirs() if os.path.basename(d).startswith(PREFIX)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"cgroup directories left behind: {left}"


# --------------------------------------------------------------------------- machinery


@dataclass(frozen=True)
class Key:
    private: Ed25519PrivateKey
    public_path: Path
    fingerprint: str

    def trust(self) -> signing.TrustStore:
        return signing.TrustStore(frozenset({self.fingerprint}), frozenset(), "test")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Key:
    pair = signing.keygen(tmp_path_factory.mktemp("keys"))
    return Key(signing.load_private_key(pair.private_path), pair.public_path, pair.fingerprint)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_policy(path: Path, signer: str, grants: Mapping[str, Mapping[str, Any]]) -> Path:
    """A policy file with one ``[[grant]]`` per plugin name."""
    lines: list[str] = []
    for plugin, grant in grants.items():
        lines += ["[[grant]]", f"signer = {_toml(signer)}", f"plugin = {_toml(plugin)}"]
        lines += [f"{k} = {_toml(v)}" for k, v in grant.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o644)
    return path


@dataclass
class Run:
    """One finished launch."""

    result: LaunchResult
    audit_path: Path
    wall_s: float

    @property
    def results(self) -> dict[str, int]:
        return results([{"level": "info", "text": t} for _, t in self.result.logs])

    @property
    def texts(self) -> list[str]:
        return [t for _, t in self.result.logs]

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.audit_path.read_text().splitlines()]

    def denials(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["decision"] == "deny"]


@dataclass
class Launcher:
    """Packs, attests, plans and launches guests for one test (one state directory)."""

    key: Key
    work: Path
    state: Path
    _compiled: dict[bytes, bytes] = field(default_factory=dict)
    _n: int = 0

    def run(
        self,
        name: str,
        wat: str,
        permissions: Mapping[str, object] | None = None,
        grant: Mapping[str, Any] | None = None,
        *,
        resolver: Callable[[str, int], Sequence[str]] | None = None,
        payload: Callable[[], Callable[[], int]] | None = None,
        lease: UidLease | None = None,
        limits: dict[str, int] | None = None,
    ) -> Run:
        self._n += 1
        name = PREFIX + name
        src = write_plugin(
            self.work / f"src-{name}-{self._n}", name, wat, dict(permissions or {}), limits
        )
        pkg = package.verify_bytes(package.build_package(src, self.key.private), self.key.trust())
        pol_path = self.work / f"policy-{self._n}.toml"
        write_policy(pol_path, self.key.fingerprint, {name: grant} if grant is not None else {})
        pol = policy.Policy.load(pol_path)
        eff = pol.effective_for(pkg.signer, name, pkg.manifest.permissions)
        caps = policy.cap_limits(pkg.manifest.limits, eff)
        info = wasm.check_module(pkg.wasm, caps.memory_mb)
        if pkg.wasm not in self._compiled:
            self._compiled[pkg.wasm] = wasm.compile_serialized(pkg.wasm)
        serialized = self._compiled[pkg.wasm]
        audit_path = self.state / "audit" / f"{name}.jsonl"
        kv = KvStore(self.state / "kv.sqlite3") if eff.kv else None
        started = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                held = lease or stack.enter_context(lease_uid(default_lease_dir()))
                audit = stack.enter_context(AuditLog(audit_path))
                plan = build_plan(
                    pkg.manifest, pkg.signer, held.uid, info.lifecycle, eff, caps, held.index
                )
                result = run_plan(
                    plan,
                    payload or child.make_guest_payload(serialized, plan),
                    cgroup.detect(),
                    audit=audit,
                    kv=kv,
                    resolver=resolver,
                )
        finally:
            if kv is not None:
                kv.close()
        return Run(result, audit_path, time.monotonic() - started)


@pytest.fixture
def launcher(key: Key, tmp_path: Path) -> Launcher:
    return Launcher(key, tmp_path / "work", tmp_path / "state")


@dataclass(frozen=True)
class Tree:
    root: Path  # granted for reading
    out: Path  # granted for writing
    outside: Path

    @property
    def secret(self) -> Path:
        return self.outside / "secret.txt"


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    base = tmp_path / "srv"
    t = Tree(base / "data", base / "out", base / "outside")
    for d in (t.root / "sub", t.out, t.outside / "sub"):
        d.mkdir(parents=True)
    (t.root / "a.txt").write_bytes(INSIDE)
    (t.root / "sub" / "f.txt").write_bytes(INSIDE)
    t.secret.write_bytes(SECRET)
    (t.outside / "sub" / "f.txt").write_bytes(SECRET)
    (t.root / "link").symlink_to(t.secret)
    os.mkfifo(t.root / "fifo")
    (t.out / "evil").symlink_to(t.outside / "planted.txt")
    return t


def _hex(raw: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in raw)


def module(body: str, data: Mapping[int, bytes] | None = None, locals_: str = "") -> str:
    """A guest with guestgen's imports and ``$report``, and ``start`` running ``body``."""
    segs = "".join(
        f'  (data (i32.const {off}) "{_hex(raw)}")\n' for off, raw in (data or {}).items()
    )
    return f'(module{PRELUDE}{segs}  (func (export "start") (result i32) {locals_}\n{body}\n  ))\n'


LABELS = 70000  # where module() guests keep their report labels


def report(label: str, index: int, value: str) -> tuple[str, dict[int, bytes]]:
    """A ``$report`` call of ``value`` under ``label`` (a data segment at LABELS+64*index)."""
    off = LABELS + 64 * index
    return (
        f"(call $report (i32.const {off}) (i32.const {len(label)}) {value})",
        {off: label.encode()},
    )


def cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forgeone_isolate", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


# --------------------------------------------------------------------------- the reference run


def test_reference_guest_through_the_cli_and_audit_verify(
    key: Key, tree: Tree, tmp_path: Path
) -> None:
    root = tree.root
    g = Guest()
    g.fs_open("open", f"{root}/a.txt", 0, 0)
    g.fd_read_log("read", 0)
    g.fd_write("write_ro", 0, b"x")
    g.fd_close("close", 0)
    g.fd_close("close_again", 0)
    g.fs_open("outside", str(tree.secret), 0, 1)
    g.fs_open("dotdot", f"{root}/../outside/secret.txt", 0, 1)
    g.fs_open("symlink", f"{root}/link", 0, 1)
    g.fs_open("procroot", f"/proc/self/root{tree.secret}", 0, 1)
    g.fs_open("procroot_in", f"/proc/self/root{root}/a.txt", 0, 1)
    g.fs_open("trailing", f"{root}/a.txt/", 0, 1)
    g.fs_open("dir", f"{root}/sub", 0, 1)
    g.fs_open("fifo", f"{root}/fifo", 0, 1)
    g.fs_open("create_on_ro", f"{root}/a.txt", 2, 1)
    g.fs_open("write_on_ro", f"{root}/a.txt", 1, 1)
    g.fs_open("flags7", f"{root}/a.txt", 7, 1)
    g.fs_open("flags_neg", f"{root}/a.txt", -1, 1)
    g.fs_open("flags_high", f"{root}/a.txt", 0x40000000, 1)
    g.call("efault", "(call $fs_open (i32.const -256) (i32.const 100) (i32.const 0))")
    g.kv_set("kv_set", b"k", b"v1")
    g.kv_get_log("kv_get", b"k")
    g.config_get_log("cfg", b"greeting")
    g.config_get_log("cfg_other", b"password")
    g.net_connect("net", "127.0.0.1", 9, 2)
    g.call("rand", "(call $random_fill (i32.const 2048) (i32.const 16))")
    g.call("clock", "(i64.gt_s (call $clock_now) (i64.const 1700000000000000000))")
    g.output("output", b"result!")
    src = write_plugin(
        tmp_path / "src",
        PREFIX + "reference",
        g.wat(),
        {
            "fs.read": [str(root)],
            "kv": True,
            "config": ["greeting", "password"],
        },
    )
    pkg = tmp_path / "reference.forgepkg"
    pkg.write_bytes(package.build_package(src, key.private))
    pol = write_policy(
        tmp_path / "policy.toml",
        key.fingerprint,
        {
            PREFIX + "reference": {
                "fs_read": [str(root)],
                "kv": True,
                "config": {"greeting": "hello operator"},
            }
        },
    )
    state = tmp_path / "state"
    started = time.monotonic()
    done = cli(
        "launch",
        str(pkg),
        "--trust",
        str(key.public_path),
        "--state-dir",
        str(state),
        "--policy",
        str(pol),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    report_ = json.loads(done.stdout.strip().splitlines()[-1])
    assert report_["status"] == "ok", report_
    got = results(report_["logs"])
    texts = [entry["text"] for entry in report_["logs"]]
    assert got == {
        "open": 1,
        "read": len(INSIDE),
        "write_ro": -9,
        "close": 0,
        "close_again": -9,
        "outside": -1,
        "dotdot": -1,
        "symlink": -40,
        "procroot": -1,
        "procroot_in": -1,
        "trailing": -1,
        "dir": -21,
        "fifo": -22,
        "create_on_ro": -1,
        "write_on_ro": -1,
        "flags7": -22,
        "flags_neg": -22,
        "flags_high": -22,
        "efault": -14,
        "kv_set": 0,
        "kv_get": 2,
        "cfg": len("hello operator"),
        "cfg_other": -1,
        "net": -1,
        "rand": 16,
        "clock": 1,
        "output": 7,
    }
    assert "inside the root\\x0a" in texts  # the broker escapes control characters
    assert "v1" in texts
    assert "hello operator" in texts
    assert SECRET.decode().strip() not in "\n".join(texts)
    assert (tree.root / "a.txt").read_bytes() == INSIDE
    broker = report_["broker"]
    assert broker["violations"] == 0
    assert broker["by_op"]["fs_open"] == 14  # the EFAULT call never reached the broker

    audit_file = state / "audit" / f"{PREFIX}reference.jsonl"
    records = [json.loads(x) for x in audit_file.read_text().splitlines()]
    denials = [r for r in records if r["decision"] == "deny"]
    assert len(denials) == broker["denied"] == 15
    assert len(records) == broker["allowed"] + broker["denied"]
    for r in denials:
        assert r["reason"]
        assert r["identity"]["signer"] == key.fingerprint
        assert r["identity"]["instance"] == report_["plugin"]["instance"]
    text = audit_file.read_text()
    for secret in ("hello operator", SECRET.decode().strip(), INSIDE.decode().strip(), "v1"):
        assert secret not in text

    ok = cli("audit", "verify", str(audit_file))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK")
    lines = audit_file.read_bytes().splitlines(keepends=True)
    deny_at = next(i for i, line in enumerate(lines) if b'"decision":"deny"' in line)
    tampered = {
        "denial-hidden": [
            *lines[:deny_at],
            lines[deny_at].replace(b'"decision":"deny"', b'"decision":"allow"'),
            *lines[deny_at + 1 :],
        ],
        "deleted": [*lines[:deny_at], *lines[deny_at + 1 :]],
        "reordered": [lines[1], lines[0], *lines[2:]],
        "last-edited": [*lines[:-1], lines[-1].replace(b'"op":"', b'"op":"x')],
    }
    for name, body in tampered.items():
        assert body != lines, name
        copy = tmp_path / f"{name}.jsonl"
        copy.write_bytes(b"".join(body))
        bad = cli("audit", "verify", str(copy))
        assert bad.returncode == 1, (name, bad.stdout)
        assert bad.stdout.startswith("TAMPERED"), (name, bad.stdout)


def test_output_written_during_start_reaches_the_report(launcher: Launcher) -> None:
    g = Guest()
    g.output("output", b"result!")
    run = launcher.run("outputter", g.wat(), {}, {})
    assert run.results == {"output": 7}
    assert run.result.output == b"result!"


# --------------------------------------------------------------------------- fs write grant


def test_write_grant_creates_and_writes_under_the_root(launcher: Launcher, tree: Tree) -> None:
    g = Guest()
    g.fs_open("create", f"{tree.out}/made.txt", 2, 0)
    g.fd_write("write", 0, b"written in the sandbox\n")
    g.fd_read_log("read_wo", 0)
    g.fd_close("close", 0)
    g.fs_open("reopen", f"{tree.out}/made.txt", 1, 1)
    g.fd_write("overwrite", 1, b"W")
    g.fd_close("close1", 1)
    g.fs_open("missing", f"{tree.out}/absent.txt", 1, 2)
    g.fs_open("ro_create", f"{tree.root}/new.txt", 2, 2)
    g.fs_open("ro_write", f"{tree.root}/a.txt", 1, 2)
    g.fs_open("read_on_write_root", f"{tree.out}/made.txt", 0, 2)
    g.fs_open("link_out", f"{tree.out}/evil", 2, 2)
    g.fs_open("fifo_w", f"{tree.out}/fifo", 1, 2)
    os.mkfifo(tree.out / "fifo")
    run = launcher.run(
        "writer",
        g.wat(),
        {"fs.read": [str(tree.root)], "fs.write": [str(tree.out)]},
        {"fs_read": [str(tree.root)], "fs_write": [str(tree.out)]},
    )
    assert run.result.status == "ok", run.result.reason
    assert run.results == {
        "create": 1,
        "write": 23,
        "read_wo": -9,
        "close": 0,
        "reopen": 2,
        "overwrite": 1,
        "close1": 0,
        "missing": -2,
        "ro_create": -1,
        "ro_write": -1,
        "read_on_write_root": -1,
        "link_out": -40,
        "fifo_w": -6,
    }
    made = tree.out / "made.txt"
    assert made.read_bytes() == b"Written in the sandbox\n"
    assert made.stat().st_mode & 0o777 == 0o640
    assert not (tree.root / "new.txt").exists()
    assert not (tree.outside / "planted.txt").exists()
    assert not (tree.out / "absent.txt").exists()
    assert (tree.root / "a.txt").read_bytes() == INSIDE
    assert len(run.denials()) == run.result.broker["denied"] == 6
    assert verify(run.audit_path).ok


# --------------------------------------------------------------------------- racing swaps

_FLIPPER = textwrap.dedent(
    """
    import os, sys
    d, secret = sys.argv[1], sys.argv[2]
    f, sub = os.path.join(d, "f.txt"), os.path.join(d, "sub")
    real_f = os.path.join(d, ".real_f")
    real_s, link_s = os.path.join(d, ".real_sub"), os.path.join(d, ".link_sub")
    print("ready", flush=True)
    while True:
        os.link(real_f, f + ".n"); os.replace(f + ".n", f)
        os.symlink(secret, f + ".n"); os.replace(f + ".n", f)
        os.rename(sub, real_s); os.rename(link_s, sub)
        os.rename(sub, link_s); os.rename(real_s, sub)
    """
)


def test_symlinks_swapped_in_while_the_guest_opens(launcher: Launcher, tree: Tree) -> None:
    """A file and a directory flip between real and symlink-to-outside as fast as a separate
    process can flip them, while the guest opens and reads them 1000 times."""
    n = 1000
    root = tree.root
    (root / ".real_f").write_bytes(INSIDE)
    (root / "f.txt").write_bytes(INSIDE)
    (root / ".link_sub").symlink_to(tree.outside / "sub")
    path_a, path_b = f"{root}/f.txt".encode(), f"{root}/sub/f.txt".encode()
    pa, pb = 80000, 81000
    calls = []
    data: dict[int, bytes] = {pa: path_a, pb: path_b}
    for i, (label, var) in enumerate(
        [("inside", "$ok"), ("eloop", "$loop"), ("other", "$other"), ("leak", "$leak")]
    ):
        call, seg = report(label, i, f"(local.get {var})")
        calls.append(call)
        data.update(seg)
    body = f"""
    (loop $again
      (local.set $odd (i32.and (local.get $i) (i32.const 1)))
      (local.set $h (call $fs_open
        (select (i32.const {pb}) (i32.const {pa}) (local.get $odd))
        (select (i32.const {len(path_b)}) (i32.const {len(path_a)}) (local.get $odd))
        (i32.const 0)))
      (if (i32.gt_s (local.get $h) (i32.const 0))
        (then
          (i32.store8 (i32.const 1024) (i32.const 0))
          (drop (call $fd_read (local.get $h) (i32.const 1024) (i32.const 64)))
          (if (i32.eq (i32.load8_u (i32.const 1024)) (i32.const 83))
            (then (local.set $leak (i32.add (local.get $leak) (i32.const 1))))
            (else (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
          (drop (call $fd_close (local.get $h))))
        (else
          (if (i32.eq (local.get $h) (i32.const -40))
            (then (local.set $loop (i32.add (local.get $loop) (i32.const 1))))
            (else (local.set $other (i32.add (local.get $other) (i32.const 1)))))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const {n}))))
    {" ".join(calls)}
    (i32.const 0)"""
    locals_ = " ".join(
        f"(local {v} i32)" for v in ("$i", "$h", "$odd", "$ok", "$loop", "$other", "$leak")
    )
    wat = module(body, data, locals_)
    proc = subprocess.Popen(
        [sys.executable, "-c", _FLIPPER, str(root), str(tree.secret)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        run = launcher.run(
            "racer",
            wat,
            {"fs.read": [str(root)]},
            {"fs_read": [str(root)], **FAST},
        )
        assert proc.poll() is None, "the flipper died: no race ran"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert run.result.status == "ok", run.result.reason
    got = run.results
    assert got["leak"] == 0, got
    assert got["inside"] + got["eloop"] + got["other"] == n
    assert got["inside"] > 0, got
    assert got["eloop"] > 0, got
    other = [r for r in run.denials() if "ELOOP" not in r["reason"]]
    assert all("ENOENT" in r["reason"] for r in other), other[:3]
    assert SECRET.decode().strip() not in "\n".join(run.texts)


# --------------------------------------------------------------------------- DNS and connect


def test_names_resolving_outside_the_grant(launcher: Launcher) -> None:
    """With a net grant the plugin gets its own veth; the broker resolves names with the
    (fake) resolver, checks every address, and connects from the plugin's namespace to a
    server the test runs on the host end of that veth."""
    with lease_uid(default_lease_dir()) as lease:
        pool = netns.AddressPool(netns.DEFAULT_NETWORK)
        host_addr, _, prefix = pool.lease(lease.index % pool.capacity)
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            srv.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            srv.bind((str(host_addr), 0))
            srv.listen(4)
            srv.setblocking(False)
            port = srv.getsockname()[1]
            names = ["svc.test", "outside.test", "mixed.test", "mixed2.test"]
            answers = {
                "svc.test": [str(host_addr)],
                "outside.test": ["192.0.2.7"],
                "mixed.test": [str(host_addr), "192.0.2.7"],
                "mixed2.test": ["198.51.100.9", str(host_addr)],
            }
            asked: list[tuple[str, int]] = []

            def resolver(host: str, p_: int) -> list[str]:
                asked.append((host, p_))
                return answers[host]

            g = Guest()
            g.net_connect("svc", "svc.test", port, 0)
            g.fd_write("send", 0, b"ping from the plugin")
            g.fd_close("close", 0)
            g.net_connect("outside", "outside.test", port, 1)
            g.net_connect("mixed", "mixed.test", port, 1)
            g.net_connect("mixed2", "mixed2.test", port, 1)
            g.net_connect("ungranted", "other.test", port, 1)
            g.net_connect("literal", str(host_addr), port, 1)
            g.net_connect("wrong_port", "svc.test", port + 1 if port < 65535 else 1, 1)
            grants = [f"{h}:{port}" for h in names]
            run = launcher.run(
                "netter",
                g.wat(),
                {"net.connect": grants},
                {
                    "net_connect": grants,
                    "net_allow_networks": [
                        str(ipaddress.ip_network(f"{host_addr}/{prefix}", strict=False))
                    ],
                },
                resolver=resolver,
                lease=lease,
            )
            assert run.result.status == "ok", run.result.reason
            assert run.results == {
                "svc": 1,
                "send": 20,
                "close": 0,
                "outside": -1,
                "mixed": -1,
                "mixed2": -1,
                "ungranted": -1,
                "literal": -1,
                "wrong_port": -1,
            }
            assert run.result.network.get("host_addr") == str(host_addr)
            assert sorted(h for h, _ in asked) == [
                "mixed.test",
                "mixed2.test",
                "outside.test",
                "svc.test",
            ]
            conn, peer = srv.accept()
            with conn:
                conn.settimeout(5)
                assert conn.recv(64) == b"ping from the plugin"
                assert peer[0] != "127.0.0.1"  # it came from the plugin's namespace
            with pytest.raises(BlockingIOError):
                srv.accept()  # the denied names were never dialled
        finally:
            srv.close()
    reasons = [r["reason"] for r in run.denials()]
    assert sum("outside net_allow_networks" in r for r in reasons) == 3
    assert sum("not granted" in r for r in reasons) == 3


def test_no_net_grant_no_connection(launcher: Launcher) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    asked: list[str] = []

    def resolver(host: str, _port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    try:
        g = Guest()
        g.net_connect("loopback", "127.0.0.1", port, 0)
        g.net_connect("name", "svc.test", port, 0)
        run = launcher.run(
            "nonet",
            g.wat(),
            {"net.connect": [f"127.0.0.1:{port}"]},  # asked for, never granted
            {},
            resolver=resolver,
        )
        assert run.result.status == "ok", run.result.reason
        assert run.results == {"loopback": -1, "name": -1}
        assert asked == []
        assert run.result.network == {}
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()
    assert len(run.denials()) == 2


# --------------------------------------------------------------------------- kv


def test_kv_persists_across_launches_and_is_per_plugin(launcher: Launcher) -> None:
    def guest(value: bytes) -> str:
        g = Guest()
        g.kv_get_log("get", b"counter")
        g.kv_set("set", b"counter", value)
        g.kv_set("big", b"huge", b"x" * 200)
        return g.wat()

    perms = {"kv": True}
    grant = {"kv": True, "kv_quota_bytes": 64 + KEY_COST}  # one small key, not "huge"
    first = launcher.run("kvone", guest(b"first"), perms, grant)
    assert first.result.status == "ok", first.result.reason
    assert first.results == {"get": -2, "set": 0, "big": -122}
    second = launcher.run("kvone", guest(b"second"), perms, grant)
    assert second.results == {"get": 5, "set": 0, "big": -122}
    assert "first" in second.texts
    other = launcher.run("kvtwo", guest(b"other"), perms, grant)
    assert other.results == {"get": -2, "set": 0, "big": -122}
    third = launcher.run("kvone", guest(b"third"), perms, grant)
    assert third.results["get"] == 6
    assert "second" in third.texts
    quota = [r for r in third.denials() if "quota" in r["reason"]]
    assert quota
    assert quota[-1]["op"] == "kv_set"
    denied = launcher.run("kvthree", guest(b"nope"), perms, {})  # no grant: kv denied
    assert denied.results == {"get": -1, "set": -1, "big": -1}


# --------------------------------------------------------------------------- rate limits and floods


def flood_wat(calls: int, expect_eagain: int | None = None) -> str:
    """``start`` logs ``calls`` times; returns 0, or (with ``expect_eagain``) 1000 + the
    number of EAGAIN answers when that number is not the one expected."""
    if expect_eagain is None:
        tail = "(i32.const 0)"
    else:
        tail = (
            f"(if (result i32) (i32.eq (local.get $eagain) (i32.const {expect_eagain}))"
            " (then (i32.const 0)) (else (i32.add (i32.const 1000) (local.get $eagain))))"
        )
    body = f"""
    (loop $again
      (if (i32.eq (call $log (i32.const 1) (i32.const 80000) (i32.const 5)) (i32.const -11))
        (then (local.set $eagain (i32.add (local.get $eagain) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const {calls}))))
    {tail}"""
    return module(body, {80000: b"flood"}, "(local $i i32) (local $eagain i32)")


def test_rate_limit_eagain_after_the_burst(launcher: Launcher) -> None:
    run = launcher.run("ratey", flood_wat(50, expect_eagain=45), {}, {"rate_per_s": 1, "burst": 5})
    assert run.result.status == "ok", run.result.reason
    assert run.texts == ["flood"] * 5
    assert run.result.broker["rate_limited"] == 45
    assert run.result.broker["denied"] == 45
    rate_records = [r for r in run.records() if r["reason"].startswith("rate limit")]
    assert len(rate_records) == 1  # one record for the whole flood window
    assert rate_records[0]["decision"] == "deny"
    assert len(run.records()) == 5 + 1


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def test_a_million_log_calls_end_promptly_as_abuse(launcher: Launcher) -> None:
    before = _rss()
    run = launcher.run("flooder", flood_wat(1_000_000), {}, None)  # no grant: the defaults
    grown = _rss() - before
    res = run.result
    assert res.status == "killed"
    assert res.reason.startswith("abuse"), res.reason
    assert run.wall_s < 20 * time_scale()
    assert res.broker["rate_limited"] >= MAX_RATE_DENIALS
    # the bucket's burst, then one call per token it refills while the flood lasts
    assert (
        res.broker["allowed"] <= policy.DEFAULT_BURST + policy.DEFAULT_RATE_PER_S * run.wall_s + 1
    )
    assert len(res.logs) <= MAX_KEPT_LOGS
    assert grown < 50 * 1024 * 1024, f"supervisor grew {grown / 1e6:.1f} MB"
    records = run.records()
    rate_records = [r for r in records if r["reason"].startswith("rate limit")]
    # Not one record per call: one per flood window. Each token the bucket refills during
    # the flood lets one call through, and the denial after it opens a new window.
    assert len(rate_records) <= res.broker["allowed"] - policy.DEFAULT_BURST + 1
    assert len(records) == res.broker["allowed"] + len(rate_records)
    assert verify(run.audit_path).ok


def test_a_fast_log_flood_keeps_the_supervisor_bounded(launcher: Launcher) -> None:
    calls = 12_000
    before = _rss()
    run = launcher.run("fastflood", flood_wat(calls, expect_eagain=0), {}, FAST)
    grown = _rss() - before
    res = run.result
    assert res.status == "ok", res.reason
    assert len(res.logs) == MAX_KEPT_LOGS
    assert res.logs_dropped == calls - MAX_KEPT_LOGS
    assert res.broker["allowed"] == calls
    assert grown < 50 * 1024 * 1024, f"supervisor grew {grown / 1e6:.1f} MB"


# --------------------------------------------------------------------------- fake children


MINIMAL = '(module (memory (export "memory") 1))'


def _raw_child(
    frames: Sequence[bytes], then_block: bool = False
) -> Callable[[], Callable[[], int]]:
    """A payload that writes ``frames`` raw into the broker socket after the filter, then a
    clock_now (whose reply it waits for) and DONE; or, with ``then_block``, waits forever."""

    def factory() -> Callable[[], int]:
        def payload() -> int:
            for frame in frames:
                os.write(fds.BROKER_FD, frame)
            if then_block:
                os.read(fds.BROKER_FD, p.MAX_FRAME)
                os.read(fds.BROKER_FD, p.MAX_FRAME)
                return 3
            os.write(fds.BROKER_FD, p.encode(p.Op.CLOCK_NOW, 4242))
            reply = os.read(fds.BROKER_FD, p.MAX_FRAME)
            ok = p.decode_reply(reply, p.Op.CLOCK_NOW, 4242)[0] > 0
            os.write(fds.BROKER_FD, p.encode_done(255, 0, p.DoneKind.OK, b""))
            return 0 if ok else 4

        return payload

    return factory


HOSTILE = [
    b"\x01",
    b"\x02\x01\x00\x00\x00\x01",
    p.encode_log(1, 77, b"bad level"),
    p.encode(p.Op.KV_SET, 2, b"\xff\xff"),
    p.encode(p.Op.OUTPUT, 3, b"z" * (p.MAX_FRAME + 10)),  # truncated by the receiver
]


def test_fake_child_raw_frames_are_violations_not_crashes(launcher: Launcher) -> None:
    run = launcher.run("rawchild", MINIMAL, payload=_raw_child(HOSTILE))
    res = run.result
    assert res.status == "ok", res.reason
    assert res.broker["violations"] == len(HOSTILE)
    malformed = [r for r in run.denials() if r["op"] in ("malformed", "fds")]
    assert len(malformed) == len(HOSTILE)
    assert verify(run.audit_path).ok


def test_fake_child_sixteen_violations_is_killed(launcher: Launcher) -> None:
    junk = [b"\x09junk%d" % i for i in range(MAX_VIOLATIONS + 4)]
    run = launcher.run("abuser", MINIMAL, payload=_raw_child(junk, then_block=True))
    res = run.result
    assert res.status == "killed"
    assert res.reason == "abuse: broker protocol"
    assert res.broker["violations"] >= MAX_VIOLATIONS
    assert run.wall_s < 10


def test_fake_child_passing_a_descriptor(launcher: Launcher) -> None:
    """Before its filter a child can still sendmsg: a descriptor in a control message is a
    violation, closed by the parent, audited, and the request it rode on is not served."""

    def factory() -> Callable[[], int]:
        sock = socket.socket(fileno=os.dup(fds.BROKER_FD))
        try:
            socket.send_fds(sock, [p.encode_log(1, 1, b"smuggled")], [0, 1, 2])
        finally:
            sock.close()
        return _raw_child([])()

    run = launcher.run("smuggler", MINIMAL, payload=factory)
    res = run.result
    assert res.status == "ok", res.reason
    assert res.broker["violations"] == 1
    assert res.logs == []
    rec = run.denials()[-1]
    assert rec["op"] == "fds"
    assert "3 descriptor" in rec["reason"]


def test_audit_file_shared_by_two_launches_stays_one_chain(launcher: Launcher) -> None:
    g = Guest()
    g.config_get_log("cfg", b"nope")
    launcher.run("twice", g.wat(), {}, {})
    path = launcher.run("twice", g.wat(), {}, {}).audit_path
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert len({r["identity"]["instance"] for r in records}) == 2
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert verify(path).ok
    shutil.copy(path, path.with_suffix(".bak"))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2] + lines[-1:]))  # drop one line of the second launch
    assert not verify(path).ok


def test_fake_child_empty_message_is_a_violation_not_end_of_channel(launcher: Launcher) -> None:
    run = launcher.run("emptymsg", MINIMAL, payload=_raw_child([b""]), limits={"timeout_s": 2})
    res = run.result
    assert res.status == "ok", res.reason
    assert res.broker["violations"] == 1
    assert run.denials()[-1]["op"] == "malformed"


# ------------------------------------------------------------ the parent's check of what it saw


def test_a_launch_whose_observed_isolation_falls_short_never_runs_the_plugin(
    launcher: Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent reads /proc/<PID 1> after the filter; if what it sees is not the plan
    (here: as if seccomp were off), the plugin is killed before any lifecycle export and
    the launch fails naming what was missing. Nothing is left behind (cgroups: fixture)."""
    from forgeone_isolate import observe

    real = observe.observe

    def tampered(pid: int) -> dict[str, Any]:
        seen = real(pid)
        time.sleep(0.3 * time_scale())  # time for the start section's call to arrive
        return {**seen, "seccomp": 0, "cap_eff": "0000000000200000"}

    # The call comes from a wasm start section: it runs at instantiation, which PID 1 does
    # while the parent reads /proc, before any lifecycle export.
    wat = """(module
  (import "forgeone" "log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hi")
  (func $s (drop (call $log (i32.const 2) (i32.const 0) (i32.const 2))))
  (start $s))"""
    control = launcher.run("observed", wat)  # untampered, the same guest logs (and is audited)
    assert control.result.status == "ok", control.result.reason
    assert "log" in [r["op"] for r in _records(control.audit_path)]
    monkeypatch.setattr(observe, "observe", tampered)
    with pytest.raises(SetupError) as caught:
        launcher.run("unobserved", wat)
    assert caught.value.step == "observe"
    assert "seccomp mode 0, not 2" in caught.value.message
    assert "cap_eff 0000000000200000" in caught.value.message
    # the guest's call was never heard (nor answered): no record of it
    audit = launcher.state / "audit" / f"{PREFIX}unobserved.jsonl"
    assert "log" not in [r["op"] for r in _records(audit)]


def test_a_sigterm_while_the_parent_observes_is_a_kill_not_a_setup_failure(
    launcher: Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the supervisor while it reads /proc/<PID 1>: the handler kills the
    sandbox, so what the parent then sees is nothing at all. That is the kill the operator
    asked for (status killed, "supervisor terminated"), not an isolation shortfall."""
    from forgeone_isolate import observe

    def terminated_meanwhile(pid: int) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's own handler runs here
        return {}  # read after the kill: no process left to see

    monkeypatch.setattr(observe, "observe", terminated_meanwhile)
    run = launcher.run("termobserve", MINIMAL)
    assert run.result.status == "killed", run.result.reason
    assert run.result.reason == "supervisor terminated"


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def test_isolation_gaps_names_each_missing_layer() -> None:
    from forgeone_isolate.launch import isolation_gaps

    plan = make_plan("gaps")
    good: dict[str, Any] = {
        "namespaces": dict.fromkeys(plan.namespaces, True),
        "seccomp": 2,
        "no_new_privs": 1,
        **dict.fromkeys(("cap_eff", "cap_prm", "cap_inh", "cap_bnd", "cap_amb"), "0" * 16),
        "uid_map": ["0", str(plan.host_uid), "1"],
        "gid_map": ["0", str(plan.host_gid), "1"],
    }
    good["keeper"] = {k: good[k] for k in ("seccomp", "no_new_privs", "cap_eff", "cap_prm")}
    good["keeper"].update({k: good[k] for k in ("cap_inh", "cap_bnd", "cap_amb")})
    assert isolation_gaps(good, plan) == []
    cases = {
        "namespaces not unshared: net": {"namespaces": {**good["namespaces"], "net": False}},
        "seccomp mode 0": {"seccomp": 0},
        "no_new_privs 0": {"no_new_privs": 0},
        "cap_bnd 000001ffffffffff": {"cap_bnd": "000001ffffffffff"},
        "cap_amb ?": {"cap_amb": ""},
        "uid_map 0 0 4294967295": {"uid_map": ["0", "0", "4294967295"]},
        "gid_map ?": {"gid_map": []},
        "keeper seccomp mode 0": {"keeper": {**good["keeper"], "seccomp": 0}},
        "keeper cap_bnd 000001ffffffffff": {
            "keeper": {**good["keeper"], "cap_bnd": "000001ffffffffff"}
        },
        "keeper not observed": {"keeper": None},
    }
    for expected, change in cases.items():
        gaps = isolation_gaps({**good, **change}, plan)
        assert len(gaps) == 1, (expected, gaps)
        assert gaps[0].startswith(expected), (expected, gaps)
    assert len(isolation_gaps({}, plan)) == 11  # nothing seen at all: every check fails


class _CountingCgroup:
    killed = 0

    def kill(self, timeout: float = 1.0) -> None:
        self.killed += 1


@contextlib.contextmanager
def _marker_supervisor(name: str) -> Iterator[tuple[Any, _CountingCgroup]]:
    """A supervisor with no children, to feed setup markers to by hand."""
    from forgeone_isolate import launch

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pc = _CountingCgroup()
    with ours, theirs:
        sup = launch._Supervisor(
            make_plan(name),
            launch.LaunchResult(),
            None,  # type: ignore[arg-type]
            pc,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            -1,
            ours,
            ours,
            None,
        )
        try:
            yield sup, pc
        finally:
            sup.sel.close()


def test_a_setup_marker_said_twice_is_a_protocol_violation() -> None:
    """Each marker on the setup channel comes once. The keeper shared PID 1's memory, so a
    plugin that took it over could say more (a second UNSHARED, PID1...): the supervisor
    kills the sandbox instead of believing it."""
    from forgeone_isolate import markers

    stand_in = subprocess.Popen(["sleep", "30"])  # a "PID 1" the violation may kill
    try:
        with _marker_supervisor("twice") as (sup, pc):
            assert sup._on_marker({"m": markers.PID1, "pid": stand_in.pid})
            assert sup.kill_reason is None
            assert sup.pid1 == stand_in.pid
            assert sup._on_marker({"m": markers.PID1, "pid": 1})
            assert sup.kill_reason == "protocol violation on the setup channel"
            assert sup.pid1 == stand_in.pid  # the second word was not taken
            assert pc.killed == 1
            assert stand_in.wait(10) == -signal.SIGKILL  # (through the pidfd held)
    finally:
        stand_in.kill()
        stand_in.wait()


def test_no_marker_says_how_pid1_ended() -> None:
    """PID 1's wait status is the supervisor's own (it reaps PID 1): an EXITED on the
    setup channel, which the keeper once sent, now only comes from a plugin that took
    PID 1 over, and is a protocol violation."""
    with _marker_supervisor("exited") as (sup, pc):
        assert sup._on_marker({"m": "EXITED", "status": 0})
        assert sup.kill_reason == "protocol violation on the setup channel"
        assert sup.pid1_status is None
        assert pc.killed == 1


def test_a_failed_step_said_after_the_filter_is_a_protocol_violation() -> None:
    """Every step is done once PID 1 is filtered: a STEP_FAILED after FILTERED comes from
    a plugin that took over PID 1 or its keeper (they share memory), to be believed over
    the kill that follows. It is refused, and no step failure is reported."""
    from forgeone_isolate import markers

    with _marker_supervisor("late-step") as (sup, pc):
        sup.markers_seen.add(markers.FILTERED)  # (as once PID 1 said it)
        step = {"m": markers.STEP_FAILED, "step": "seccomp", "errno": 1, "message": "x"}
        assert sup._on_marker(step)
        assert sup.kill_reason == "protocol violation on the setup channel"
        assert sup.step_failed is None
        assert pc.killed == 1
