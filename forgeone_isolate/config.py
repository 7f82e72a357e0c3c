"""The service's configuration file (TOML), ``serve --config /etc/forgeone/config.toml``.

Every key has a default; a missing file section means "all defaults". An unknown key or
table, a wrong type or a bad value is refused at start, in one line::

    config FILE:LINE: key.path: problem

The file (at most 1 MiB)::

    state_dir = "/var/lib/forgeone"     # registry, packages, audit logs, kv, metrics
    trust = "/etc/forgeone/trust"       # trust store: a directory of *.pub (+ revoked) or one key
    policy = ""                         # operator policy (TOML); "" = deny everything
    log_level = "info"                  # debug | info | warning | error
    stop_timeout_s = 5.0                # SIGTERM / stop: a plugin's bound to stop gracefully
    max_plugins = 1024                  # plugins running at once
    cgroup_delegated = false            # true under systemd Delegate=yes: our own cgroup is ours

    [control]
    socket = "/run/forgeone/control.sock"
    group = ""                          # a group whose members may use the socket (root always may)
    max_connections = 64                # clients served at once

    [uids]                              # host uids handed to plugins, one per running plugin
    first = 1500000000
    count = 65536

    [network]
    address_pool = "10.213.0.0/16"      # /30 links for plugins granted the network

    [metrics]
    listen = ""                         # "127.0.0.1:9464": Prometheus text over HTTP, loopback only

    [restart]                           # defaults for plugins installed without their own
    policy = "on-failure"               # "no" | "on-failure"
    max_restarts = 5                    # consecutive failed starts before giving up
    backoff_base_s = 0.5                # delay before restart n: base * 2**(n-1), at most cap
    backoff_cap_s = 30.0

Paths must be absolute.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

from forgeone_isolate.errors import PolicyError
from forgeone_isolate.manifest import shown_number
from forgeone_isolate.netns import AddressPool
from forgeone_isolate.policy import (
    KeyPath,
    index_key_lines,
    parse_toml,
    read_operator_file,
    render_key_path,
)
from forgeone_isolate.uidpool import DEFAULT_COUNT, DEFAULT_FIRST

MAX_CONFIG_BYTES: Final = 1024 * 1024
DEFAULT_CONFIG_PATH: Final = Path("/etc/forgeone/config.toml")
DEFAULT_SOCKET: Final = Path("/run/forgeone/control.sock")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
RESTART_POLICIES: Final = ("no", "on-failure")
DEFAULT_ADDRESS_POOL: Final = ipaddress.IPv4Network("10.213.0.0/16")
MAX_UID: Final = 2**32 - 2  # (uid_t)-1 is "no uid"


class ConfigError(PolicyError):
    """Raised when the service configuration is unreadable, malformed or holds a bad value."""


@dataclass(frozen=True)
class RestartDefaults:
    """The restart policy a plugin gets when its install does not name one."""

    policy: str = "on-failure"
    max_restarts: int = 5
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds before restart number ``attempt`` (from 1): exponential, capped."""
        return float(min(self.backoff_cap_s, self.backoff_base_s * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class ServiceConfig:
    """A validated service configuration (:func:`load_config`, or the defaults)."""

    state_dir: Path = Path("/var/lib/forgeone")
    trust: Path = Path("/etc/forgeone/trust")
    policy: Path | None = None
    log_level: str = "info"
    stop_timeout_s: float = 5.0
    max_plugins: int = 1024
    cgroup_delegated: bool = False
    control_socket: Path = DEFAULT_SOCKET
    control_group: str | None = None
    control_gid: int | None = None
    max_connections: int = 64
    uid_first: int = DEFAULT_FIRST
    uid_count: int = DEFAULT_COUNT
    address_pool: ipaddress.IPv4Network = DEFAULT_ADDRESS_POOL
    metrics_listen: tuple[str, int] | None = None
    restart: RestartDefaults = field(default_factory=RestartDefaults)
    source: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the service logs it at start)."""
        return {
            "state_dir": str(self.state_dir),
            "trust": str(self.trust),
            "policy": str(self.policy) if self.policy else "",
            "log_level": self.log_level,
            "stop_timeout_s": self.stop_timeout_s,
            "max_plugins": self.max_plugins,
            "cgroup_delegated": self.cgroup_delegated,
            "control": {
                "socket": str(self.control_socket),
                "group": self.control_group or "",
                "max_connections": self.max_connections,
            },
            "uids": {"first": self.uid_first, "count": self.uid_count},
            "network": {"address_pool": str(self.address_pool)},
            "metrics": {"listen": _fmt_listen(self.metrics_listen) if self.metrics_listen else ""},
            "restart": {
                "policy": self.restart.policy,
                "max_restarts": self.restart.max_restarts,
                "backoff_base_s": self.restart.backoff_base_s,
                "backoff_cap_s": self.restart.backoff_cap_s,
            },
            "source": str(self.source) if self.source else None,
        }


def _fmt_listen(listen: tuple[str, int]) -> str:
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_config(path: Path) -> ServiceConfig:
    """Read and validate the configuration at ``path``. Raises: ConfigError (one line)."""
    return parse_config(
        read_operator_file(path, f"config {path}", MAX_CONFIG_BYTES, ConfigError), path
    )


def parse_config(data: bytes, path: Path) -> ServiceConfig:
    """Validate configuration bytes; ``path`` only names them. Raises: ConfigError."""
    return _Loader(path, data).load()


_TOP: Final = (
    "state_dir",
    "trust",
    "policy",
    "log_level",
    "stop_timeout_s",
    "max_plugins",
    "cgroup_delegated",
    "control",
    "uids",
    "network",
    "metrics",
    "restart",
)
_TABLES: Final[dict[str, tuple[str, ...]]] = {
    "control": ("socket", "group", "max_connections"),
    "uids": ("first", "count"),
    "network": ("address_pool",),
    "metrics": ("listen",),
    "restart": ("policy", "max_restarts", "backoff_base_s", "backoff_cap_s"),
}


class _Loader:
    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.index: dict[KeyPath, int] = {}

    def fail(self, key: KeyPath, problem: str) -> NoReturn:
        line = 1
        for i in range(len(key), 0, -1):
            if key[:i] in self.index:
                line = self.index[key[:i]]
                break
        raise ConfigError(f"config {self.path}:{line}: {render_key_path(key)}: {problem}")

    def load(self) -> ServiceConfig:
        doc, source = parse_toml(self.data, f"config {self.path}", ConfigError)
        self.index = index_key_lines(source)
        self.unknown((), doc, _TOP)
        tables: dict[str, Mapping[str, Any]] = {}
        for name, keys in _TABLES.items():
            value = doc.get(name, {})
            if not isinstance(value, dict):
                self.fail((name,), "must be a table")
            self.unknown((name,), value, keys)
            tables[name] = value
        d = ServiceConfig()
        control_group = self.string(("control", "group"), tables["control"], "") or None
        gid = None
        if control_group is not None:
            try:
                gid = grp.getgrnam(control_group).gr_gid
            except KeyError:
                self.fail(("control", "group"), f"no such group {control_group!r}")
        policy_text = self.string(("policy",), doc, "")
        metrics_text = self.string(("metrics", "listen"), tables["metrics"], "")
        restart = tables["restart"]
        base = self.number(("restart", "backoff_base_s"), restart, 0.5, 0.01, 3600.0)
        cap = self.number(("restart", "backoff_cap_s"), restart, 30.0, 0.01, 86400.0)
        if cap < base:
            self.fail(("restart", "backoff_cap_s"), f"must be at least backoff_base_s ({base})")
        max_plugins = self.integer(("max_plugins",), doc, d.max_plugins, 1, 100_000)
        pool = self.network(tables["network"])
        links = AddressPool(pool).capacity  # a /30 per plugin granted the network
        if links < max_plugins:
            self.fail(
                ("network", "address_pool"),
                f"{pool} holds {links} plugin links, fewer than max_plugins ({max_plugins}):"
                " plugins granted the network could be given the same addresses",
            )
        uid_first = self.integer(("uids", "first"), tables["uids"], d.uid_first, 1, MAX_UID)
        uid_count = self.integer(("uids", "count"), tables["uids"], d.uid_count, 1, 1 << 24)
        if uid_first + uid_count - 1 > MAX_UID:
            self.fail(("uids", "count"), f"first + count passes the largest uid {MAX_UID}")
        return ServiceConfig(
            state_dir=self.path_value(("state_dir",), doc, d.state_dir),
            trust=self.path_value(("trust",), doc, d.trust),
            policy=self.absolute(("policy",), policy_text) if policy_text else None,
            log_level=self.choice(("log_level",), doc, d.log_level, LOG_LEVELS),
            stop_timeout_s=self.number(("stop_timeout_s",), doc, d.stop_timeout_s, 0.1, 600.0),
            max_plugins=max_plugins,
            cgroup_delegated=self.boolean(("cgroup_delegated",), doc, d.cgroup_delegated),
            control_socket=self.path_value(
                ("control", "socket"), tables["control"], d.control_socket
            ),
            control_group=control_group,
            control_gid=gid,
            max_connections=self.integer(
                ("control", "max_connections"), tables["control"], d.max_connections, 1, 4096
            ),
            uid_first=uid_first,
            uid_count=uid_count,
            address_pool=pool,
            metrics_listen=self.listen(metrics_text) if metrics_text else None,
            restart=RestartDefaults(
                policy=self.choice(("restart", "policy"), restart, "on-failure", RESTART_POLICIES),
                max_restarts=self.integer(("restart", "max_restarts"), restart, 5, 0, 1000),
                backoff_base_s=base,
                backoff_cap_s=cap,
            ),
            source=self.path,
        )

    # -- typed readers ---------------------------------------------------------------

    def unknown(self, where: KeyPath, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.fail((*where, key), f"unknown key (known: {', '.join(known)})")

    def string(self, key: KeyPath, table: Mapping[str, Any], default: str) -> str:
        value = table.get(str(key[-1]), default)
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {type(value).__name__}")
        if "\0" in value or len(value) > 4096:
            self.fail(key, "must be at most 4096 characters without NUL")
        return value

    def absolute(self, key: KeyPath, text: str) -> Path:
        if not text.startswith("/"):
            self.fail(key, f"must be an absolute path, not {text[:80]!r}")
        return Path(os.path.normpath(text))

    def path_value(self, key: KeyPath, table: Mapping[str, Any], default: Path) -> Path:
        text = self.string(key, table, str(default))
        return self.absolute(key, text)

    def choice(
        self, key: KeyPath, table: Mapping[str, Any], default: str, allowed: tuple[str, ...]
    ) -> str:
        value = self.string(key, table, default)
        if value not in allowed:
            self.fail(key, f"must be one of {', '.join(allowed)}, not {value[:80]!r}")
        return value

    def boolean(self, key: KeyPath, table: Mapping[str, Any], default: bool) -> bool:
        value = table.get(str(key[-1]), default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {type(value).__name__}")
        return value

    def integer(
        self, key: KeyPath, table: Mapping[str, Any], default: int, low: int, high: int
    ) -> int:
        value = table.get(str(key[-1]), default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, not {type(value).__name__}")
        if not low <= value <= high:
            self.fail(key, f"must be in {low}..{high}, not {shown_number(value)}")
        return value

    def number(
        self, key: KeyPath, table: Mapping[str, Any], default: float, low: float, high: float
    ) -> float:
        value = table.get(str(key[-1]), default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"must be a number, not {type(value).__name__}")
        # compared as it is: float() of a 400-digit integer overflows; NaN fails every test
        if not low <= value <= high:
            self.fail(key, f"must be in [{low}, {high}], not {shown_number(value)}")
        return float(value)

    def network(self, table: Mapping[str, Any]) -> ipaddress.IPv4Network:
        key: KeyPath = ("network", "address_pool")
        text = self.string(key, table, "10.213.0.0/16")
        try:
            net = ipaddress.IPv4Network(text, strict=True)
        except ValueError as e:
            self.fail(key, f"not an IPv4 network: {e}")
        if net.prefixlen > 30:
            self.fail(key, f"{net} is too small: at least a /30 is needed")
        return net

    def listen(self, text: str) -> tuple[str, int]:
        key: KeyPath = ("metrics", "listen")
        m = re.fullmatch(
            # [0-9], not \d: \d matches non-ASCII digits, which int() reads ("٨٠" is 80)
            r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<p6>[0-9]{1,5})|(?P<v4>[0-9.]+):(?P<p4>[0-9]{1,5})",
            text,
        )
        if m is None:
            self.fail(key, f"must be ADDRESS:PORT with a loopback IP address, not {text[:80]!r}")
        host = m.group("v6") or m.group("v4")
        port = int(m.group("p6") or m.group("p4"))
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            self.fail(key, f"{host!r} is not an IP address")
        if not addr.is_loopback:
            self.fail(key, f"{addr} is not a loopback address: metrics are served on loopback only")
        if not 1 <= port <= 65535:
            self.fail(key, f"port {port} outside 1..65535")
        return str(addr), port


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "RestartDefaults",
    "ServiceConfig",
    "load_config",
    "parse_config",
]
