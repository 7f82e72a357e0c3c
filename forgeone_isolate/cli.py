"""The command line: ``python -m forgeone_isolate <command>`` (ARCHITECTURE.md).

Every failure is one line on stderr and an exit status: 0 ok, 1 the plugin failed or was
killed (or the host could not build the sandbox), 2 bad input. No traceback reaches the
user unless FORGEONE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from forgeone_isolate.errors import EXIT_BAD_INPUT, EXIT_OK, IsolateError, UsageError

PROG = "forgeone-isolate"

#: commands of ARCHITECTURE.md that later issues build; they say so and exit 2.
NOT_BUILT: dict[str, str] = {}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = _Parser(prog=PROG, description="Isolation supervisor for WebAssembly plugins.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("keygen", help="create an ed25519 signing key pair")
    s.add_argument(
        "--out", type=Path, required=True, help="directory for signer.key and signer.pub"
    )

    s = sub.add_parser("pack", help="validate, sign and pack a plugin directory")
    s.add_argument("src", type=Path, help="directory with manifest.json and plugin.wasm/.wat")
    s.add_argument("--key", type=Path, required=True, help="private key (signer.key)")
    s.add_argument("--out", type=Path, required=True, help="output .forgepkg")

    s = sub.add_parser("verify", help="attest a package against a trust store")
    s.add_argument("package", type=Path)
    s.add_argument("--trust", type=Path, required=True, help="key file or trust directory")

    s = sub.add_parser("inspect", help="show a package's manifest (not attested)")
    s.add_argument("package", type=Path)
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("launch", help="verify and run a plugin isolated, once")
    s.add_argument("package", type=Path)
    s.add_argument("--trust", type=Path, required=True, help="key file or trust directory")
    s.add_argument("--policy", type=Path, help="operator policy (TOML)")
    s.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/forgeone)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")
    s.add_argument("--dry-run", action="store_true", help="print the sandbox plan, run nothing")

    s = sub.add_parser("metrics", help="per-plugin metrics, Prometheus text exposition")
    s.add_argument(
        "--state-dir",
        type=Path,
        help="read the state directory instead of asking the service (default: the service,"
        " or /var/lib/forgeone when no service listens)",
    )
    s.add_argument(
        "--socket",
        type=Path,
        help="control socket (default $FORGEONE_SOCKET or /run/forgeone/control.sock)",
    )

    s = sub.add_parser("doctor", help="what this host offers for isolation")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser(
        "audit",
        help="audit log tools: `audit verify FILE`, or `audit NAME` (a plugin's, from the service)",
    )
    s.add_argument(
        "audit_args",
        nargs="*",
        metavar="ARG",
        help="`verify FILE`: check a log's hash chain; `NAME`: the service's tail of it",
    )
    s.add_argument("-n", type=int, default=20, help="records to show (NAME form)")
    s.add_argument("--json", action="store_true", help="print the service's answer as JSON")
    s.add_argument(
        "--socket",
        type=Path,
        help="control socket (default $FORGEONE_SOCKET or /run/forgeone/control.sock)",
    )

    _add_service_parsers(sub)
    for name, text in NOT_BUILT.items():
        s = sub.add_parser(name, help=f"{text} (not built yet)")
        s.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _cmd_keygen(args: argparse.Namespace, out: TextIO) -> int:
    from forgeone_isolate import signing

    pair = signing.keygen(args.out)
    print(f"private key: {pair.private_path} (0600)", file=out)
    print(f"public key:  {pair.public_path}", file=out)
    print(f"signer fingerprint: {pair.fingerprint}", file=out)
    return EXIT_OK


def _cmd_pack(args: argparse.Namespace, out: TextIO) -> int:
    from forgeone_isolate import package, signing

    key = signing.load_private_key(args.key)
    data = package.build_package(args.src, key)
    package.write_atomic(args.out, data)
    unverified = package.inspect_bytes(data)
    print(
        f"packed {unverified.manifest.name} {unverified.manifest.version} -> {args.out}"
        f" ({len(data)} bytes, sha256 {unverified.digest})",
        file=out,
    )
    print(f"signer fingerprint: {unverified.claimed_signer}", file=out)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    from forgeone_isolate import package, signing

    trust = signing.TrustStore.load(args.trust)
    pkg = package.verify_file(args.package, trust)
    m = pkg.manifest
    print(
        f"OK: {m.name} {m.version} (abi {m.abi}) signed by {pkg.signer};"
        f" {len(pkg.files)} file(s) match their sha256",
        file=out,
    )
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    from forgeone_isolate import package

    info = package.inspect_bytes(package.read_bounded_file(args.package))
    m = info.manifest
    if args.json:
        json.dump(
            {
                "attested": False,
                "package_sha256": info.digest,
                "signer": info.claimed_signer,
                "sizes": info.sizes,
                "manifest": m.as_dict(),
            },
            out,
            indent=2,
            sort_keys=True,
        )
        out.write("\n")
        return EXIT_OK
    rows: list[tuple[str, str]] = [
        ("name", m.name),
        ("version", str(m.version)),
        ("abi", str(m.abi)),
        ("entry", m.entry),
        ("signer (claimed)", info.claimed_signer),
        ("package sha256", info.digest),
    ]
    rows += [(f"file {k}", f"{v} bytes") for k, v in info.sizes.items()]
    perms = m.permissions.as_dict()
    rows += [(f"permission {k}", json.dumps(v)) for k, v in perms.items()]
    rows += [(f"limit {k}", str(v)) for k, v in m.limits.as_dict().items()]
    rows += [(f"depends on {k}", r.text) for k, r in m.dependencies.items()]
    width = max(len(r[0]) for r in rows)
    print("NOT ATTESTED: run `verify --trust` before trusting any of this", file=out)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=out)
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    from forgeone_isolate import doctor

    return doctor.run_doctor(as_json=args.json, out=out)


def _cmd_launch(args: argparse.Namespace, out: TextIO) -> int:
    from forgeone_isolate import launch

    return launch.cli_launch(args, out)


def _cmd_audit(args: argparse.Namespace, out: TextIO) -> int:
    """``audit verify FILE``: 0 intact, 1 tampered (line and reason), 2 unreadable.

    ``audit NAME``: the service's tail of the plugin's audit log and its chain status.
    """
    from forgeone_isolate import audit
    from forgeone_isolate.errors import EXIT_PLUGIN_FAILED, BadInputError

    rest: list[str] = args.audit_args
    if len(rest) == 1 and rest[0] != "verify":
        return _client_audit(args, rest[0], out)
    if len(rest) != 2 or rest[0] != "verify":
        raise UsageError("audit: an action is required: verify FILE (or a plugin NAME)")
    file = Path(rest[1])
    try:
        result = audit.verify(file)
    except OSError as e:
        raise BadInputError(f"audit log {file}: cannot read: {e.strerror or e}") from None
    if result.ok:
        print(f"OK: {file}: {result.reason}", file=out)
        return EXIT_OK
    print(
        f"TAMPERED: {file}: line {result.line}: {result.reason}"
        f" ({result.records} intact records before it)",
        file=out,
    )
    return EXIT_PLUGIN_FAILED


def _cmd_metrics(args: argparse.Namespace, out: TextIO) -> int:
    from forgeone_isolate import control, metrics
    from forgeone_isolate.launch import DEFAULT_STATE_DIR

    if args.state_dir is None:
        try:
            with control.Client(args.socket) as client:
                result = client.request("metrics")
        except control.ServiceUnavailable:
            if args.socket is not None:
                raise
        else:
            out.write(str(result.get("text", "")))
            return EXIT_OK
    state_dir: Path = args.state_dir or DEFAULT_STATE_DIR
    path = state_dir / "metrics.sqlite3"
    if not path.exists():
        out.write(metrics.exposition([]))
        return EXIT_OK
    store = metrics.MetricsStore(path)
    try:
        out.write(metrics.exposition(store.rows()))
    finally:
        store.close()
    return EXIT_OK


# ------------------------------------------------------------------ the service and its clients

_SOCKET_HELP = "control socket (default $FORGEONE_SOCKET or /run/forgeone/control.sock)"


def _add_service_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the root host service")
    s.add_argument(
        "--config", type=Path, help="service config (TOML; default /etc/forgeone/config.toml)"
    )
    s.add_argument(
        "--check", action="store_true", help="validate the config, print it as JSON, exit"
    )

    def client(name: str, help_text: str, plugin: bool = True) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        if plugin:
            c.add_argument("name", help="plugin name")
        c.add_argument("--socket", type=Path, help=_SOCKET_HELP)
        c.add_argument("--json", action="store_true", help="print the service's answer as JSON")
        return c

    c = client("install", "install a package into the service (verified, registered)", False)
    c.add_argument("package", type=Path)
    c.add_argument("--allow-downgrade", action="store_true", help="accept a lower version")
    c.add_argument("--restart", choices=("no", "on-failure"), help="restart policy")
    c.add_argument("--max-restarts", type=int, help="consecutive restarts before giving up")
    client("uninstall", "remove a plugin from the service")
    client("list", "list the service's plugins", False)
    client("start", "start a plugin in the service")
    client("stop", "stop a plugin in the service")
    client("pause", "pause (freeze) a plugin in the service")
    client("resume", "resume a paused plugin in the service")
    c = client("call", "invoke a running plugin's handle export (service client)")
    c.add_argument("--input", default="", help="the input (text)")
    c = client("logs", "show a plugin's log lines from the service")
    c.add_argument("-n", type=int, default=100, help="lines to show")


def _cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from forgeone_isolate import config, service

    path: Path | None = args.config
    if path is None and config.DEFAULT_CONFIG_PATH.exists():
        path = config.DEFAULT_CONFIG_PATH
    cfg = config.load_config(path) if path is not None else config.ServiceConfig()
    if args.check:
        json.dump(cfg.as_dict(), out, indent=2, sort_keys=True)
        out.write("\n")
        return EXIT_OK
    return service.serve(cfg)


def _request(args: argparse.Namespace, op: str, **fields: Any) -> Any:
    from forgeone_isolate import control

    with control.Client(args.socket) as client:
        return client.request(op, **fields)


def _print_json(obj: Any, out: TextIO) -> None:
    json.dump(obj, out, indent=2, sort_keys=True)
    out.write("\n")


def _cmd_install(args: argparse.Namespace, out: TextIO) -> int:
    import base64

    from forgeone_isolate import package

    data = package.read_bounded_file(args.package)
    fields: dict[str, Any] = {
        "package_b64": base64.b64encode(data).decode(),
        "allow_downgrade": bool(args.allow_downgrade),
    }
    if args.restart is not None:
        fields["restart"] = args.restart
    if args.max_restarts is not None:
        fields["max_restarts"] = args.max_restarts
    result = _request(args, "install", **fields)
    if args.json:
        _print_json(result, out)
        return EXIT_OK
    row = result["plugin"]
    note = " (restarted)" if result.get("restarted") else ""
    print(
        f"{result['kind']}: {row['name']} {row['version']} signed by {row['signer']}{note}",
        file=out,
    )
    return EXIT_OK


def _cmd_uninstall(args: argparse.Namespace, out: TextIO) -> int:
    result = _request(args, "uninstall", name=args.name)
    if args.json:
        _print_json(result, out)
    else:
        print(f"uninstalled {result['uninstalled']} {result['version']}", file=out)
    return EXIT_OK


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def _fmt_uptime(s: Any) -> str:
    if not isinstance(s, int | float):
        return "-"
    s = int(s)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _usage_text(usage: dict[str, Any]) -> str:
    parts = []
    if isinstance(usage.get("cpu_usage_ns"), int):
        parts.append(f"cpu={usage['cpu_usage_ns'] / 1e9:.2f}s")
    if isinstance(usage.get("memory_bytes"), int):
        parts.append(f"mem={_fmt_bytes(usage['memory_bytes'])}")
    if "pids" in usage:
        parts.append(f"pids={usage['pids']}")
    if "freezer" in usage:
        parts.append(str(usage["freezer"]).lower())
    return " ".join(parts) or "-"


def _plugin_line(p: dict[str, Any]) -> list[str]:
    limits = p.get("limits") or {}
    state = str(p.get("state"))
    desired = str(p.get("desired"))
    return [
        str(p.get("name")),
        str(p.get("version")),
        str(p.get("signer", ""))[:12],
        state if state == desired else f"{state} (wants {desired})",
        str(p.get("pid") or "-"),
        _fmt_uptime(p.get("uptime_s")),
        f"mem={limits.get('memory_mb', '?')}M cpu={limits.get('cpu_percent', '?')}%"
        f" pids={limits.get('pids', '?')}",
        _usage_text(p.get("usage") or {}),
    ]


def _cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    result = _request(args, "list")
    plugins = result.get("plugins", [])
    if args.json:
        _print_json(plugins, out)
        return EXIT_OK
    rows = [["NAME", "VERSION", "SIGNER", "STATE", "PID", "UPTIME", "LIMITS", "USAGE"]]
    rows += [_plugin_line(p) for p in plugins]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)
    return EXIT_OK


def _state_command(op: str) -> Callable[[argparse.Namespace, TextIO], int]:
    def run(args: argparse.Namespace, out: TextIO) -> int:
        result = _request(args, op, name=args.name)
        if args.json:
            _print_json(result, out)
        else:
            pid = result.get("pid")
            print(
                f"{result['name']} {result['version']}: {result['state']}"
                + (f" (pid {pid})" if pid else ""),
                file=out,
            )
        return EXIT_OK

    return run


def _cmd_call(args: argparse.Namespace, out: TextIO) -> int:
    import base64

    result = _request(args, "call", name=args.name, input=args.input)
    if args.json:
        _print_json(result, out)
        return EXIT_OK
    text = result.get("output")
    if text is None:
        text = base64.b64decode(result.get("output_b64", "")).decode("utf-8", "replace")
    out.write(text)
    if not text.endswith("\n"):
        out.write("\n")
    return EXIT_OK


def _cmd_logs(args: argparse.Namespace, out: TextIO) -> int:
    if args.n < 1:
        raise UsageError("logs: -n must be at least 1")
    result = _request(args, "logs", name=args.name, n=min(args.n, 10_000))
    if args.json:
        _print_json(result, out)
        return EXIT_OK
    for line in result.get("lines", []):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(line["time"]))
        print(f"{stamp} {line['level']}: {line['text']}", file=out)
    return EXIT_OK


def _client_audit(args: argparse.Namespace, name: str, out: TextIO) -> int:
    from forgeone_isolate.errors import EXIT_PLUGIN_FAILED

    if args.n < 1:
        raise UsageError("audit: -n must be at least 1")
    result = _request(args, "audit", name=name, n=min(args.n, 10_000))
    if args.json:
        _print_json(result, out)
    else:
        for record in result.get("records", []):
            print(json.dumps(record, sort_keys=True), file=out)
        v = result.get("verify", {})
        state = "OK" if v.get("ok") else f"TAMPERED at line {v.get('line')}"
        print(f"{state}: {result.get('path')}: {v.get('reason')}", file=out)
    return EXIT_OK if result.get("verify", {}).get("ok") else EXIT_PLUGIN_FAILED


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "keygen": _cmd_keygen,
    "pack": _cmd_pack,
    "verify": _cmd_verify,
    "inspect": _cmd_inspect,
    "launch": _cmd_launch,
    "doctor": _cmd_doctor,
    "metrics": _cmd_metrics,
    "audit": _cmd_audit,
    "serve": _cmd_serve,
    "install": _cmd_install,
    "uninstall": _cmd_uninstall,
    "list": _cmd_list,
    "start": _state_command("start"),
    "stop": _state_command("stop"),
    "pause": _state_command("pause"),
    "resume": _state_command("resume"),
    "call": _cmd_call,
    "logs": _cmd_logs,
}


def _one_line(text: str) -> str:
    """Escape line breaks (a path argument may hold one): an error is one line."""
    return "".join(
        repr(c)[1:-1] if c in "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029" else c for c in text
    )


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command; returns the exit status."""
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError(f"{PROG}: a command is required (see --help)")
        if args.command in NOT_BUILT:
            raise UsageError(f"{args.command}: not built yet ({NOT_BUILT[args.command]})")
        return COMMANDS[args.command](args, out)
    except IsolateError as e:
        print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse --help
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    except Exception as e:
        if os.environ.get("FORGEONE_DEBUG") == "1":
            traceback.print_exc()
        print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(str(e))}", file=sys.stderr)
        return 1
