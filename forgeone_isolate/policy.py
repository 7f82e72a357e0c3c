"""The operator's policy, and every permission decision the supervisor makes (one place).

Pure: reading the policy file is the only I/O; no kernel calls. ``launch`` loads a
:class:`Policy`, computes the plugin's :class:`Effective` permissions with :func:`effective`
(what the manifest asks for, intersected with what the policy grants; deny by default), and
the broker asks the ``check_*`` helpers about each call, each answering a :class:`Decision`
that carries the reason the audit log records.

Policy file (TOML, e.g. ``/etc/forgeone/policy.toml``; at most 1 MiB)::

    [defaults]              # optional; every key has a built-in default
    rate_per_s = 200        # broker calls per second per plugin (token bucket refill)
    burst = 400             # token bucket size
    kv_quota_bytes = 1048576

    [[grant]]
    signer = "<64 hex fingerprint>"   # required: sha256 of the signer's public key
    plugin = "hello"                  # required: a plugin name, or "*" for every plugin
                                      #   of that signer (an exact name beats "*")
    fs_read = ["/srv/data"]           # roots: normalised absolute paths
    fs_write = ["/srv/out"]
    net_connect = ["127.0.0.1:8080", "api.example.com:443", "[::1]:9000"]
    net_allow_networks = ["10.0.0.0/8"]  # where a granted *name* may resolve to; required
                                         #   when net_connect names a host, unneeded for
                                         #   IP-literal grants
    kv = true
    kv_quota_bytes = 65536            # defaults.kv_quota_bytes when absent
    config = { greeting = "hi" }      # string values only (at most 4096 bytes each)
    rate_per_s = 100                  # defaults.rate_per_s / defaults.burst when absent
    burst = 200

    [grant.limits]                    # caps on the manifest's limits; keys and ranges
    memory_mb = 64                    #   of manifest.LIMIT_BOUNDS

The file must be a regular file that not every user may write (a root service trusts it).
Ranges: ``rate_per_s`` a number in (0, 100000]; ``burst`` an integer 1..1000000;
``kv_quota_bytes`` an integer 0..1073741824; at most 64 entries per list and 64 config keys.
Unknown keys and tables, wrong types, bad values and a second grant for the same
(signer, plugin) are refused; so are, before the TOML is parsed, a key of more than
MAX_KEY_PARTS dotted parts, arrays nested deeper than MAX_TOML_DEPTH and an unquoted word
of more than MAX_BARE_CHARS characters. Every error is one line,
``policy FILE:LINE: <key path>: <problem>``, where the key path counts grants from 1
(``grant[2].limits.memory_mb``) and LINE is the line of the offending key (of the grant's
``[[grant]]`` header when a required key is missing).

Decisions:

- fs: a manifest path is granted when it equals or lies under a granted root, compared
  component-wise (``/srv/data2`` is not under ``/srv/data``); the effective root is the
  manifest's path. Reading needs an ``fs_read`` root, writing an ``fs_write`` root (a write
  grant does not imply read).
- net: exact (host, port) match; host names compare case-insensitively, IP literals in
  their normalised form (``[0:0::1]`` is ``::1``). The broker resolves names itself and
  every resolved address must lie in ``net_allow_networks`` (an IP-literal grant: the
  address must equal it), so DNS cannot rebind a grant elsewhere.
- kv: both the manifest and the grant say true. config: the manifest's keys that the
  grant gives a value for (the value is the policy's).
- limits: each manifest limit is lowered to the grant's cap.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
import stat
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, NoReturn

from forgeone_isolate import manifest
from forgeone_isolate.errors import ManifestError, PolicyError, WireError

MAX_POLICY_BYTES: Final = 1024 * 1024
MAX_GRANTS: Final = 4096
MAX_LIST: Final = 64
MAX_CONFIG_KEYS: Final = 64
MAX_CONFIG_VALUE_BYTES: Final = 4096
MAX_PATH_BYTES: Final = 4096
MAX_RATE: Final = 100_000
MAX_BURST: Final = 1_000_000
MAX_KV_QUOTA: Final = 1024**3

DEFAULT_RATE_PER_S: Final = 200.0
DEFAULT_BURST: Final = 400
DEFAULT_KV_QUOTA_BYTES: Final = 1024 * 1024

WILDCARD: Final = "*"
_EPSILON: Final = 1e-9
FINGERPRINT_RE: Final = re.compile(r"^[0-9a-fA-F]{64}\Z")

_DEFAULT_KEYS: Final = ("rate_per_s", "burst", "kv_quota_bytes")
_GRANT_KEYS: Final = (
    "signer",
    "plugin",
    "fs_read",
    "fs_write",
    "net_connect",
    "net_allow_networks",
    "kv",
    "kv_quota_bytes",
    "config",
    "rate_per_s",
    "burst",
    "limits",
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
KeyPath = tuple[str | int, ...]


# ---------------------------------------------------------------------------------------
# The policy file


@dataclass(frozen=True)
class Defaults:
    """Values a grant inherits for the keys it leaves out (and plugins with no grant)."""

    rate_per_s: float = DEFAULT_RATE_PER_S
    burst: int = DEFAULT_BURST
    kv_quota_bytes: int = DEFAULT_KV_QUOTA_BYTES


@dataclass(frozen=True)
class Grant:
    """One ``[[grant]]``: what the operator allows one signer's plugin (or all of them).

    ``None`` for ``kv_quota_bytes``, ``rate_per_s`` and ``burst`` means "the defaults".
    """

    signer: str
    plugin: str
    fs_read: tuple[str, ...] = ()
    fs_write: tuple[str, ...] = ()
    net_connect: frozenset[tuple[str, int]] = frozenset()
    net_allow_networks: tuple[IPNetwork, ...] = ()
    kv: bool = False
    kv_quota_bytes: int | None = None
    config: dict[str, str] = field(default_factory=dict)
    rate_per_s: float | None = None
    burst: int | None = None
    limits: dict[str, int] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True)
class Policy:
    """A validated operator policy. Build with :meth:`load` or :meth:`deny_all`."""

    defaults: Defaults = field(default_factory=Defaults)
    grants: tuple[Grant, ...] = ()
    source: Path | None = None

    @classmethod
    def deny_all(cls) -> Policy:
        """No policy file: nothing is granted; the built-in defaults apply."""
        return cls()

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read and validate the policy file at ``path``.

        Raises: PolicyError, one line naming the file, the line and the key.
        """
        data = read_operator_file(path, f"policy {path}", MAX_POLICY_BYTES)
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: bytes, path: Path) -> Policy:
        """Validate policy bytes; ``path`` only names them in errors. Raises: PolicyError."""
        return _Loader(path, data).load()

    def grant_for(self, signer: str, plugin: str) -> Grant | None:
        """The grant for this signer and plugin: an exact plugin name beats ``"*"``."""
        signer = signer.lower()
        wildcard: Grant | None = None
        for g in self.grants:
            if g.signer != signer:
                continue
            if g.plugin == plugin:
                return g
            if g.plugin == WILDCARD:
                wildcard = g
        return wildcard

    def effective_for(self, signer: str, plugin: str, requested: manifest.Permissions) -> Effective:
        """:func:`effective` for this policy's grant of ``signer``/``plugin``."""
        return effective(requested, self.grant_for(signer, plugin), self.defaults)


def read_operator_file(
    path: Path, prefix: str, limit: int, error: type[PolicyError] = PolicyError
) -> bytes:
    """Read an operator's file (policy, config): a regular file, not world-writable, at most
    ``limit`` bytes. Errors start with ``prefix`` (``policy /etc/...``). Raises: ``error``."""
    # O_NONBLOCK: opening a FIFO must not hang the supervisor; the fstat refuses it next.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise error(f"{prefix}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{prefix}: not a regular file")
        if st.st_mode & stat.S_IWOTH:
            raise error(f"{prefix}: writable by every user (chmod o-w)")
        if st.st_size > limit:
            raise error(f"{prefix}: larger than {limit} bytes")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise error(f"{prefix}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise error(f"{prefix}: larger than {limit} bytes")
    return data


# --- where each key is: tomllib reports line numbers only for syntax errors -------------

_BARE = r"[A-Za-z0-9_-]+"
_BASIC = r'"(?:[^"\\]|\\.)*"'
_LITERAL = r"'[^']*'"
_SIMPLE = rf"(?:{_BARE}|{_BASIC}|{_LITERAL})"
_DOTTED = rf"{_SIMPLE}(?:[ \t]*\.[ \t]*{_SIMPLE})*"
_KEY_LINE_RE: Final = re.compile(rf"^[ \t]*({_DOTTED})[ \t]*=")
_ARRAY_HEADER_RE: Final = re.compile(rf"^[ \t]*\[\[[ \t]*({_DOTTED})[ \t]*\]\]")
_TABLE_HEADER_RE: Final = re.compile(rf"^[ \t]*\[[ \t]*({_DOTTED})[ \t]*\]")
_SIMPLE_RE: Final = re.compile(_SIMPLE)
_SYNTAX_RE: Final = re.compile(
    r"^(?P<msg>.*) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)\Z", re.S
)


#: key parts a dotted key or table header may have (our schemas need 3): tomllib's cost grows
#: with the square of the parts, ``a.a.a...a = 1`` of 16000 parts takes seconds and a GiB
MAX_KEY_PARTS: Final = 8
#: nesting of arrays and inline tables (ours need 2): deeper ones exhaust tomllib's recursion
MAX_TOML_DEPTH: Final = 32
#: a key or bare value (not quoted) longer than this is no key of ours nor a sane number; an
#: integer of more than sys.get_int_max_str_digits() (4300) digits makes tomllib raise
MAX_BARE_CHARS: Final = 4096

_PART = r'(?:[A-Za-z0-9_-]++|"(?:[^"\\\n]|\\[^\n])*+"|\'[^\'\n]*+\')'
#: what the pre-scan needs to see: a long dotted key, strings and comments (skipped whole,
#: so nothing inside them counts), brackets, bare words, an unterminated quote
_PRESCAN_RE: Final = re.compile(
    rf"(?P<chain>{_PART}(?:[ \t]*+\.[ \t]*+{_PART}){{{MAX_KEY_PARTS},}})"
    r'|"""(?:[^"\\]|\\.|"(?!""))*+"""(?:""|")?'
    r"|'''(?:[^']|'(?!''))*+'''(?:''|')?"
    r'|"(?:[^"\\\n]|\\[^\n])*+"'
    r"|'[^'\n]*+'"
    r"|#[^\n]*+"
    r"|(?P<open>[\[{])|(?P<close>[\]}])"
    r"|(?P<bare>[A-Za-z0-9_+.:-]++)"
    r"|(?P<quote>[\"'])",
    re.S,
)


def _prescan_toml(source: str, prefix: str, error: type[PolicyError]) -> None:
    """Refuse what would make tomllib (or :func:`_index_source`) slow or crash, before it
    runs: a key of more than MAX_KEY_PARTS parts, nesting deeper than MAX_TOML_DEPTH, a bare
    word of more than MAX_BARE_CHARS characters. Raises: ``error`` naming the line."""
    depth = 0
    for m in _PRESCAN_RE.finditer(source):
        problem = ""
        if m.group("chain") is not None:
            problem = f"a key of more than {MAX_KEY_PARTS} dotted parts"
        elif m.group("open") is not None:
            depth += 1
            if depth > MAX_TOML_DEPTH:
                problem = f"arrays or inline tables nested deeper than {MAX_TOML_DEPTH}"
        elif m.group("close") is not None:
            depth -= 1
            if depth < 0:
                return  # unbalanced: tomllib names the syntax error
        elif m.group("bare") is not None:
            if m.end() - m.start() > MAX_BARE_CHARS:
                problem = f"a key or value of more than {MAX_BARE_CHARS} characters"
        elif m.group("quote") is not None:
            return  # an unterminated string: tomllib names the syntax error
        if problem:
            line = source.count("\n", 0, m.start()) + 1
            raise error(f"{prefix}:{line}: {problem}")


def _line_count(source: str) -> int:
    """Lines as TOML counts them: only "\\n" ends one (str.splitlines also splits on
    U+2028, U+0085, ..., which TOML allows in comments and strings)."""
    return max(1, source.count("\n") + (0 if source.endswith("\n") else 1))


def parse_toml(
    data: bytes, prefix: str, error: type[PolicyError] = PolicyError
) -> tuple[dict[str, Any], str]:
    """Decode and parse an operator's TOML file: (document, source text).

    ``prefix`` starts every error line (``policy /etc/forgeone/policy.toml``); errors name the
    line: ``<prefix>:<line>: TOML syntax: <what> (column N)``. Raises: ``error``.
    """
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{prefix}:{line}: not UTF-8 (byte {e.start})") from None
    _prescan_toml(source, prefix, error)
    try:
        return tomllib.loads(source), source
    except tomllib.TOMLDecodeError as e:
        m = _SYNTAX_RE.match(str(e))
        if m is None:  # pragma: no cover - every tomllib error carries a position
            raise error(f"{prefix}:1: TOML syntax: {e}") from None
        if m.group("line"):
            line, where = int(m.group("line")), f" (column {m.group('col')})"
        else:
            line, where = _line_count(source), " (at end of file)"
        raise error(f"{prefix}:{line}: TOML syntax: {m.group('msg')}{where}") from None
    except (ValueError, RecursionError) as e:  # pragma: no cover - _prescan_toml refuses these
        raise error(f"{prefix}:1: not acceptable TOML: {str(e)[:80]}") from None


def _split_key(dotted: str) -> tuple[str, ...]:
    parts: list[str] = []
    for m in _SIMPLE_RE.finditer(dotted):
        text = m.group(0)
        if text[0] in "\"'":
            text = text[1:-1]
            if m.group(0)[0] == '"' and "\\" in text:
                # tomllib checked the escapes of real keys; this is a best effort for the
                # line index, which a bad one must not crash (the key keeps its spelling)
                with contextlib.suppress(UnicodeDecodeError):
                    text = text.encode("ascii", "backslashreplace").decode("unicode_escape")
        parts.append(text)
    return tuple(parts)


def _scan_value(line: str, pos: int, depth: int, mstring: str | None) -> tuple[int, str | None]:
    """Advance the bracket depth and multi-line string state over ``line[pos:]``."""
    i, n = pos, len(line)
    while i < n:
        if mstring is not None:
            j = line.find(mstring, i)
            while j > 0 and mstring == '"""' and _escaped(line, j):
                j = line.find(mstring, j + 1)
            if j < 0:
                return depth, mstring
            i = j + 3
            while i < n and i - j < 5 and line[i] == mstring[0]:  # """" ends with a quote
                i += 1
            mstring = None
            continue
        c = line[i]
        if c == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            mstring = line[i : i + 3]
            i += 3
        elif c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
        elif c == "'":
            j = line.find("'", i + 1)
            i = n if j < 0 else j + 1
        else:
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            i += 1
    return depth, mstring


def _escaped(line: str, j: int) -> bool:
    k = j
    while k > 0 and line[k - 1] == "\\":
        k -= 1
    return (j - k) % 2 == 1


def index_key_lines(source: str) -> dict[KeyPath, int]:
    """Map each key path of a TOML policy to the line (from 1) that defines it.

    ``[[grant]]`` headers are counted, so the n-th grant's keys are ``("grant", n - 1, key)``
    and its ``[grant.limits]`` sub-table ``("grant", n - 1, "limits", key)``. Keys inside an
    inline table or array map to the line of the key that holds them (see :func:`_line_of`).
    """
    return _index_source(source)[0]


def _index_source(source: str) -> tuple[dict[KeyPath, int], dict[KeyPath, int]]:
    """(first line of each key path, last line of each multi-line value)."""
    index: dict[KeyPath, int] = {}
    ends: dict[KeyPath, int] = {}
    open_value: KeyPath | None = None
    table: KeyPath = ()
    grants = -1
    depth = 0
    mstring: str | None = None
    for lineno, line in enumerate(source.split("\n"), 1):  # not splitlines: see _line_count
        if mstring is not None or depth > 0:
            depth, mstring = _scan_value(line, 0, depth, mstring)
            if mstring is None and depth <= 0 and open_value is not None:
                ends.setdefault(open_value, lineno)
                open_value = None
            continue
        m = _ARRAY_HEADER_RE.match(line)
        if m:
            name = _split_key(m.group(1))
            if name == ("grant",):
                grants += 1
                table = ("grant", grants)
            else:
                table = name
            index.setdefault(table, lineno)
            continue
        m = _TABLE_HEADER_RE.match(line)
        if m:
            name = _split_key(m.group(1))
            table = ("grant", grants, *name[1:]) if name[0] == "grant" and grants >= 0 else name
            for i in range(1, len(table) + 1):
                index.setdefault(table[:i], lineno)
            continue
        m = _KEY_LINE_RE.match(line)
        if m:
            full = table + _split_key(m.group(1))
            for i in range(len(table) + 1, len(full) + 1):
                index.setdefault(full[:i], lineno)
            depth, mstring = _scan_value(line, m.end(), 0, None)
            open_value = full if mstring is not None or depth > 0 else None
    return index, ends


def _line_of(index: Mapping[KeyPath, int], path: KeyPath) -> int:
    for i in range(len(path), 0, -1):
        if path[:i] in index:
            return index[path[:i]]
    return 1


def render_key_path(path: KeyPath) -> str:
    """``("grant", 1, "limits", "memory_mb")`` -> ``grant[2].limits.memory_mb``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part + 1}]"
        else:
            text = part if re.fullmatch(_BARE, part) else repr(part[:80])
            out += f".{text}" if out else text
    return out or "(top level)"


class _Loader:
    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.index: dict[KeyPath, int] = {}
        self.ends: dict[KeyPath, int] = {}
        self.lines: list[str] = []

    def fail(
        self, path: KeyPath, problem: str, element: str | None = None, nth: int = 1
    ) -> NoReturn:
        """Raise the one-line error; ``element`` (the ``nth`` one) of an array that spans
        several lines is looked for on the lines of its value."""
        line = _line_of(self.index, path)
        if element is not None and path in self.index:
            seen = 0
            for ln in range(self.index[path], self.ends.get(path, self.index[path]) + 1):
                text = self.lines[ln - 1]
                seen += text.count(f'"{element}"') + text.count(f"'{element}'")
                if seen >= nth:
                    line = ln
                    break
        raise PolicyError(f"policy {self.path}:{line}: {render_key_path(path)}: {problem}")

    def load(self) -> Policy:
        doc, source = parse_toml(self.data, f"policy {self.path}")
        self.index, self.ends = _index_source(source)
        self.lines = source.split("\n")
        self.unknown_keys((), doc, ("defaults", "grant"))
        defaults = Defaults()
        if "defaults" in doc:
            defaults = self.defaults(self.table(("defaults",), doc["defaults"]))
        raw_grants = doc.get("grant", [])
        if not isinstance(raw_grants, list):
            self.fail(("grant",), "must be an array of tables: write each as [[grant]]")
        if len(raw_grants) > MAX_GRANTS:
            self.fail(("grant",), f"more than {MAX_GRANTS} grants")
        grants: list[Grant] = []
        seen: dict[tuple[str, str], Grant] = {}
        for n, raw in enumerate(raw_grants):
            g = self.grant(n, self.table(("grant", n), raw))
            key = (g.signer, g.plugin)
            if key in seen:
                self.fail(
                    ("grant", n, "plugin"),
                    f"a second grant for signer {g.signer[:16]}… and plugin {g.plugin!r}"
                    f" (the first is at line {seen[key].line})",
                )
            seen[key] = g
            grants.append(g)
        return Policy(defaults, tuple(grants), self.path)

    # --- tables ------------------------------------------------------------------------

    def table(self, path: KeyPath, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, "must be a table")
        return value

    def unknown_keys(self, path: KeyPath, table: Mapping[str, Any], known: Iterable[str]) -> None:
        allowed = tuple(known)
        for key in table:
            if key not in allowed:
                self.fail((*path, key), f"unknown key (expected one of: {', '.join(allowed)})")

    def defaults(self, table: dict[str, Any]) -> Defaults:
        self.unknown_keys(("defaults",), table, _DEFAULT_KEYS)
        d = Defaults()
        if "rate_per_s" in table:
            d = replace(d, rate_per_s=self.rate(("defaults", "rate_per_s"), table["rate_per_s"]))
        if "burst" in table:
            d = replace(d, burst=self.integer(("defaults", "burst"), table["burst"], 1, MAX_BURST))
        if "kv_quota_bytes" in table:
            quota = self.integer(
                ("defaults", "kv_quota_bytes"), table["kv_quota_bytes"], 0, MAX_KV_QUOTA
            )
            d = replace(d, kv_quota_bytes=quota)
        return d

    def grant(self, n: int, table: dict[str, Any]) -> Grant:
        base: KeyPath = ("grant", n)
        self.unknown_keys(base, table, _GRANT_KEYS)
        for required in ("signer", "plugin"):
            if required not in table:
                self.fail(base, f"missing required key {required!r}")
        signer = self.string((*base, "signer"), table["signer"])
        if not FINGERPRINT_RE.match(signer):
            self.fail((*base, "signer"), "must be a signer fingerprint: 64 hex digits")
        plugin = self.string((*base, "plugin"), table["plugin"])
        if plugin != WILDCARD and not manifest.NAME_RE.match(plugin):
            self.fail(
                (*base, "plugin"),
                f"{plugin[:80]!r} is neither '*' nor a plugin name (a-z 0-9 . _ -, at most 64)",
            )
        fs_read = tuple(
            self.root((*base, "fs_read"), p) for p in self.strings(table, base, "fs_read")
        )
        fs_write = tuple(
            self.root((*base, "fs_write"), p) for p in self.strings(table, base, "fs_write")
        )
        net: dict[str, tuple[str, int]] = {}
        for text in self.strings(table, base, "net_connect"):
            net[text] = self.hostport((*base, "net_connect"), text)
        networks = tuple(
            self.network((*base, "net_allow_networks"), t)
            for t in self.strings(table, base, "net_allow_networks")
        )
        named = [text for text, (host, _) in net.items() if not _is_ip(host)]
        if named and not networks:
            self.fail(
                (*base, "net_connect"),
                f"{named[0]!r} names a host: list the networks it may resolve to in"
                " net_allow_networks",
                named[0],
            )
        kv = False
        if "kv" in table:
            kv = self.boolean((*base, "kv"), table["kv"])
        quota: int | None = None
        if "kv_quota_bytes" in table:
            quota = self.integer(
                (*base, "kv_quota_bytes"), table["kv_quota_bytes"], 0, MAX_KV_QUOTA
            )
        rate: float | None = None
        if "rate_per_s" in table:
            rate = self.rate((*base, "rate_per_s"), table["rate_per_s"])
        burst: int | None = None
        if "burst" in table:
            burst = self.integer((*base, "burst"), table["burst"], 1, MAX_BURST)
        config = self.config((*base, "config"), table.get("config", {}))
        limits = self.limits((*base, "limits"), table.get("limits", {}))
        return Grant(
            signer=signer.lower(),
            plugin=plugin,
            fs_read=fs_read,
            fs_write=fs_write,
            net_connect=frozenset(net.values()),
            net_allow_networks=networks,
            kv=kv,
            kv_quota_bytes=quota,
            config=config,
            rate_per_s=rate,
            burst=burst,
            limits=limits,
            line=_line_of(self.index, base),
        )

    def config(self, path: KeyPath, value: Any) -> dict[str, str]:
        table = self.table(path, value)
        if len(table) > MAX_CONFIG_KEYS:
            self.fail(path, f"more than {MAX_CONFIG_KEYS} keys")
        out: dict[str, str] = {}
        for key, v in table.items():
            if not manifest.CONFIG_KEY_RE.match(key):
                self.fail((*path, key), "bad config key (A-Z a-z 0-9 _ . -, at most 128)")
            if not isinstance(v, str):
                self.fail((*path, key), f"must be a string, not {_toml_type(v)}")
            if len(v.encode("utf-8", "surrogatepass")) > MAX_CONFIG_VALUE_BYTES:
                self.fail((*path, key), f"longer than {MAX_CONFIG_VALUE_BYTES} bytes")
            out[key] = v
        return out

    def limits(self, path: KeyPath, value: Any) -> dict[str, int]:
        table = self.table(path, value)
        self.unknown_keys(path, table, manifest.LIMIT_BOUNDS)
        out: dict[str, int] = {}
        for key, v in table.items():
            low, high, _ = manifest.LIMIT_BOUNDS[key]
            out[key] = self.integer((*path, key), v, low, high)
        return out

    # --- values --------------------------------------------------------------------------

    def string(self, path: KeyPath, value: Any) -> str:
        if not isinstance(value, str):
            self.fail(path, f"must be a string, not {_toml_type(value)}")
        return value

    def boolean(self, path: KeyPath, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, not {_toml_type(value)}")
        return value

    def integer(self, path: KeyPath, value: Any, low: int, high: int) -> int:
        if type(value) is not int:
            self.fail(path, f"must be an integer, not {_toml_type(value)}")
        if not low <= value <= high:
            self.fail(path, f"{manifest.shown_number(value)} is outside {low}..{high}")
        return value

    def rate(self, path: KeyPath, value: Any) -> float:
        if type(value) not in (int, float):
            self.fail(path, f"must be a number, not {_toml_type(value)}")
        # compared as it is: float() of a 400-digit integer overflows; NaN fails every test
        if not 0 < value <= MAX_RATE:
            self.fail(path, f"{manifest.shown_number(value)} is outside (0, {MAX_RATE}]")
        return float(value)

    def strings(self, table: Mapping[str, Any], base: KeyPath, key: str) -> list[str]:
        path = (*base, key)
        value = table.get(key, [])
        if not isinstance(value, list):
            self.fail(path, f"must be an array of strings, not {_toml_type(value)}")
        if len(value) > MAX_LIST:
            self.fail(path, f"more than {MAX_LIST} entries")
        for v in value:
            if not isinstance(v, str):
                self.fail(path, f"must be an array of strings; found {_toml_type(v)}")
        if len(set(value)) != len(value):
            dup = next(v for i, v in enumerate(value) if v in value[:i])
            self.fail(path, f"{dup[:80]!r} is listed twice", dup, 2)
        return value

    def root(self, path: KeyPath, text: str) -> str:
        problem = path_problem(text)
        if problem:
            self.fail(path, f"{text[:80]!r}: {problem}", text)
        return text

    def hostport(self, path: KeyPath, text: str) -> tuple[str, int]:
        where = render_key_path(path)
        try:
            host, port = manifest.parse_hostport(text, where)
        except ManifestError as e:
            self.fail(path, str(e).removeprefix(f"manifest: {where}: "), text)
        norm = normalize_host(host)
        if norm is None:
            self.fail(path, f"{text[:80]!r}: a numeric host must be a whole IP address", text)
        return norm, port

    def network(self, path: KeyPath, text: str) -> IPNetwork:
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            self.fail(path, f"{text[:80]!r} is not a network (like 10.0.0.0/8): {e}", text)


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


# ---------------------------------------------------------------------------------------
# Effective permissions


@dataclass(frozen=True)
class Effective:
    """What one plugin may do: its manifest's requests intersected with its grant."""

    fs_read: tuple[str, ...] = ()
    fs_write: tuple[str, ...] = ()
    #: the operator's granted roots that hold ``fs_read`` / ``fs_write``: files are opened
    #: beneath these, so that the manifest's part of a path is resolved as strictly as the
    #: plugin's (a symlink there, or a mount, is refused, not followed). Empty: the
    #: ``fs_*`` roots are the operator's own (an Effective made by hand, in tests).
    fs_read_grants: tuple[str, ...] = ()
    fs_write_grants: tuple[str, ...] = ()
    net_connect: frozenset[tuple[str, int]] = frozenset()
    net_allow_networks: tuple[IPNetwork, ...] = ()
    kv: bool = False
    kv_quota_bytes: int = DEFAULT_KV_QUOTA_BYTES
    config: dict[str, str] = field(default_factory=dict)
    rate_per_s: float = DEFAULT_RATE_PER_S
    burst: int = DEFAULT_BURST
    limit_caps: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (for the plan and the launch report); config values are not shown."""
        return {
            "fs.read": list(self.fs_read),
            "fs.write": list(self.fs_write),
            "net.connect": sorted(manifest.format_hostport(h, p) for h, p in self.net_connect),
            "net.allow_networks": [str(n) for n in self.net_allow_networks],
            "kv": self.kv,
            "kv_quota_bytes": self.kv_quota_bytes,
            "config": sorted(self.config),
            "rate_per_s": self.rate_per_s,
            "burst": self.burst,
            "limit_caps": dict(self.limit_caps),
        }


def effective(
    requested: manifest.Permissions, grant: Grant | None, defaults: Defaults
) -> Effective:
    """The manifest's requests ∩ the grant; with no grant, nothing (deny by default)."""
    if grant is None:
        return Effective(
            kv_quota_bytes=defaults.kv_quota_bytes,
            rate_per_s=defaults.rate_per_s,
            burst=defaults.burst,
        )
    net: set[tuple[str, int]] = set()
    for host, port in requested.net_connect:
        norm = normalize_host(host)
        if norm is not None and (norm, port) in grant.net_connect:
            net.add((norm, port))
    fs_read = _granted_paths(requested.fs_read, grant.fs_read)
    fs_write = _granted_paths(requested.fs_write, grant.fs_write)
    return Effective(
        fs_read=fs_read,
        fs_write=fs_write,
        fs_read_grants=_holding_roots(fs_read, grant.fs_read),
        fs_write_grants=_holding_roots(fs_write, grant.fs_write),
        net_connect=frozenset(net),
        net_allow_networks=grant.net_allow_networks if net else (),
        kv=requested.kv and grant.kv,
        kv_quota_bytes=(
            defaults.kv_quota_bytes if grant.kv_quota_bytes is None else grant.kv_quota_bytes
        ),
        config={k: grant.config[k] for k in requested.config if k in grant.config},
        rate_per_s=defaults.rate_per_s if grant.rate_per_s is None else grant.rate_per_s,
        burst=defaults.burst if grant.burst is None else grant.burst,
        limit_caps=dict(grant.limits),
    )


def _granted_paths(requested: Iterable[str], roots: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(
        p
        for p in requested
        if path_problem(p) is None and any(relative_to(p, r) is not None for r in roots)
    )


def _holding_roots(paths: Iterable[str], roots: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(r for r in roots if any(relative_to(p, r) is not None for p in paths))


def effective_to_wire(eff: Effective) -> dict[str, Any]:
    """``eff`` whole, config values included, as JSON for a process of ours (the service
    sends a plugin host its plan); :func:`effective_from_wire` reads it back."""
    return {
        "fs_read": list(eff.fs_read),
        "fs_write": list(eff.fs_write),
        "fs_read_grants": list(eff.fs_read_grants),
        "fs_write_grants": list(eff.fs_write_grants),
        "net_connect": sorted([h, p] for h, p in eff.net_connect),
        "net_allow_networks": [str(n) for n in eff.net_allow_networks],
        "kv": eff.kv,
        "kv_quota_bytes": eff.kv_quota_bytes,
        "config": dict(eff.config),
        "rate_per_s": eff.rate_per_s,
        "burst": eff.burst,
        "limit_caps": dict(eff.limit_caps),
    }


def effective_from_wire(d: Any) -> Effective:
    """The :class:`Effective` of :func:`effective_to_wire`. Raises: WireError naming the
    field that is not what that function writes."""

    def strings(key: str) -> tuple[str, ...]:
        v = d.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise WireError(f"effective.{key}: not a list of strings")
        return tuple(v)

    def mapping(key: str, kind: type) -> dict[str, Any]:
        v = d.get(key)
        if not isinstance(v, dict) or not all(
            isinstance(k, str) and isinstance(x, kind) and not isinstance(x, bool)
            for k, x in v.items()
        ):
            raise WireError(f"effective.{key}: not a table of {kind.__name__}")
        return dict(v)

    if not isinstance(d, dict):
        raise WireError("effective: not a table")
    pairs = d.get("net_connect")
    if not isinstance(pairs, list) or not all(
        isinstance(x, list)
        and len(x) == 2
        and isinstance(x[0], str)
        and isinstance(x[1], int)
        and not isinstance(x[1], bool)
        for x in pairs
    ):
        raise WireError("effective.net_connect: not a list of [host, port]")
    try:
        networks = tuple(ipaddress.ip_network(n) for n in strings("net_allow_networks"))
    except ValueError as e:
        raise WireError(f"effective.net_allow_networks: {e}") from None
    kv: Any = d.get("kv")
    quota: Any = d.get("kv_quota_bytes")
    rate: Any = d.get("rate_per_s")
    burst: Any = d.get("burst")
    if not isinstance(kv, bool):
        raise WireError("effective.kv: not a boolean")
    for key, v in (("kv_quota_bytes", quota), ("burst", burst)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise WireError(f"effective.{key}: not an integer")
    if not isinstance(rate, int | float) or isinstance(rate, bool):
        raise WireError("effective.rate_per_s: not a number")
    return Effective(
        fs_read=strings("fs_read"),
        fs_write=strings("fs_write"),
        fs_read_grants=strings("fs_read_grants"),
        fs_write_grants=strings("fs_write_grants"),
        net_connect=frozenset((h, p) for h, p in pairs),
        net_allow_networks=networks,
        kv=kv,
        kv_quota_bytes=quota,
        config=mapping("config", str),
        rate_per_s=float(rate),
        burst=burst,
        limit_caps=mapping("limit_caps", int),
    )


def effective_as_dict(eff: Effective) -> dict[str, Any]:
    """``eff.as_dict()``: JSON-ready, config keys without their values."""
    return eff.as_dict()


def cap_limits(limits: manifest.Limits, eff: Effective) -> manifest.Limits:
    """Each manifest limit lowered to the grant's cap (``min(manifest, cap)``)."""
    capped = {k: min(v, eff.limit_caps.get(k, v)) for k, v in limits.as_dict().items()}
    return manifest.Limits(**capped)


# ---------------------------------------------------------------------------------------
# Decisions the broker asks for


@dataclass(frozen=True)
class Decision:
    """An answer and the reason the audit log records."""

    allowed: bool
    reason: str


def _allow(reason: str) -> Decision:
    return Decision(True, reason)


def _deny(reason: str) -> Decision:
    return Decision(False, reason)


def _show(text: str) -> str:
    return repr(text[:80]) + ("…" if len(text) > 80 else "")


def path_problem(path: str) -> str | None:
    """Why ``path`` is not an absolute, normalised path, or ``None`` when it is."""
    if "\x00" in path:
        return "contains NUL"
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return f"longer than {MAX_PATH_BYTES} bytes"
    if not path.startswith("/"):
        return "not absolute"
    if path != "/" and path.endswith("/"):
        return "ends with '/'"
    if "//" in path:
        return "contains '//'"
    parts = path.split("/")
    if ".." in parts:
        return "contains a '..' component"
    if "." in parts:
        return "contains a '.' component"
    return None


def relative_to(path: str, root: str) -> str | None:
    """The remainder of normalised ``path`` under ``root`` (``"."`` for the root itself),
    compared component-wise; ``None`` when ``path`` is not under ``root``."""
    if path == root:
        return "."
    if root == "/":
        return path[1:]
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return None


def check_fs(eff: Effective, path: str, write: bool) -> tuple[Decision, str | None, str | None]:
    """May the plugin open ``path`` (for writing when ``write``)?

    Returns (decision, root, relative): on allow, the operator's granted root holding the
    path (the most specific) and the path relative to it (never empty: ``"."`` is the root
    itself), for the broker's ``openat2(root_fd, relative, RESOLVE_BENEATH | ...)``: the
    part of the path the manifest chose is resolved beneath the operator's root like the
    rest, so a symlink or a mount in it is refused, not followed. The manifest's own root
    decides whether the path is allowed at all. On deny, (decision, None, None). The path
    must already be absolute and normalised: no ``..``, ``.``, ``//``, trailing ``/``, NUL,
    nor more than 4096 bytes.
    """
    mode = "write" if write else "read"
    problem = path_problem(path)
    if problem:
        return _deny(f"fs {mode}: {_show(path)}: {problem}"), None, None
    best: tuple[str, str] | None = None
    for root in eff.fs_write if write else eff.fs_read:
        rel = relative_to(path, root)
        if rel is not None and (best is None or len(root) > len(best[0])):
            best = (root, rel)
    if best is None:
        return _deny(f"fs {mode}: {_show(path)} is not under a granted {mode} root"), None, None
    root, rel = best
    # Opened from the operator's root holding the manifest's (the most specific one).
    holding = [
        (g, r)
        for g in (eff.fs_write_grants if write else eff.fs_read_grants)
        if relative_to(root, g) is not None and (r := relative_to(path, g)) is not None
    ]
    opened_from, rel = max(holding, key=lambda gr: len(gr[0]), default=(root, rel))
    return _allow(f"fs {mode}: under granted root {root}"), opened_from, rel


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalize_host(host: str) -> str | None:
    """An IP literal in normalised form (``[v6]`` accepted), a host name in lowercase, or
    ``None`` when ``host`` is neither (a name whose last label is all digits, like
    ``127.1``, is refused: resolvers read it as an address)."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    # Match before lower(): non-ASCII letters (the Kelvin sign) must not lower into ASCII.
    if not manifest.HOSTNAME_RE.match(host) or host.rsplit(".", 1)[-1].isdigit():
        return None
    return host.lower()


def check_net(eff: Effective, host: str, port: int) -> Decision:
    """May the plugin connect to ``host:port``? Exact match against the effective grant."""
    norm = normalize_host(host)
    if norm is None:
        return _deny(f"net: {_show(host)} is not a host name or IP address")
    if not 1 <= port <= 65535:
        return _deny(f"net: port {port} is out of range 1-65535")
    target = manifest.format_hostport(norm, port)
    if (norm, port) not in eff.net_connect:
        return _deny(f"net: {target} is not granted")
    return _allow(f"net: {target} is granted")


def check_resolved(eff: Effective, host: str, addresses: list[str]) -> Decision:
    """Are the addresses the broker resolved ``host`` to all acceptable?

    An IP-literal grant: every address must be that address. A name: every address must lie
    in ``net_allow_networks``. Any other address denies the whole connection, naming it.
    """
    norm = normalize_host(host)
    if norm is None or not any(h == norm for h, _ in eff.net_connect):
        return _deny(f"net: {_show(host)} is not granted")
    if not addresses:
        return _deny(f"net: {norm} resolved to no address")
    literal = ipaddress.ip_address(norm) if _is_ip(norm) else None
    for text in addresses:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return _deny(f"net: {norm} resolved to {_show(text)}, not an IP address")
        if literal is not None:
            if addr != literal:
                return _deny(f"net: {norm} resolved to {addr}, not the granted address")
        elif not any(addr in net for net in eff.net_allow_networks):
            return _deny(f"net: {norm} resolved to {addr}, outside net_allow_networks")
    return _allow(f"net: {norm} resolved inside the grant")


def check_config(eff: Effective, key: str) -> Decision:
    """May the plugin read config ``key``? (The value is ``eff.config[key]``.)"""
    if key in eff.config:
        return _allow(f"config: {_show(key)} is granted")
    return _deny(f"config: {_show(key)} is not granted")


def check_kv(eff: Effective) -> Decision:
    """May the plugin use its key-value store?"""
    if eff.kv:
        return _allow("kv: granted")
    return _deny("kv: not granted")


class RateLimiter:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` per second of ``clock``.

    Starts full. A clock that steps backwards refills nothing.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(rate) and rate > 0) or burst < 1:
            raise ValueError(f"rate {rate} and burst {burst} must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def allow(self, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if the bucket holds them."""
        now = self._clock()
        if now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
        # The epsilon forgives float drift: 0.05 s + 0.05 s at 10/s must make one token.
        if self._tokens + _EPSILON >= cost:
            self._tokens = max(0.0, self._tokens - cost)
            return True
        return False


__all__ = [
    "Decision",
    "Defaults",
    "Effective",
    "Grant",
    "Policy",
    "RateLimiter",
    "cap_limits",
    "check_config",
    "check_fs",
    "check_kv",
    "check_net",
    "check_resolved",
    "effective",
    "effective_as_dict",
    "effective_from_wire",
    "effective_to_wire",
    "index_key_lines",
    "normalize_host",
    "path_problem",
    "relative_to",
]
