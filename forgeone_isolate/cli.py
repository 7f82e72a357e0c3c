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
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from forgeone_isolate.errors import EXIT_BAD_INPUT, EXIT_OK, IsolateError, UsageError

PROG = "forgeone-isolate"

#: commands of ARCHITECTURE.md that later issues build; they say so and exit 2.
NOT_BUILT: dict[str, str] = {
    "call": "invoke a running plugin's handle export (service client)",
    "serve": "run the root host service",
    "list": "list the service's plugins",
    "stop": "stop a plugin in the service",
    "pause": "pause (freeze) a plugin in the service",
    "resume": "resume a paused plugin in the service",
    "logs": "show a plugin's log lines from the service",
}


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
    s.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/forgeone)")

    s = sub.add_parser("doctor", help="what this host offers for isolation")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("audit", help="audit log tools")
    asub = s.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=_Parser)
    v = asub.add_parser("verify", help="check an audit log's hash chain")
    v.add_argument("file", type=Path)

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
    """``audit verify FILE``: 0 intact, 1 tampered (line and reason), 2 unreadable."""
    from forgeone_isolate import audit
    from forgeone_isolate.errors import EXIT_PLUGIN_FAILED, BadInputError

    if args.audit_command != "verify":
        raise UsageError("audit: an action is required: verify FILE")
    try:
        result = audit.verify(args.file)
    except OSError as e:
        raise BadInputError(f"audit log {args.file}: cannot read: {e.strerror or e}") from None
    if result.ok:
        print(f"OK: {args.file}: {result.reason}", file=out)
        return EXIT_OK
    print(
        f"TAMPERED: {args.file}: line {result.line}: {result.reason}"
        f" ({result.records} intact records before it)",
        file=out,
    )
    return EXIT_PLUGIN_FAILED


def _cmd_metrics(args: argparse.Namespace, out: TextIO) -> int:
    from forgeone_isolate import metrics
    from forgeone_isolate.launch import DEFAULT_STATE_DIR

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


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "keygen": _cmd_keygen,
    "pack": _cmd_pack,
    "verify": _cmd_verify,
    "inspect": _cmd_inspect,
    "launch": _cmd_launch,
    "doctor": _cmd_doctor,
    "metrics": _cmd_metrics,
    "audit": _cmd_audit,
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
