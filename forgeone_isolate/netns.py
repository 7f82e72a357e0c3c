"""Network for a plugin that is granted ``net.connect``: one shaped veth pair (parent side).

Mechanism only: the caller (``launch``) decides whether a plugin gets a link, which address
lease and which rate; this module carries it out and keeps no state between calls.

The link, built by :func:`setup_plugin_link` after the child has unshared its net namespace::

    host netns                               child netns (reached via /proc/<pid>/ns/net)
    fo<name>h  host_addr/prefixlen  <--veth-->  eth0  child_addr/prefixlen, default via host
    root tbf at rate_bps (to child)             root tbf at rate_bps (from child)
                                                lo up

Both directions are shaped as *egress* of the sending end, so no ingress policing is
needed; the tbf inside the child's namespace is out of the plugin's reach because it holds
no capabilities there. IPv6 is switched off on both ends (the address pool is IPv4), so no
link-local addresses or router solicitations appear.

What is deliberately not done: no NAT, no ``ip_forward``, no firewall rule, no route on the
host beyond the connected route of the host end's own address. Routing plugin traffic out of
the host is the operator's job; without it a plugin reaches only the host end (and the
host's own local addresses). Which destinations a plugin may connect to is the broker's
decision, made before :func:`connect_in_netns` is called.

:func:`connect_in_netns` makes the broker's ``net_connect`` socket *inside* the child's
namespace, on a short-lived helper thread (``setns`` of a net namespace applies to the
calling thread only), so its traffic crosses the shaped veth while the supervisor's own
threads stay in the host namespace.

pyroute2 is imported on first use (about 127 ms), so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from forgeone_isolate._sys.libc import CLONE_NEWNET
from forgeone_isolate.errors import SetupError

_T = TypeVar("_T")

#: every host-side interface we create is named ``LINK_PREFIX + name + HOST_SUFFIX``
LINK_PREFIX: Final = "fo"
HOST_SUFFIX: Final = "h"
#: the name of the plugin's end inside its namespace
CHILD_IFNAME: Final = "eth0"
#: IFNAMSIZ (16, <linux/if.h>) less the NUL, the prefix and the suffix
MAX_NAME_LEN: Final = 15 - len(LINK_PREFIX) - len(HOST_SUFFIX)
#: an example pool; the operator's configuration chooses the real one
DEFAULT_NETWORK: Final = ipaddress.IPv4Network("10.213.0.0/16")

_NAME_RE: Final = re.compile(rf"[a-z0-9]{{1,{MAX_NAME_LEN}}}")
#: tbf's rate field is a u32 of bytes per second (<linux/pkt_sched.h> tc_ratespec.rate)
_MAX_RATE_BPS: Final = 8 * (2**32 - 1)
#: tbf queue: what may wait, expressed as time at the configured rate
_TBF_LATENCY: Final = "50ms"
#: tbf bucket: rate/HZ at HZ=250 (tc's rule of thumb), and never less than a few full frames
_TBF_MIN_BURST: Final = 16 * 1024
#: how long the helper thread may take beyond a connect timeout before we give up on it
_THREAD_GRACE_S: Final = 2.0

# setns(2), <sched.h>; os.setns arrives only in Python 3.12.
# TODO(lead): move this binding to _sys/libc.py (owned elsewhere while this was written).
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def _setns_net(nsfd: int) -> None:
    """setns(nsfd, CLONE_NEWNET) for the calling thread. Raises: OSError."""
    if _libc.setns(nsfd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


# --- addresses -------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressPool:
    """A network carved into point-to-point subnets, one per plugin link.

    ``prefixlen`` is 30 (host end ``.1``, child ``.2`` of each /30) or 31 (RFC 3021: both
    addresses of each /31 are usable). The caller picks the index (for example from the
    plugin's uid lease), so the pool holds no state.
    """

    network: ipaddress.IPv4Network
    prefixlen: int = 30

    def __post_init__(self) -> None:
        if self.prefixlen not in (30, 31):
            raise ValueError(f"prefixlen must be 30 or 31, not {self.prefixlen}")
        if self.network.prefixlen > self.prefixlen:
            raise ValueError(f"{self.network} is too small for a /{self.prefixlen}")

    @property
    def capacity(self) -> int:
        """How many leases the pool holds."""
        return 1 << (self.prefixlen - self.network.prefixlen)

    def lease(self, index: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, int]:
        """``(host_addr, child_addr, prefixlen)`` of lease ``index``.

        Raises: ValueError if ``index`` is outside ``[0, capacity)``.
        """
        if isinstance(index, bool) or not 0 <= index < self.capacity:
            raise ValueError(f"lease index {index} outside [0, {self.capacity})")
        base = self.network.network_address + (index << (32 - self.prefixlen))
        first = 1 if self.prefixlen == 30 else 0
        return base + first, base + first + 1, self.prefixlen


# --- pyroute2 plumbing -----------------------------------------------------------------


def _iproute(fileno: int | None = None) -> Any:
    """An IPRoute on the host namespace, or on an already made netlink socket ``fileno``."""
    from pyroute2 import IPRoute

    return IPRoute() if fileno is None else IPRoute(fileno=fileno)


def _netlink_errno(e: BaseException) -> int | None:
    """The errno a pyroute2 NetlinkError or an OSError carries, None for anything else."""
    from pyroute2.netlink.exceptions import NetlinkError

    if isinstance(e, NetlinkError):
        return int(e.code)
    if isinstance(e, OSError):
        return e.errno or errno.EIO
    return None


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    """Turn a netlink or OS failure inside the block into SetupError(name, errno)."""
    try:
        yield
    except SetupError:
        raise
    except Exception as e:
        err = _netlink_errno(e)
        if err is None:
            raise
        raise SetupError(name, err, str(e)) from e


def _call_in_netns(nsfd: int, fn: Callable[[], _T], timeout: float) -> _T:
    """Run ``fn`` on a fresh thread that has first joined the net namespace ``nsfd``.

    The calling thread never changes namespace. ``fn`` must return a file descriptor or
    something that needs no cleanup: if the thread outlives ``timeout``, we give up on it and
    it closes the descriptor it would have returned.

    Raises: whatever ``fn`` or setns raise (OSError), TimeoutError if the thread hangs.
    """
    lock = threading.Lock()
    box: dict[str, Any] = {}
    own_nsfd = os.dup(nsfd)  # the thread's own, so an abandoned thread never sees a reused fd

    def run() -> None:
        try:
            try:
                _setns_net(own_nsfd)
            finally:
                os.close(own_nsfd)
            value: Any = fn()
        except BaseException as e:
            with lock:
                box["error"] = e
            return
        with lock:
            if box.get("abandoned") and isinstance(value, int):
                os.close(value)
            box["value"] = value

    thread = threading.Thread(target=run, name="forgeone-netns", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:
        if "value" not in box and "error" not in box:
            box["abandoned"] = True  # the thread closes what it makes from now on
            raise TimeoutError(errno.ETIMEDOUT, "netns helper thread did not finish")
    if "error" in box:
        raise box["error"]
    result: _T = box["value"]
    return result


def _open_child_netns(child_pid: int) -> int:
    """An O_RDONLY descriptor on the child's net namespace, refused if it is ours.

    Raises: SetupError("net-open", ...).
    """
    path = f"/proc/{child_pid}/ns/net"
    try:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError("net-open", e.errno or errno.EIO, path) from None
    ours = os.stat("/proc/thread-self/ns/net")
    theirs = os.fstat(nsfd)
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        os.close(nsfd)
        raise SetupError(
            "net-open",
            errno.EINVAL,
            f"process {child_pid} shares the supervisor's network namespace",
        )
    return nsfd


def _netlink_socket() -> int:
    """A NETLINK_ROUTE socket in the calling thread's namespace, as a bare descriptor."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    )
    return sock.detach()


def _disable_ipv6(ifname: str) -> None:
    """Switch IPv6 off on ``ifname`` in the calling thread's namespace (if IPv6 exists).

    /proc/sys/net resolves against the namespace of the thread that opens it.
    """
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    if os.path.exists("/proc/sys/net/ipv6"):
        with open(path, "w", encoding="ascii") as f:
            f.write("1")


def _tbf_params(rate_bps: int) -> dict[str, Any]:
    rate_bytes = rate_bps // 8
    return {
        "rate": f"{rate_bps}bit",
        "burst": max(rate_bytes // 250, _TBF_MIN_BURST),
        "latency": _TBF_LATENCY,
    }


def _apply_tbf(ipr: Any, index: int, rate_bps: int) -> None:
    """Root tbf qdisc on interface ``index``: its egress at ``rate_bps``."""
    ipr.tc("add", "tbf", index=index, handle="1:", **_tbf_params(rate_bps))


def _setup_child_side(
    nsfd: int,
    host_addr: ipaddress.IPv4Address,
    child_addr: ipaddress.IPv4Address,
    prefixlen: int,
    rate_bps: int,
) -> None:
    """Inside the child's namespace: eth0 addressed, shaped, up; lo up; default route."""
    with _step("child-netlink"):
        ipr_child = _iproute(_call_in_netns(nsfd, _netlink_socket, _THREAD_GRACE_S))
    with ipr_child as ipr:
        with _step("child-link"):
            found = ipr.link_lookup(ifname=CHILD_IFNAME)
            if not found:
                raise SetupError("child-link", errno.ENODEV, f"{CHILD_IFNAME} not in child")
            index = int(found[0])
            lo = int(ipr.link_lookup(ifname="lo")[0])
        with _step("child-ipv6-off"):
            _call_in_netns(nsfd, lambda: _disable_ipv6(CHILD_IFNAME), _THREAD_GRACE_S)
        with _step("child-addr"):
            ipr.addr("add", index=index, address=str(child_addr), prefixlen=prefixlen)
        with _step("child-shape"):
            _apply_tbf(ipr, index, rate_bps)
        with _step("child-up"):
            ipr.link("set", index=lo, state="up")
            ipr.link("set", index=index, state="up")
        with _step("child-route"):
            ipr.route("add", dst="0.0.0.0/0", gateway=str(host_addr), oif=index)


# --- the link --------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginLink:
    """One plugin's veth pair, as set up by :func:`setup_plugin_link`.

    ``host_ifname``/``host_index`` name the end in the host namespace; the other end is
    ``eth0`` in the child's namespace and dies with it.
    """

    child_pid: int
    host_ifname: str
    host_index: int
    host_addr: ipaddress.IPv4Address
    child_addr: ipaddress.IPv4Address
    prefixlen: int
    rate_bps: int

    def _host_link(self, ipr: Any) -> Any | None:
        """Our host end, or None if it is gone (or the index now names another link)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            links = ipr.get_links(self.host_index)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise
        if not links or links[0].get_attr("IFLA_IFNAME") != self.host_ifname:
            return None
        return links[0]

    def teardown(self) -> None:
        """Delete the pair (deleting one end deletes both). Safe to call again.

        Raises: SetupError("net-teardown", ...) if the kernel refuses.
        """
        from pyroute2.netlink.exceptions import NetlinkError

        with _step("net-teardown"), _iproute() as ipr:
            if self._host_link(ipr) is None:
                return
            try:
                ipr.link("del", index=self.host_index)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise

    def stats(self) -> dict[str, int]:
        """Counters of the host end: ``rx_*`` came from the plugin, ``tx_*`` went to it.

        Keys: rx_bytes, tx_bytes, rx_packets, tx_packets, rx_dropped, tx_dropped.
        Raises: OSError(ENODEV) if the link is gone.
        """
        with _iproute() as ipr:
            link = self._host_link(ipr)
            if link is None:
                raise OSError(errno.ENODEV, f"{self.host_ifname} is gone")
            counters = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS") or {}
        keys = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_dropped", "tx_dropped")
        return {key: int(counters.get(key, 0)) for key in keys}


def host_ifname(name: str) -> str:
    """The host-end interface name for link ``name``. Raises: ValueError if it is unfit."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"link name must be 1-{MAX_NAME_LEN} of [a-z0-9], not {name!r}")
    return f"{LINK_PREFIX}{name}{HOST_SUFFIX}"


def setup_plugin_link(
    child_pid: int,
    name: str,
    host_addr: ipaddress.IPv4Address,
    child_addr: ipaddress.IPv4Address,
    prefixlen: int,
    rate_bps: int,
) -> PluginLink:
    """Parent: give the child's (already unshared) net namespace a veth shaped both ways.

    The veth is created with its peer directly inside the child's namespace, already named
    ``eth0`` (one atomic RTM_NEWLINK), so no ``fo…c`` name ever appears on the host and no
    rename can collide. The namespace is reached through ``/proc/<child_pid>/ns/net``,
    opened once, so a recycled pid cannot redirect later steps; nothing is bind-mounted.

    Raises:
        ValueError: an argument is unfit (name, addresses not in one subnet, rate).
        SetupError: a step failed; its name (``net-open``, ``veth-create``, ``host-addr``,
            ``host-shape``, ``host-up``, ``child-*``) and errno say which. Everything this
            call created is removed before it raises.
    """
    ifname = host_ifname(name)
    subnet = ipaddress.IPv4Network(f"{host_addr}/{prefixlen}", strict=False)
    if child_addr not in subnet or child_addr == host_addr:
        raise ValueError(f"{child_addr} and {host_addr} must be two addresses of {subnet}")
    if isinstance(rate_bps, bool) or not 8 <= rate_bps <= _MAX_RATE_BPS:
        raise ValueError(f"rate_bps {rate_bps} outside [8, {_MAX_RATE_BPS}]")

    nsfd = _open_child_netns(child_pid)
    link: PluginLink | None = None
    try:
        with _iproute() as ipr:
            with _step("veth-create"):
                ipr.link(
                    "add",
                    ifname=ifname,
                    kind="veth",
                    peer={"ifname": CHILD_IFNAME, "net_ns_fd": nsfd},
                )
                index = int(ipr.link_lookup(ifname=ifname)[0])
            link = PluginLink(child_pid, ifname, index, host_addr, child_addr, prefixlen, rate_bps)
            with _step("host-ipv6-off"):
                _disable_ipv6(ifname)
            with _step("host-addr"):
                ipr.addr("add", index=index, address=str(host_addr), prefixlen=prefixlen)
            with _step("host-shape"):
                _apply_tbf(ipr, index, rate_bps)
            with _step("host-up"):
                ipr.link("set", index=index, state="up")
        _setup_child_side(nsfd, host_addr, child_addr, prefixlen, rate_bps)
    except BaseException:
        if link is not None:
            with contextlib.suppress(Exception):
                link.teardown()
        raise
    finally:
        os.close(nsfd)
    return link


# --- brokered connections --------------------------------------------------------------


def connect_in_netns(child_pid: int, address: str, port: int, timeout: float) -> int:
    """A TCP socket connected to ``address:port`` from inside the child's net namespace.

    The socket is made and connected on a helper thread that joined the namespace; the
    calling thread's namespace never changes. Returns a blocking descriptor (close-on-exec)
    that the caller owns, typically to hand to the child with SCM_RIGHTS.

    Raises: OSError: EINVAL for an address that is not an IP literal, a port outside
        1-65535 or a timeout <= 0; ETIMEDOUT (TimeoutError) if the connect takes longer
        than ``timeout``; otherwise what opening the namespace, setns or connect reported.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise OSError(errno.EINVAL, f"not an IP address: {address!r}") from None
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise OSError(errno.EINVAL, f"port {port} outside 1-65535")
    if not timeout > 0:
        raise OSError(errno.EINVAL, f"timeout must be positive, not {timeout}")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET

    def connect() -> int:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect((str(ip), port))
            except TimeoutError:
                msg = f"connect to {address}:{port} timed out"
                raise TimeoutError(errno.ETIMEDOUT, msg) from None
            sock.setblocking(True)
            return sock.detach()
        finally:
            sock.close()

    nsfd = os.open(f"/proc/{child_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _call_in_netns(nsfd, connect, timeout + _THREAD_GRACE_S)
    finally:
        os.close(nsfd)


def list_our_links() -> list[str]:
    """Host-namespace veth interfaces named like ours (``fo…h``), for leak checks."""
    names: list[str] = []
    with _iproute() as ipr:
        for link in ipr.get_links():
            ifname = link.get_attr("IFLA_IFNAME") or ""
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if ifname.startswith(LINK_PREFIX) and ifname.endswith(HOST_SUFFIX) and kind == "veth":
                names.append(ifname)
    return sorted(names)
