"""netns: the plugin's shaped veth, and sockets made inside the plugin's namespace.

Real-kernel tests make their own net namespaces (``unshare --net sleep``, killed by pid at
the end) and use only addresses on the veth between the host and those namespaces. Rates
are measured end to end over TCP through the real tbf qdiscs; each transfer is checked
against the configured rate, and the same transfer over a link at a much higher rate shows
that it is the limit, not the machine, that sets the pace.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from forgeone_isolate import netns
from forgeone_isolate.errors import SetupError

SLOW_BPS = 8_000_000
FAST_BPS = 400_000_000
PAYLOAD = 2_000_000
TOLERANCE = 0.15

POOL = netns.AddressPool(netns.DEFAULT_NETWORK)


# --- pure parts (no root) ----------------------------------------------------------------


def test_pool_carves_slash30s() -> None:
    pool = netns.AddressPool(ipaddress.IPv4Network("10.213.0.0/16"))
    assert pool.capacity == 16384
    assert pool.lease(0) == (
        ipaddress.IPv4Address("10.213.0.1"),
        ipaddress.IPv4Address("10.213.0.2"),
        30,
    )
    assert pool.lease(1)[:2] == (
        ipaddress.IPv4Address("10.213.0.5"),
        ipaddress.IPv4Address("10.213.0.6"),
    )
    assert pool.lease(16383)[1] == ipaddress.IPv4Address("10.213.255.254")
    for bad in (-1, 16384, True):
        with pytest.raises(ValueError, match="lease index"):
            pool.lease(bad)


def test_pool_carves_slash31s() -> None:
    pool = netns.AddressPool(ipaddress.IPv4Network("10.213.0.0/24"), prefixlen=31)
    assert pool.capacity == 128
    assert pool.lease(3) == (
        ipaddress.IPv4Address("10.213.0.6"),
        ipaddress.IPv4Address("10.213.0.7"),
        31,
    )


def test_pool_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="prefixlen"):
        netns.AddressPool(ipaddress.IPv4Network("10.0.0.0/8"), prefixlen=29)
    with pytest.raises(ValueError, match="too small"):
        netns.AddressPool(ipaddress.IPv4Network("10.0.0.0/31"), prefixlen=30)


def test_host_ifname_fits_ifnamsiz() -> None:
    assert netns.host_ifname("a") == "foah"
    longest = netns.host_ifname("z" * netns.MAX_NAME_LEN)
    assert len(longest) == 15
    for bad in ("", "z" * (netns.MAX_NAME_LEN + 1), "Eth", "a-b", "a/b", "a b"):
        with pytest.raises(ValueError, match="link name"):
            netns.host_ifname(bad)


def test_setup_rejects_bad_arguments_before_touching_anything() -> None:
    host, child, plen = POOL.lease(0)
    other = POOL.lease(1)[1]
    with pytest.raises(ValueError, match="two addresses"):
        netns.setup_plugin_link(1, "x", host, other, plen, SLOW_BPS)
    with pytest.raises(ValueError, match="two addresses"):
        netns.setup_plugin_link(1, "x", host, host, plen, SLOW_BPS)
    with pytest.raises(ValueError, match="rate_bps"):
        netns.setup_plugin_link(1, "x", host, child, plen, 0)
    with pytest.raises(ValueError, match="link name"):
        netns.setup_plugin_link(1, "bad name", host, child, plen, SLOW_BPS)


def test_connect_rejects_bad_arguments() -> None:
    for address, port, timeout in (
        ("example.org", 80, 1.0),
        ("10.0.0.1", 0, 1.0),
        ("10.0.0.1", 80, 0),
    ):
        with pytest.raises(OSError) as info:
            netns.connect_in_netns(os.getpid(), address, port, timeout)
        assert info.value.errno == errno.EINVAL


# --- real kernel ---------------------------------------------------------------------------


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture
def spawn_netns() -> Iterator[Callable[[], int]]:
    """Start processes that each sit in a fresh net namespace; kill them by pid afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    ours = _ns_id("/proc/self/ns/net")

    def spawn() -> int:
        proc = subprocess.Popen(["unshare", "--net", "--", "sleep", "120"])
        procs.append(proc)
        deadline = time.monotonic() + 5
        while _ns_id(f"/proc/{proc.pid}/ns/net") == ours:
            assert time.monotonic() < deadline, "unshare did not take"
            time.sleep(0.002)
        return proc.pid

    yield spawn
    for proc in procs:
        proc.kill()
        proc.wait()
    for proc in procs:
        assert not os.path.exists(f"/proc/{proc.pid}/ns/net"), f"process {proc.pid} remains"


@pytest.fixture
def names() -> Iterator[Callable[[], tuple[str, int]]]:
    """Unique (link name, lease index) pairs; fail if any of our links is left behind."""
    made: list[str] = []
    base = os.getpid() % 0x100000

    def new() -> tuple[str, int]:
        name = f"t{base:x}{len(made)}"
        made.append(netns.host_ifname(name))
        return name, (base * 4 + len(made)) % POOL.capacity

    yield new
    left = set(netns.list_our_links()) & set(made)
    assert not left, f"veth left behind: {sorted(left)}"


def _link(
    spawn: Callable[[], int], new: Callable[[], tuple[str, int]], rate: int
) -> netns.PluginLink:
    pid = spawn()
    name, index = new()
    host, child, plen = POOL.lease(index)
    return netns.setup_plugin_link(pid, name, host, child, plen, rate)


def _child_ip(pid: int, *args: str) -> str:
    out = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "ip", *args], capture_output=True, text=True, check=True
    )
    return out.stdout


def _named_netns() -> list[str]:
    return sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []


def _connected_pair(link: netns.PluginLink) -> tuple[socket.socket, socket.socket]:
    """(socket inside the child's namespace, the host-side server's accepted socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((str(link.host_addr), 0))
        server.listen(1)
        fd = netns.connect_in_netns(
            link.child_pid, str(link.host_addr), server.getsockname()[1], 5.0
        )
        inside = socket.socket(fileno=fd)
        accepted, peer = server.accept()
    assert peer[0] == str(link.child_addr)
    return inside, accepted


def _throughput(sender: socket.socket, receiver: socket.socket, nbytes: int) -> float:
    """Bits per second of payload from ``sender`` to ``receiver``, timed at the receiver."""
    payload = b"\xa5" * nbytes

    def send() -> None:
        sender.sendall(payload)
        sender.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send)
    start = time.monotonic()
    thread.start()
    got = 0
    while got < nbytes:
        chunk = receiver.recv(1 << 16)
        if not chunk:
            break
        got += len(chunk)
    elapsed = time.monotonic() - start
    thread.join()
    assert got == nbytes
    return nbytes * 8 / elapsed


def _rates(link: netns.PluginLink) -> tuple[float, float]:
    """(upload from the plugin, download to the plugin), each over its own connection."""
    inside, accepted = _connected_pair(link)
    with inside, accepted:
        up = _throughput(inside, accepted, PAYLOAD)
    inside, accepted = _connected_pair(link)
    with inside, accepted:
        down = _throughput(accepted, inside, PAYLOAD)
    return up, down


@pytest.mark.requires_root
def test_both_directions_run_at_the_limit_and_the_limit_is_what_bites(
    spawn_netns: Callable[[], int], names: Callable[[], tuple[str, int]]
) -> None:
    slow = _link(spawn_netns, names, SLOW_BPS)
    fast = _link(spawn_netns, names, FAST_BPS)
    try:
        before = slow.stats()
        slow_up, slow_down = _rates(slow)
        after = slow.stats()
        fast_up, fast_down = _rates(fast)
    finally:
        slow.teardown()
        fast.teardown()
    report = (
        f"slow up {slow_up / 1e6:.2f} down {slow_down / 1e6:.2f} Mbit/s; "
        f"fast up {fast_up / 1e6:.1f} down {fast_down / 1e6:.1f} Mbit/s"
    )
    print(report)
    for rate in (slow_up, slow_down):
        assert abs(rate - SLOW_BPS) <= TOLERANCE * SLOW_BPS, report
    for fast_rate, slow_rate in ((fast_up, slow_up), (fast_down, slow_down)):
        assert fast_rate > 5 * slow_rate, report
    assert after["rx_bytes"] - before["rx_bytes"] >= PAYLOAD
    assert after["tx_bytes"] - before["tx_bytes"] >= PAYLOAD


@pytest.mark.requires_root
def test_link_inside_the_child_namespace(
    spawn_netns: Callable[[], int], names: Callable[[], tuple[str, int]]
) -> None:
    named_before = _named_netns()
    link = _link(spawn_netns, names, SLOW_BPS)
    try:
        assert link.host_ifname in netns.list_our_links()
        links = _child_ip(link.child_pid, "-o", "link")
        assert "eth0" in links
        assert "state UP" in links.split("eth0", 1)[1].splitlines()[0]
        assert f"inet {link.child_addr}/{link.prefixlen}" in _child_ip(
            link.child_pid, "-4", "-o", "addr"
        )
        assert f"default via {link.host_addr} dev eth0" in _child_ip(link.child_pid, "route")
        assert "inet6" not in _child_ip(link.child_pid, "-o", "addr", "show", "dev", "eth0")
        assert (
            "qdisc tbf 1: root"
            in subprocess.run(
                ["nsenter", "-t", str(link.child_pid), "-n", "tc", "qdisc", "show", "dev", "eth0"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        host_qdisc = subprocess.run(
            ["tc", "qdisc", "show", "dev", link.host_ifname],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "qdisc tbf 1: root" in host_qdisc
        assert "rate 8Mbit" in host_qdisc
        assert _named_netns() == named_before  # reached via /proc, nothing bind-mounted
    finally:
        link.teardown()
    link.teardown()  # idempotent
    assert link.host_ifname not in netns.list_our_links()
    assert "eth0" not in _child_ip(link.child_pid, "-o", "link")
    with pytest.raises(OSError) as info:
        link.stats()
    assert info.value.errno == errno.ENODEV


@pytest.mark.requires_root
def test_connect_happens_inside_the_child_namespace_only(
    spawn_netns: Callable[[], int], names: Callable[[], tuple[str, int]]
) -> None:
    link = _link(spawn_netns, names, SLOW_BPS)
    fds_before = set(os.listdir("/proc/self/fd"))
    ns_before = os.readlink("/proc/thread-self/ns/net")
    threads_before = threading.active_count()
    try:
        inside, accepted = _connected_pair(link)
        with inside, accepted:
            assert inside.getsockname()[0] == str(link.child_addr)
            assert inside.getblocking()
            inside.sendall(b"ping")
            assert accepted.recv(4) == b"ping"
        # The host's loopback listener is invisible from the child's namespace.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as loopback:
            loopback.bind(("127.0.0.1", 0))
            loopback.listen(1)
            with pytest.raises(ConnectionRefusedError):
                netns.connect_in_netns(link.child_pid, "127.0.0.1", loopback.getsockname()[1], 2.0)
    finally:
        link.teardown()
    assert os.readlink("/proc/thread-self/ns/net") == ns_before
    assert threading.active_count() == threads_before
    assert set(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.requires_root
def test_connect_to_a_gone_process_is_an_oserror() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(OSError) as info:
        netns.connect_in_netns(proc.pid, "10.213.0.1", 80, 1.0)
    assert info.value.errno == errno.ENOENT


@pytest.mark.requires_root
def test_refuses_the_supervisor_namespace_and_creates_nothing(
    names: Callable[[], tuple[str, int]],
) -> None:
    name, index = names()
    host, child, plen = POOL.lease(index)
    before = netns.list_our_links()
    with pytest.raises(SetupError) as info:
        netns.setup_plugin_link(os.getpid(), name, host, child, plen, SLOW_BPS)
    assert (info.value.step, info.value.errno) == ("net-open", errno.EINVAL)
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(SetupError) as info:
        netns.setup_plugin_link(proc.pid, name, host, child, plen, SLOW_BPS)
    assert (info.value.step, info.value.errno) == ("net-open", errno.ENOENT)
    assert netns.list_our_links() == before


@pytest.mark.requires_root
def test_existing_name_is_left_alone(
    spawn_netns: Callable[[], int], names: Callable[[], tuple[str, int]]
) -> None:
    link = _link(spawn_netns, names, SLOW_BPS)
    try:
        other = spawn_netns()
        name = link.host_ifname[len(netns.LINK_PREFIX) : -len(netns.HOST_SUFFIX)]
        host, child, plen = POOL.lease((link.host_index + 7) % POOL.capacity)
        with pytest.raises(SetupError) as info:
            netns.setup_plugin_link(other, name, host, child, plen, SLOW_BPS)
        assert (info.value.step, info.value.errno) == ("veth-create", errno.EEXIST)
        assert link.host_ifname in netns.list_our_links()
        assert "eth0" not in _child_ip(other, "-o", "link")
    finally:
        link.teardown()


@pytest.mark.requires_root
def test_failure_late_in_setup_removes_the_pair(
    spawn_netns: Callable[[], int],
    names: Callable[[], tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = netns._apply_tbf
    calls = []

    def second_fails(ipr: object, index: int, rate: int) -> None:
        calls.append(index)
        if len(calls) == 2:  # the child's end, after the host end is fully built
            raise OSError(errno.EPERM, "injected")
        real(ipr, index, rate)

    monkeypatch.setattr(netns, "_apply_tbf", second_fails)
    pid = spawn_netns()
    name, index = names()
    host, child, plen = POOL.lease(index)
    with pytest.raises(SetupError) as info:
        netns.setup_plugin_link(pid, name, host, child, plen, SLOW_BPS)
    assert (info.value.step, info.value.errno) == ("child-shape", errno.EPERM)
    assert netns.host_ifname(name) not in netns.list_our_links()
    assert "eth0" not in _child_ip(pid, "-o", "link")
