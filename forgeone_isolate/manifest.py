"""manifest.json: bounded parsing and the schema (ARCHITECTURE.md, "Manifest").

The manifest is parsed only after its signature has been checked (see ``package``), but the
parser still treats it as hostile: a size bound, a nesting bound checked before the JSON
parser recurses, duplicate keys refused (a parser differential), no NaN/Infinity, unknown
keys refused, every value range-checked.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from forgeone_isolate import abi
from forgeone_isolate.errors import ManifestError
from forgeone_isolate.semver import Range, SemverError, Version

MAX_MANIFEST_BYTES: Final = 64 * 1024
MAX_DEPTH: Final = 6
MAX_FILES: Final = 64
MAX_LIST: Final = 64

# Patterns end in \Z, not $: $ also matches before a trailing newline.
NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
#: member paths: components start with an alphanumeric or '_', so '.', '..' and hidden
#: files are impossible by construction.
MEMBER_RE: Final = re.compile(
    r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}){0,7}\Z"
)
SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}\Z")
CONFIG_KEY_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
HOSTNAME_RE: Final = re.compile(
    r"^(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)

MANIFEST_NAME: Final = "manifest.json"
SIGNATURE_NAME: Final = "manifest.sig"
RESERVED_MEMBERS: Final = frozenset({MANIFEST_NAME, SIGNATURE_NAME})

#: limit -> (minimum, maximum, default when the manifest omits it)
LIMIT_BOUNDS: Final[dict[str, tuple[int, int, int]]] = {
    "memory_mb": (1, 4096, 64),
    "cpu_percent": (1, 400, 100),
    "pids": (1, 1024, 1),
    "io_bps": (4096, 10 * 1024**3, 10 * 1024**2),
    "net_bps": (8000, 10 * 1000**3, 1000**2),
    "timeout_s": (1, 86400, 30),
}
PERMISSION_KEYS: Final = ("fs.read", "fs.write", "net.connect", "kv", "config")
TOP_KEYS: Final = frozenset(
    {"name", "version", "abi", "entry", "files", "permissions", "limits", "dependencies"}
)


@dataclass(frozen=True)
class Permissions:
    """What the plugin asks for; the operator's policy decides what it gets."""

    fs_read: tuple[str, ...] = ()
    fs_write: tuple[str, ...] = ()
    net_connect: tuple[tuple[str, int], ...] = ()
    kv: bool = False
    config: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The manifest spelling of these permissions."""
        return {
            "fs.read": list(self.fs_read),
            "fs.write": list(self.fs_write),
            "net.connect": [format_hostport(h, p) for h, p in self.net_connect],
            "kv": self.kv,
            "config": list(self.config),
        }


@dataclass(frozen=True)
class Limits:
    """Resource limits the plugin declares (each within LIMIT_BOUNDS)."""

    memory_mb: int = LIMIT_BOUNDS["memory_mb"][2]
    cpu_percent: int = LIMIT_BOUNDS["cpu_percent"][2]
    pids: int = LIMIT_BOUNDS["pids"][2]
    io_bps: int = LIMIT_BOUNDS["io_bps"][2]
    net_bps: int = LIMIT_BOUNDS["net_bps"][2]
    timeout_s: int = LIMIT_BOUNDS["timeout_s"][2]

    def as_dict(self) -> dict[str, int]:
        """The manifest spelling of these limits."""
        return {k: int(getattr(self, k)) for k in LIMIT_BOUNDS}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``raw`` holds the exact bytes the signature covers."""

    name: str
    version: Version
    abi: int
    entry: str
    files: Mapping[str, str]
    permissions: Permissions
    limits: Limits
    dependencies: Mapping[str, Range] = field(default_factory=dict)
    raw: bytes = b""

    def as_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data."""
        out: dict[str, Any] = {
            "name": self.name,
            "version": str(self.version),
            "abi": self.abi,
            "entry": self.entry,
            "files": dict(self.files),
            "permissions": self.permissions.as_dict(),
            "limits": self.limits.as_dict(),
        }
        if self.dependencies:
            out["dependencies"] = {k: r.text for k, r in self.dependencies.items()}
        return out


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def shown_number(value: float) -> str:
    """``value`` for an error line: an integer of more than 24 digits is cut short, so a
    hostile file of 4000 digits does not fill the line."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}…({len(text.lstrip('-'))} digits)"


def check_depth(data: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than ``max_depth`` before any recursive parser sees it.

    Raises: ManifestError.
    """
    depth = 0
    in_string = False
    escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                raise ManifestError(f"manifest: JSON nested deeper than {max_depth} levels")
        elif byte in (0x5D, 0x7D):
            depth -= 1


def refusing_duplicate_keys(
    refuse: Callable[[str], Exception],
) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json.loads`` ``object_pairs_hook`` that raises ``refuse(key)`` for a key given
    twice in one object (which one would count is a parser's choice: refuse the doubt)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise refuse(key)
            out[key] = value
        return out

    return hook


_no_duplicates = refusing_duplicate_keys(lambda k: ManifestError(f"manifest: duplicate key {k!r}"))


def _no_constants(token: str) -> Any:
    raise ManifestError(f"manifest: {token} is not allowed")


def load_json(data: bytes, what: str = "manifest") -> Any:
    """Parse bounded, strict JSON. Raises: ManifestError."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{what}: {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    check_depth(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{what}: not UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{what}: not JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except ValueError as e:  # an integer beyond sys.get_int_max_str_digits() digits
        raise ManifestError(f"{what}: not acceptable JSON: {str(e)[:80]}") from None
    except RecursionError:  # pragma: no cover - check_depth makes this unreachable
        raise ManifestError(f"{what}: JSON nested too deep") from None


def parse_manifest(data: bytes, *, require_files: bool = True) -> Manifest:
    """Validate ``data`` (manifest.json bytes) against the schema.

    ``require_files=False`` is for ``pack``, whose source manifest has no ``files`` yet.

    Raises: ManifestError naming the offending key.
    """
    obj = load_json(data)
    if not isinstance(obj, dict):
        raise ManifestError("manifest: top level must be a JSON object")
    unknown = sorted(set(obj) - TOP_KEYS)
    if unknown:
        raise ManifestError(f"manifest: unknown key {unknown[0]!r}")
    for key in ("name", "version", "abi", "entry"):
        if key not in obj:
            raise ManifestError(f"manifest: missing required key {key!r}")

    name = obj["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ManifestError(
            "manifest: 'name' must be 1-64 chars of a-z 0-9 . _ - starting with a letter or digit"
        )
    if not isinstance(obj["version"], str):
        raise ManifestError("manifest: 'version' must be a string")
    try:
        version = Version.parse(obj["version"])
    except SemverError as e:
        raise ManifestError(f"manifest: 'version': {e}") from None
    abi_v = obj["abi"]
    if type(abi_v) is not int:
        raise ManifestError("manifest: 'abi' must be an integer")
    if abi_v != abi.ABI_VERSION:
        raise ManifestError(
            f"manifest: unsupported ABI version {abi_v} (this supervisor speaks {abi.ABI_VERSION})"
        )
    entry = obj["entry"]
    if not isinstance(entry, str) or not MEMBER_RE.match(entry) or not entry.endswith(".wasm"):
        raise ManifestError("manifest: 'entry' must be a relative member path ending in .wasm")

    files: dict[str, str] = {}
    if "files" in obj:
        files = _parse_files(obj["files"])
        if entry not in files:
            raise ManifestError(f"manifest: entry {entry!r} is not listed in 'files'")
    elif require_files:
        raise ManifestError("manifest: missing required key 'files'")

    permissions = _parse_permissions(obj.get("permissions", {}))
    limits = _parse_limits(obj.get("limits", {}))
    dependencies = _parse_dependencies(obj.get("dependencies", {}), name)
    return Manifest(name, version, abi_v, entry, files, permissions, limits, dependencies, data)


def _parse_files(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ManifestError("manifest: 'files' must be an object {path: sha256}")
    if not value:
        raise ManifestError("manifest: 'files' is empty")
    if len(value) > MAX_FILES:
        raise ManifestError(f"manifest: 'files' lists {len(value)} files, more than {MAX_FILES}")
    out: dict[str, str] = {}
    for path, digest in value.items():
        if not MEMBER_RE.match(path):
            raise ManifestError(f"manifest: 'files': bad path {path[:80]!r}")
        if path in RESERVED_MEMBERS:
            raise ManifestError(f"manifest: 'files' may not list {path!r}")
        if not isinstance(digest, str) or not SHA256_RE.match(digest):
            raise ManifestError(f"manifest: 'files': {path!r} needs a lowercase hex sha256")
        out[path] = digest
    return out


def _string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"manifest: 'permissions.{key}' must be a list of strings")
    if len(value) > MAX_LIST:
        raise ManifestError(f"manifest: 'permissions.{key}' has more than {MAX_LIST} entries")
    if len(set(value)) != len(value):
        raise ManifestError(f"manifest: 'permissions.{key}' lists an entry twice")
    return list(value)


def check_abs_path(path: str, where: str) -> str:
    """An absolute, normalised path: no '.', '..', '//', trailing '/', NUL. Raises: ManifestError."""
    if (
        not path.startswith("/")
        or "\x00" in path
        or len(path) > 4096
        or (path != "/" and path.endswith("/"))
        or "//" in path
        or any(part in (".", "..") for part in path.split("/"))
    ):
        raise ManifestError(f"manifest: {where}: {path[:80]!r} is not a normalised absolute path")
    return path


def parse_hostport(text: str, where: str) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` for IPv6). Raises: ManifestError."""
    m = re.match(r"^(\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})\Z", text)
    if m is None:
        raise ManifestError(f"manifest: {where}: {text[:80]!r} is not host:port")
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise ManifestError(f"manifest: {where}: port {port} out of range 1-65535")
    if m.group("v6"):
        try:
            host = str(ipaddress.IPv6Address(m.group("v6")))
        except ValueError:
            raise ManifestError(f"manifest: {where}: bad IPv6 address in {text[:80]!r}") from None
    else:
        host = m.group("host")
        if not HOSTNAME_RE.match(host):  # before lower(): 'K' (Kelvin sign) lowers to 'k'
            raise ManifestError(f"manifest: {where}: bad host name in {text[:80]!r}")
        host = host.lower()
    return host, port


def _parse_permissions(value: Any) -> Permissions:
    if not isinstance(value, dict):
        raise ManifestError("manifest: 'permissions' must be an object")
    unknown = sorted(set(value) - set(PERMISSION_KEYS))
    if unknown:
        raise ManifestError(f"manifest: unknown permission {unknown[0]!r}")
    fs_read = tuple(
        check_abs_path(p, "permissions.fs.read")
        for p in _string_list(value.get("fs.read", []), "fs.read")
    )
    fs_write = tuple(
        check_abs_path(p, "permissions.fs.write")
        for p in _string_list(value.get("fs.write", []), "fs.write")
    )
    net = tuple(
        parse_hostport(p, "permissions.net.connect")
        for p in _string_list(value.get("net.connect", []), "net.connect")
    )
    kv = value.get("kv", False)
    if not isinstance(kv, bool):
        raise ManifestError("manifest: 'permissions.kv' must be true or false")
    config = _string_list(value.get("config", []), "config")
    for key in config:
        if not CONFIG_KEY_RE.match(key):
            raise ManifestError(f"manifest: 'permissions.config': bad key {key[:80]!r}")
    return Permissions(fs_read, fs_write, net, kv, tuple(config))


def _parse_limits(value: Any) -> Limits:
    if not isinstance(value, dict):
        raise ManifestError("manifest: 'limits' must be an object")
    unknown = sorted(set(value) - set(LIMIT_BOUNDS))
    if unknown:
        raise ManifestError(f"manifest: unknown limit {unknown[0]!r}")
    out: dict[str, int] = {}
    for key, (low, high, default) in LIMIT_BOUNDS.items():
        v = value.get(key, default)
        if type(v) is not int:
            raise ManifestError(f"manifest: 'limits.{key}' must be an integer")
        if not low <= v <= high:
            raise ManifestError(
                f"manifest: 'limits.{key}' = {shown_number(v)} is outside {low}..{high}"
            )
        out[key] = v
    return Limits(**out)


def _parse_dependencies(value: Any, own_name: str) -> dict[str, Range]:
    if not isinstance(value, dict):
        raise ManifestError("manifest: 'dependencies' must be an object {name: range}")
    if len(value) > MAX_LIST:
        raise ManifestError(f"manifest: more than {MAX_LIST} dependencies")
    out: dict[str, Range] = {}
    for name, spec in value.items():
        if not NAME_RE.match(name):
            raise ManifestError(f"manifest: 'dependencies': bad plugin name {name[:80]!r}")
        if name == own_name:
            raise ManifestError("manifest: a plugin cannot depend on itself")
        if not isinstance(spec, str):
            raise ManifestError(f"manifest: 'dependencies.{name}' must be a range string")
        try:
            out[name] = Range.parse(spec)
        except SemverError as e:
            raise ManifestError(f"manifest: 'dependencies.{name}': {e}") from None
    return out


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """The one serialisation ``pack`` writes: sorted keys, two-space indent, ASCII, newline."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()
