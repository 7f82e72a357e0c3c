"""The control socket's protocol, and its client (the CLI's service commands).

A Unix stream socket (default ``/run/forgeone/control.sock``); JSON lines; one request, one
response, in order, any number per connection. Every request is one JSON object on one line
(UTF-8, at most :data:`MAX_REQUEST_BYTES`) with an ``op`` and the op's fields, nothing else
(each once; a string, a number or a boolean, never an array or object):

=============  ==========================================================================
op             fields (``name`` is a plugin name)
=============  ==========================================================================
ping           -
install        ``package_b64`` (the .forgepkg, base64) or ``path`` (root peers only);
               ``allow_downgrade`` bool; ``restart`` "no" | "on-failure"; ``max_restarts``
uninstall      name
list           -
start          name
stop           name
pause          name
resume         name
call           name; ``input`` (text) or ``input_b64``
logs           name; ``n`` (lines, default 100)
audit          name; ``n`` (records, default 20)
metrics        -
=============  ==========================================================================

Responses: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "<one line>",
"status": 2}`` where ``status`` is the exit status the CLI uses (2 bad input, 1 otherwise).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from forgeone_isolate.config import DEFAULT_SOCKET
from forgeone_isolate.errors import EXIT_BAD_INPUT, EXIT_PLUGIN_FAILED, IsolateError
from forgeone_isolate.manifest import NAME_RE, refusing_duplicate_keys
from forgeone_isolate.package import MAX_PACKAGE_BYTES

#: a request line, newline included: a base64 package of MAX_PACKAGE_BYTES and room to spare
MAX_REQUEST_BYTES: Final = (MAX_PACKAGE_BYTES * 4) // 3 + 64 * 1024
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
MAX_CALL_INPUT: Final = 60 * 1024
MAX_TAIL: Final = 10_000
SOCKET_ENV: Final = "FORGEONE_SOCKET"
#: strings (keys and values) in one request: every op's fields and values fit in 12
MAX_REQUEST_STRINGS: Final = 16
#: a JSON string (skipped whole), a bracket, or a quote that opens no whole string
_SHAPE_TOKEN_RE: Final = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{}]|"', re.S)

_NAME: Final = (str, True)
#: op -> field -> (type, required)
OPS: Final[dict[str, dict[str, tuple[type, bool]]]] = {
    "ping": {},
    "install": {
        "package_b64": (str, False),
        "path": (str, False),
        "allow_downgrade": (bool, False),
        "restart": (str, False),
        "max_restarts": (int, False),
    },
    "uninstall": {"name": _NAME},
    "list": {},
    "start": {"name": _NAME},
    "stop": {"name": _NAME},
    "pause": {"name": _NAME},
    "resume": {"name": _NAME},
    "call": {"name": _NAME, "input": (str, False), "input_b64": (str, False)},
    "logs": {"name": _NAME, "n": (int, False)},
    "audit": {"name": _NAME, "n": (int, False)},
    "metrics": {},
}


class RequestError(IsolateError):
    """Raised when a control request is malformed (answered, never fatal to the service)."""

    exit_status = EXIT_BAD_INPUT


class ServiceError(IsolateError):
    """Raised by :class:`Client` when the service answers with an error."""

    def __init__(self, message: str, status: int = EXIT_PLUGIN_FAILED) -> None:
        super().__init__(message)
        self.exit_status = status if status in (EXIT_BAD_INPUT, EXIT_PLUGIN_FAILED) else 1


class ServiceUnavailable(IsolateError):
    """Raised by :class:`Client` when the control socket cannot be reached."""


@dataclass(frozen=True)
class Request:
    """One validated request."""

    op: str
    fields: dict[str, Any]

    @property
    def name(self) -> str:
        """The plugin name (ops that take one)."""
        return str(self.fields["name"])

    def input_bytes(self) -> bytes:
        """``call``'s input as bytes. Raises: RequestError."""
        if "input_b64" in self.fields:
            return b64decode(self.fields["input_b64"], "input_b64", MAX_CALL_INPUT)
        data = str(self.fields.get("input", "")).encode("utf-8", "surrogatepass")
        if len(data) > MAX_CALL_INPUT:
            raise RequestError(f"input: more than {MAX_CALL_INPUT} bytes")
        return data


def b64decode(text: str, what: str, limit: int) -> bytes:
    """Strict base64. Raises: RequestError."""
    if len(text) > (limit * 4) // 3 + 8:
        raise RequestError(f"{what}: more than {limit} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: not valid base64") from None
    if len(data) > limit:
        raise RequestError(f"{what}: more than {limit} bytes")
    return data


def _check_shape(text: str) -> None:
    """Refuse a request json.loads would build a mountain of objects from, before it runs:
    every field is a string, a number or a boolean, so nothing nests in the one object, and
    there are at most MAX_REQUEST_STRINGS strings (a 44 MB line of ``[{},{},...]`` is a
    gigabyte of dicts). Malformed JSON it leaves to json.loads. Raises: RequestError."""
    if text.count('"') <= 2 * MAX_REQUEST_STRINGS and text.count("[") + text.count("{") <= 1:
        return  # the usual request, a 44 MB package's too: counting is 10 times faster
    depth = 0
    strings = 0
    for m in _SHAPE_TOKEN_RE.finditer(text):
        char = text[m.start()]
        if m.end() - m.start() > 1:  # a whole string
            strings += 1
            if strings > MAX_REQUEST_STRINGS:
                raise RequestError(f"request has more than {MAX_REQUEST_STRINGS} strings")
        elif char in "[{":
            depth += 1
            if depth > 1:
                raise RequestError(
                    "request must be one flat JSON object: a field is an array or object"
                )
        elif char in "]}":
            depth -= 1
            if depth < 0:
                return
        else:  # an unterminated string
            return


_no_duplicates = refusing_duplicate_keys(
    lambda key: RequestError(f"request gives the field {key[:40]!r} twice")
)


def parse_request(line: bytes) -> Request:
    """Validate one request line (without or with its newline). Raises: RequestError."""
    if len(line) > MAX_REQUEST_BYTES:
        raise RequestError(f"request larger than {MAX_REQUEST_BYTES} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("request is not UTF-8") from None
    _check_shape(text)
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise RequestError("request is not valid JSON (one object per line)") from None
    if not isinstance(obj, dict):
        raise RequestError("request must be a JSON object")
    op = obj.get("op")
    if not isinstance(op, str) or op not in OPS:
        shown = op[:40] if isinstance(op, str) else type(op).__name__
        raise RequestError(f"unknown op {shown!r} (known: {', '.join(OPS)})")
    schema = OPS[op]
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        if key == "op":
            continue
        if key not in schema:
            raise RequestError(f"{op}: unknown field {str(key)[:40]!r}")
        want, _ = schema[key]
        if want is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"{op}: {key} must be an integer")
        if not isinstance(value, want):
            raise RequestError(f"{op}: {key} must be {want.__name__}")
        fields[key] = value
    for key, (_, required) in schema.items():
        if required and key not in fields:
            raise RequestError(f"{op}: {key} is required")
    if "name" in fields and not NAME_RE.match(fields["name"]):
        raise RequestError(f"{op}: not a plugin name: {fields['name'][:80]!r}")
    if "n" in fields and not 1 <= fields["n"] <= MAX_TAIL:
        raise RequestError(f"{op}: n must be in 1..{MAX_TAIL}")
    if op == "install" and ("package_b64" in fields) == ("path" in fields):
        raise RequestError("install: give exactly one of package_b64 and path")
    if op == "call" and "input" in fields and "input_b64" in fields:
        raise RequestError("call: give input or input_b64, not both")
    return Request(op, fields)


def encode(obj: Any) -> bytes:
    """One JSON line."""
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


def ok(result: Any) -> bytes:
    """A success response line."""
    return encode({"ok": True, "result": result})


def error(message: str, status: int = EXIT_PLUGIN_FAILED) -> bytes:
    """An error response line (``message`` is kept to one line)."""
    one_line = " ".join(message.split())[:2000]
    return encode({"ok": False, "error": one_line, "status": status})


def default_socket() -> Path:
    """``$FORGEONE_SOCKET`` or /run/forgeone/control.sock."""
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


class Client:
    """A connection to the service. Raises: ServiceUnavailable from the constructor."""

    def __init__(self, path: Path | None = None, timeout: float | None = 120.0) -> None:
        self.path = path or default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except FileNotFoundError:
            self._sock.close()
            raise ServiceUnavailable(
                f"no service at {self.path} (is `serve` running? --socket names another)"
            ) from None
        except PermissionError:
            self._sock.close()
            raise ServiceUnavailable(
                f"permission denied: {self.path} (root or the configured group only)"
            ) from None
        except OSError as e:
            self._sock.close()
            raise ServiceUnavailable(f"cannot connect to {self.path}: {e.strerror or e}") from None
        self._reader = self._sock.makefile("rb")

    def request(self, op: str, **fields: Any) -> Any:
        """Send one request, return its ``result``. Raises: ServiceError, ServiceUnavailable."""
        line = encode({"op": op, **fields})
        try:
            self._sock.sendall(line)
            reply = self._reader.readline(MAX_RESPONSE_BYTES + 1)
        except OSError as e:
            raise ServiceUnavailable(f"{self.path}: connection failed: {e.strerror or e}") from None
        if not reply:
            raise ServiceUnavailable(f"{self.path}: the service closed the connection")
        try:
            obj = json.loads(reply)
        except ValueError:
            raise ServiceUnavailable(f"{self.path}: the reply is not JSON") from None
        if not isinstance(obj, dict):
            raise ServiceUnavailable(f"{self.path}: the reply is not a JSON object")
        if obj.get("ok") is True:
            return obj.get("result")
        status = obj.get("status")
        raise ServiceError(
            str(obj.get("error", "unknown error")),
            status if isinstance(status, int) else EXIT_PLUGIN_FAILED,
        )

    def send_raw(self, data: bytes) -> dict[str, Any] | None:
        """Send bytes as they are and read one reply line (tests of malformed requests)."""
        self._sock.sendall(data)
        reply = self._reader.readline(MAX_RESPONSE_BYTES + 1)
        if not reply:
            return None
        obj = json.loads(reply)
        return obj if isinstance(obj, dict) else None

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(OSError):
            self._reader.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


__all__ = [
    "MAX_REQUEST_BYTES",
    "OPS",
    "Client",
    "Request",
    "RequestError",
    "ServiceError",
    "ServiceUnavailable",
    "default_socket",
    "encode",
    "error",
    "ok",
    "parse_request",
]
