"""Limits that bite: each manifest limit, through a real ``launch``, held by the kernel.

Every test launches ``python -m forgeone_isolate launch --json`` as a subprocess and measures
the effect of one limit from outside the supervisor's own say-so: CPU time from the plugin
cgroup's accounting over the wall time, memory by what happens to a plugin that keeps
growing, io and network by timing real transfers with the guest's own clock (``clock_now``
around the loop, logged) or at the test's server. Where it is cheap, the same guest runs
side by side with a high limit, so the test fails if the limit were not applied (and shows
that the limit, not the machine, sets the pace).

Host notes (this machine, hybrid cgroups):
- v1 ``memory`` belongs to someone else, so memory is held by ``RLIMIT_AS`` and wasmtime's
  ``StoreLimits``; the memory test checks that the plugin is stopped and that the same
  growth is refused under a low limit and granted under a high one.
- v1 ``blkio`` throttles reads as they reach the disk, but buffered *writes* are written
  back later by the kernel's flusher threads, outside the plugin's cgroup, so they are not
  throttled on v1 (v2 with io.max + memory does throttle writeback). The io test therefore
  reads a file whose pages were dropped from the page cache first.
- Network: a plugin granted ``net.connect`` gets a veth whose two ends are shaped with tbf at
  ``net_bps``; its sockets are made inside its namespace. With ``FORGEONE_RUN_DIR`` pointed at
  a fresh directory, the first uid lease is index 0, so the host end is 10.213.0.1 and the
  plugin is 10.213.0.2; the test server listens on 0.0.0.0 before the launch.

After every test: no cgroup directory, veth or process of ours remains (see :func:`leaks`;
the tree-wide ``leak_check`` fixture would also count other sessions' plugins).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from guestgen import Guest, results, write_plugin
from plugin_utils import live_children

from forgeone_isolate import cgroup, netns, package, signing

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "tests" / "plugins"

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.requires_userns,
    pytest.mark.requires_seccomp,
    pytest.mark.requires_cgroup,
]

#: a second buffer for the transfer loops, clear of guestgen's scratch and string data
XFER_BUF = 131072
XFER_CHUNK = 65536
#: where the loops keep their state (free bytes of guestgen's scratch page)
T0_AT, TOTAL_AT, LAST_AT = 984, 992, 996
HOST_ADDR = "10.213.0.1"


# --------------------------------------------------------------------------- machinery


@dataclass(frozen=True)
class Env:
    """A signer, a state directory and a private uid-lease directory for one test."""

    root: Path
    key: Ed25519PrivateKey
    trust: Path
    fingerprint: str
    state: Path
    run_dir: Path
    #: the reports of every launch this test made (for the leak checks)
    reports: list[dict[str, Any]] = field(default_factory=list)

    def pack(
        self,
        name: str,
        wat: str,
        permissions: dict[str, Any] | None = None,
        limits: dict[str, int] | None = None,
    ) -> Path:
        """A signed package of ``wat`` with the given manifest permissions and limits."""
        src = write_plugin(
            self.root / f"src-{name}-{uuid.uuid4().hex[:8]}", name, wat, permissions, limits
        )
        out = src.with_suffix(".forgepkg")
        out.write_bytes(package.build_package(src, self.key))
        return out

    def policy(self, plugin: str, **grant: Any) -> Path:
        """A policy file granting ``plugin`` of our signer what ``grant`` lists."""
        lines = ["[[grant]]", f'signer = "{self.fingerprint}"', f'plugin = "{plugin}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in grant.items()]
        path = self.root / f"policy-{plugin}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def launch(self, pkg: Path, policy: Path | None = None, timeout: float = 60) -> dict[str, Any]:
        """Run ``launch --json`` to completion; return the report."""
        argv = [
            sys.executable,
            "-m",
            "forgeone_isolate",
            "launch",
            str(pkg),
            "--trust",
            str(self.trust),
            "--state-dir",
            str(self.state),
            "--json",
        ]
        if policy is not None:
            argv += ["--policy", str(policy)]
        env = dict(os.environ, FORGEONE_RUN_DIR=str(self.run_dir))
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, check=False
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        assert lines, f"no report (exit {proc.returncode}); stderr: {proc.stderr}"
        report: dict[str, Any] = json.loads(lines[-1])
        self.reports.append(report)
        return report


def leaks(reports: list[dict[str, Any]]) -> list[str]:
    """What the launches behind ``reports`` left: cgroup directories, veths, processes.

    Only this test's own: cgroups are named after the instance and host veth ends
    ``fo<instance[:8]>h``, and other sessions may run plugins on this host meanwhile (which is
    why the tree-wide ``leak_check`` fixture is not used here).
    """
    instances = [r["plugin"]["instance"] for r in reports]
    found = [
        d
        for d in cgroup.detect().existing_plugin_dirs()
        if any(i in os.path.basename(d) for i in instances)
    ]
    found += [
        path
        for r in reports
        for path in r["isolation"]["cgroup_limits"]["paths"]
        if os.path.exists(path)
    ]
    ours = {netns.host_ifname(i[:8]) for i in instances}
    found += [f"veth {name}" for name in netns.list_our_links() if name in ours]
    found += [f"process {p.pid} {p.name()}" for p in live_children()]
    return sorted(set(found))


def assert_no_leaks(reports: list[dict[str, Any]]) -> None:
    """:func:`leaks` is empty, allowing a short grace period for the kernel to catch up."""
    deadline = time.monotonic() + 2.0
    left = leaks(reports)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = leaks(reports)
    assert not left, f"left behind: {left}"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    """A fresh environment; afterwards no cgroup, veth or process of ours may remain."""
    pair = signing.keygen(tmp_path / "keys")
    env_ = Env(
        tmp_path,
        signing.load_private_key(pair.private_path),
        pair.public_path,
        pair.fingerprint,
        tmp_path / "state",
        tmp_path / "run",
    )
    yield env_
    assert env_.reports, "the test launched nothing"
    assert_no_leaks(env_.reports)


def timed_loop(g: Guest, name: str, op: str, slot: int, limit: int | None = None) -> None:
    """Append a loop of ``op`` (fd_read or fd_write) of 64 KiB chunks on ``slot``'s handle.

    fd_read loops until it returns 0 (or an error); fd_write loops until ``limit`` bytes are
    written (or an error). The guest logs ``<name>_bytes``, ``<name>_last`` (the call that
    ended the loop) and ``<name>_ms`` (clock_now around the loop).
    """
    handle = f"(i32.load (i32.const {900 + 4 * slot}))"
    total = f"(i32.load (i32.const {TOTAL_AT}))"
    last = f"(i32.load (i32.const {LAST_AT}))"
    if op == "fd_read":
        stop = f"(i32.le_s {last} (i32.const 0))"
    else:
        assert limit is not None
        stop = f"(i32.or (i32.le_s {last} (i32.const 0)) (i32.ge_s {total} (i32.const {limit})))"
    g.steps.append(f"(i64.store (i32.const {T0_AT}) (call $clock_now))")
    g.steps.append(f"(i32.store (i32.const {TOTAL_AT}) (i32.const 0))")
    g.steps.append(
        f"(block $end_{name} (loop $again_{name}"
        f" (i32.store (i32.const {LAST_AT})"
        f" (call ${op} {handle} (i32.const {XFER_BUF}) (i32.const {XFER_CHUNK})))"
        f" (if (i32.gt_s {last} (i32.const 0)) (then"
        f" (i32.store (i32.const {TOTAL_AT}) (i32.add {total} {last}))))"
        f" (br_if $end_{name} {stop})"
        f" (br $again_{name})))"
    )
    g.call(
        f"{name}_ms",
        f"(i32.wrap_i64 (i64.div_u (i64.sub (call $clock_now) (i64.load (i32.const {T0_AT})))"
        " (i64.const 1000000)))",
    )
    g.call(f"{name}_bytes", total)
    g.call(f"{name}_last", last)


# --------------------------------------------------------------------------------- cpu


def test_cpu_percent_caps_a_busy_plugin(env: Env, figure: Callable[[str], None]) -> None:
    spin = (PLUGINS / "spin.wat").read_text()
    share: dict[int, float] = {}
    throttled: dict[int, int] = {}
    for pct in (20, 100):
        pkg = env.pack("spin", spin, limits={"cpu_percent": pct, "timeout_s": 2})
        report = env.launch(pkg)
        assert (report["status"], report["reason"]) == ("killed", "timeout"), report
        applied = report["isolation"]["cgroup_limits"]["applied"]
        want = (
            f"cpu.max={pct * 1000} 100000"
            if "cpu.max" in applied["cpu"]
            else f"cpu.cfs_quota_us={pct * 1000}"
        )
        assert want in applied["cpu"], applied
        m = report["metrics"]
        share[pct] = m["cpu_usage_ns"] / (m["wall_ms"] * 1e6)
        throttled[pct] = m["nr_throttled"]
    figure(
        f"cpu share of one core: 20% limit {share[20]:.3f} ({throttled[20]} periods throttled),"
        f" 100% limit {share[100]:.3f}"
    )
    assert 0.05 < share[20] <= 0.25, share
    assert throttled[20] >= 10, throttled  # most of the ~20 periods of 100 ms in 2 s
    # Without the 20% cap the same guest takes far more (less than a whole core only when
    # other work on this machine competes for it).
    # side by side: without the cap the same guest takes clearly more (other load on a
    # shared machine can squeeze the uncapped run, so the margin is relative)
    assert share[100] > 1.5 * share[20], share


# ------------------------------------------------------------------------------ memory

GROW_PAGES = 192  # 12 MiB more than the guest's 4 pages (256 KiB)


def test_memory_limit_stops_a_growing_plugin_and_the_next_launch_works(env: Env) -> None:
    memgrow = json.loads((PLUGINS / "memgrow.json").read_text())
    pkg = env.pack("memgrow", (PLUGINS / "memgrow.wat").read_text(), limits=memgrow["limits"])
    report = env.launch(pkg)
    assert report["status"] == "killed", report
    assert report["reason"].startswith("memory"), report["reason"]

    # Right after, the supervisor launches again; the same 12 MiB growth is refused at
    # memory_mb 8 (memory.grow answers -1) and granted at memory_mb 32 (the old size, 4).
    g = Guest()
    g.call("grow", f"(memory.grow (i32.const {GROW_PAGES}))")
    g.call("pages", "(memory.size)")
    wat = g.wat()
    seen: dict[int, dict[str, int]] = {}
    for mb in (8, 32):
        after = env.launch(env.pack("grower", wat, limits={"memory_mb": mb}))
        assert (after["status"], after["reason"]) == ("ok", ""), after
        seen[mb] = results(after["logs"])
    assert seen[8] == {"grow": -1, "pages": 4}, seen
    assert seen[32] == {"grow": 4, "pages": 4 + GROW_PAGES}, seen


# ---------------------------------------------------------------------------------- io

IO_FILE_BYTES = 4 * 1024 * 1024
IO_BPS = 1024 * 1024
IO_UNTHROTTLED_BPS = 10 * 1024**3


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_io_bps_paces_reads_from_disk(env: Env, figure: Callable[[str], None]) -> None:
    # Reads are submitted by the reading task itself (the plugin), so they are throttled
    # once the file's pages are no longer in the page cache.
    if cgroup.backing_device(str(env.root)) is None:
        # io_bps applies to the block device under the state directory; tmpfs has none.
        message = f"{env.root} is on no block device: io_bps cannot be applied there"
        if os.environ.get("FORGEONE_MUST_ISOLATE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    data = env.root / "data"
    data.mkdir()
    blob = data / "blob"
    blob.write_bytes(os.urandom(IO_FILE_BYTES))
    g = Guest()
    g.fs_open("open", str(blob), 0, slot=0)
    timed_loop(g, "rd", "fd_read", slot=0)
    wat = g.wat()
    pol = env.policy("reader", fs_read=[str(data)])
    took: dict[int, float] = {}
    for bps in (IO_BPS, IO_UNTHROTTLED_BPS):
        pkg = env.pack("reader", wat, {"fs.read": [str(data)]}, {"io_bps": bps})
        _drop_from_page_cache(blob)
        report = env.launch(pkg, pol)
        assert (report["status"], report["reason"]) == ("ok", ""), report
        assert f"{bps}" in report["isolation"]["cgroup_limits"]["applied"]["io"]
        res = results(report["logs"])
        assert res["open"] >= 0, res
        assert (res["rd_bytes"], res["rd_last"]) == (IO_FILE_BYTES, 0), res
        took[bps] = res["rd_ms"] / 1000
        assert report["metrics"]["io_read_bytes"] >= IO_FILE_BYTES, report["metrics"]
    expected = IO_FILE_BYTES / IO_BPS
    figure(
        f"io: 4 MiB read at 1 MiB/s took {took[IO_BPS]:.2f} s (expected {expected:.1f} s),"
        f" unthrottled {took[IO_UNTHROTTLED_BPS]:.3f} s"
    )
    assert expected * 0.8 <= took[IO_BPS] <= expected * 1.2, took
    assert took[IO_UNTHROTTLED_BPS] < took[IO_BPS] / 4, took


def test_io_bps_paces_writes_through_a_passed_fd(env: Env, figure: Callable[[str], None]) -> None:
    # Write handles are O_DSYNC (fsaccess): each fd_write is on disk when it returns,
    # submitted by the plugin itself, so io_bps paces writes on v1 and v2 alike.
    if cgroup.backing_device(str(env.root)) is None:
        message = f"{env.root} is on no block device: io_bps cannot be applied there"
        if os.environ.get("FORGEONE_MUST_ISOLATE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    out = env.root / "out"
    out.mkdir()
    g = Guest()
    g.fs_open("create", str(out / "blob"), 2, slot=0)
    timed_loop(g, "wr", "fd_write", slot=0, limit=IO_FILE_BYTES)
    wat = g.wat()
    pol = env.policy("writer", fs_write=[str(out)])
    took: dict[int, float] = {}
    for bps in (IO_BPS, IO_UNTHROTTLED_BPS):
        pkg = env.pack("writer", wat, {"fs.write": [str(out)]}, {"io_bps": bps})
        report = env.launch(pkg, pol)
        assert (report["status"], report["reason"]) == ("ok", ""), report
        res = results(report["logs"])
        assert res["create"] >= 0, res
        assert res["wr_bytes"] == IO_FILE_BYTES, res
        took[bps] = res["wr_ms"] / 1000
        assert (out / "blob").stat().st_size == IO_FILE_BYTES
    expected = IO_FILE_BYTES / IO_BPS
    figure(
        f"io: 4 MiB written at 1 MiB/s took {took[IO_BPS]:.2f} s (expected {expected:.1f} s),"
        f" unthrottled {took[IO_UNTHROTTLED_BPS]:.3f} s"
    )
    assert expected * 0.8 <= took[IO_BPS] <= expected * 1.2, took
    # synchronous writes to an emulated disk (the guest-kernel stage) take ~1 s unthrottled
    assert took[IO_UNTHROTTLED_BPS] < took[IO_BPS] / 2, took


# ----------------------------------------------------------------------------- network

NET_BPS = 8_000_000
RX_BYTES = 2_000_000
TX_BYTES = 31 * XFER_CHUNK  # 2 031 616: whole 64 KiB writes, about 2 MB
NET_TOLERANCE = 0.15
FAST_NET_BPS = 400_000_000


class TransferServer:
    """Listens on 0.0.0.0 (so the plugin's host end address is covered once it exists).

    First connection: sends ``RX_BYTES`` and closes. Second: receives ``TX_BYTES``, timing
    first to last byte, then answers ``ok`` (so the guest keeps its socket, and its
    namespace, until every byte has crossed the link) and closes.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))  # the plugin's veth appears later
        self.sock.listen(4)
        self.sock.settimeout(30)
        self.port: int = self.sock.getsockname()[1]
        self.sent = 0
        self.received = 0
        self.rx_rate_bps: float | None = None
        self.peers: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, peer = self.sock.accept()
            self.peers.append(peer[0])
            with conn:
                conn.sendall(bytes(RX_BYTES))
                self.sent = RX_BYTES
            conn, peer = self.sock.accept()
            self.peers.append(peer[0])
            with conn:
                conn.settimeout(30)
                first_len, t_first, t_last = 0, 0.0, 0.0
                while self.received < TX_BYTES:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    now = time.monotonic()
                    if not first_len:
                        first_len, t_first = len(chunk), now
                    self.received += len(chunk)
                    t_last = now
                if self.received >= TX_BYTES and t_last > t_first:
                    self.rx_rate_bps = (self.received - first_len) * 8 / (t_last - t_first)
                conn.sendall(b"ok")
        except BaseException as e:  # reported by the test
            self.error = e

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@dataclass(frozen=True)
class Transfer:
    """One launch of the transfer guest: its report and the two measured rates (bit/s)."""

    report: dict[str, Any]
    to_plugin_bps: float  # RX_BYTES over the guest's clock around its fd_read loop
    from_plugin_bps: float  # TX_BYTES over the server's clock, first to last byte


def run_transfer(env: Env, net_bps: int) -> Transfer:
    """Launch a guest that receives RX_BYTES from, then sends TX_BYTES to, a test server."""
    server = TransferServer()
    try:
        target = f"{HOST_ADDR}:{server.port}"
        g = Guest()
        g.net_connect("rx_conn", HOST_ADDR, server.port, slot=0)
        timed_loop(g, "rx", "fd_read", slot=0)
        g.fd_close("rx_close", slot=0)
        g.net_connect("tx_conn", HOST_ADDR, server.port, slot=1)
        timed_loop(g, "tx", "fd_write", slot=1, limit=TX_BYTES)
        g.fd_read_log("ack", slot=1, length=16)
        g.fd_close("tx_close", slot=1)
        pkg = env.pack("netxfer", g.wat(), {"net.connect": [target]}, {"net_bps": net_bps})
        report = env.launch(pkg, env.policy("netxfer", net_connect=[target]))
    finally:
        server.close()
    assert server.error is None, server.error
    assert (report["status"], report["reason"]) == ("ok", ""), report
    net = report["isolation"]["network"]
    assert (net["host_addr"], net["plugin_addr"], net["rate_bps"]) == (
        HOST_ADDR,
        "10.213.0.2",
        net_bps,
    ), net
    # Both connections came from the plugin's own address: made inside its namespace.
    assert server.peers == ["10.213.0.2", "10.213.0.2"], server.peers
    res = results(report["logs"])
    assert res["rx_conn"] >= 0, res
    assert res["tx_conn"] >= 0, res
    assert (res["rx_bytes"], res["rx_last"]) == (RX_BYTES, 0), res
    assert (res["tx_bytes"], res["ack"]) == (TX_BYTES, 2), res
    assert server.received == TX_BYTES
    assert server.rx_rate_bps is not None
    return Transfer(report, RX_BYTES * 8 / (max(res["rx_ms"], 1) / 1000), server.rx_rate_bps)


def test_net_bps_shapes_both_directions(env: Env, figure: Callable[[str], None]) -> None:
    slow = run_transfer(env, NET_BPS)
    fast = run_transfer(env, FAST_NET_BPS)
    figure(
        f"net at {NET_BPS / 1e6:.0f} Mbit/s: to the plugin {slow.to_plugin_bps / 1e6:.2f},"
        f" from the plugin {slow.from_plugin_bps / 1e6:.2f} Mbit/s; at"
        f" {FAST_NET_BPS / 1e6:.0f} Mbit/s: {fast.to_plugin_bps / 1e6:.0f},"
        f" {fast.from_plugin_bps / 1e6:.0f} Mbit/s"
    )
    low, high = NET_BPS * (1 - NET_TOLERANCE), NET_BPS * (1 + NET_TOLERANCE)
    assert low <= slow.to_plugin_bps <= high, slow.to_plugin_bps
    assert low <= slow.from_plugin_bps <= high, slow.from_plugin_bps
    # The limit, not the machine or the broker, sets the pace.
    assert fast.to_plugin_bps > 4 * NET_BPS, fast.to_plugin_bps
    assert fast.from_plugin_bps > 4 * NET_BPS, fast.from_plugin_bps


def test_report_carries_the_link_counters(env: Env) -> None:
    report = run_transfer(env, FAST_NET_BPS).report
    net = report["isolation"]["network"]
    # Host end: tx went to the plugin, rx came from it.
    assert net["tx_bytes"] >= RX_BYTES, net
    assert net["rx_bytes"] >= TX_BYTES, net


# -------------------------------------------------------------------------------- pids


def test_pids_max_is_written(env: Env) -> None:
    # The plugin cannot fork (seccomp), so pids.max is a second wall: check it is there.
    g = Guest()
    g.call("alive", "(i32.const 1)")
    report = env.launch(env.pack("pids", g.wat(), limits={"pids": 3}))
    assert report["status"] == "ok", report
    # + 1 for the keeper process, which sits in the cgroup outside the plugin's PID ns.
    assert report["isolation"]["cgroup_limits"]["applied"]["pids"] == "pids.max=4"
