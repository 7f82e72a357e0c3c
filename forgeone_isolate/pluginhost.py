"""A plugin host: one process per running plugin, forked by the fork server.

The service verifies the stored package, applies the operator's policy and plans (warm,
in its own process: every page a freshly forked host writes is a copy). The host takes
that plan (``plan.plan_from_wire``), leases a uid for it, loads the HMAC'd compiled module
the service attested (or verifies the package and compiles it itself), opens the audit
log and kv store, and runs the plugin with :func:`launch.run_plan`, fed by the service
through its channel. It is single-threaded (it forks the keeper) and exits when
``run_plan`` returns.

Channel (``SOCK_SEQPACKET``, one JSON object per message).

Service → host (at most one outstanding; the next is sent after the previous result)::

    {"cmd": "call", "id": N, "input": "<base64>"}
    {"cmd": "pause", "id": N}   {"cmd": "resume", "id": N}   {"cmd": "stop", "id": N}

Host → service::

    {"ev": "observed", "uid", "isolation": {...}, "cgroups": [dirs]}   PID 1, every layer in
    {"ev": "ready"}                               init and start done; the guest idles
    {"ev": "log", "level": L, "text": T}
    {"ev": "paused", "paused": bool}              the cgroup was frozen / thawed
    {"ev": "result", "id": N, "cmd", "code", "kind", "output": "<base64>"}
    {"ev": "exit", "status", "reason", "exit_status", "broker", "metrics", "network"}
    {"ev": "error", "message": M, "bad_input": bool}   it could not launch

A closed channel (the service went away) stops the guest at its next idle moment; the
fork server's death kills the host (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Final, NoReturn

from forgeone_isolate import (
    abi,
    artifacts,
    cgroup,
    fds,
    guest,
    package,
    policy,
    seccomp_filter,
    signing,
    wasm,
)
from forgeone_isolate import protocol as p
from forgeone_isolate.audit import AuditLog
from forgeone_isolate.errors import BadInputError, IsolateError, VerificationError, WireError
from forgeone_isolate.forkserver import EXIT_INTERNAL
from forgeone_isolate.kvstore import KvStore
from forgeone_isolate.plan import NOFILE, SandboxPlan, plan_from_wire
from forgeone_isolate.uidpool import UidLease, lease_uid

MAX_MESSAGE: Final = 256 * 1024
COMMANDS: Final = {
    "call": p.Command.CALL,
    "pause": p.Command.PAUSE,
    "resume": p.Command.RESUME,
    "stop": p.Command.STOP,
}


class HostChannel:
    """The host's end of its channel to the service."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024 * 1024)

    def send(self, obj: dict[str, Any]) -> None:
        """Send one event; a gone service is not an error here."""
        if self.closed:
            return
        try:
            self.sock.send(json.dumps(obj, separators=(",", ":")).encode())
        except OSError:
            self.closed = True


class ChannelCommands:
    """The :class:`launch.CommandSource` fed by the service through the channel."""

    def __init__(self, channel: HostChannel) -> None:
        self.channel = channel
        self.queue: collections.deque[tuple[p.Command, bytes, int]] = collections.deque()
        self.eof = False
        self.ready_sent = False
        self.current_id = 0

    def fileno(self) -> int | None:
        return self.channel.sock.fileno()

    def _drain(self) -> None:
        while not self.eof:
            try:
                msg = self.channel.sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self.eof = True
                return
            if not msg:
                self.eof = True
                return
            try:
                obj = json.loads(msg)
                command = COMMANDS[obj["cmd"]]
                ident = int(obj.get("id", 0))
                data = base64.b64decode(obj.get("input", ""), validate=True)
            except (ValueError, KeyError, TypeError):
                continue  # the service never sends this; ignore rather than guess
            self.queue.append((command, data, ident))

    def next_command(self) -> tuple[p.Command, bytes] | None:
        if not self.ready_sent:
            self.ready_sent = True
            self.channel.send({"ev": "ready"})
        self._drain()
        if self.queue:
            command, data, ident = self.queue.popleft()
            self.current_id = ident
            return command, data
        if self.eof:
            return p.Command.STOP, b""
        return None

    def on_result(self, command: p.Command, code: int, kind: p.DoneKind, output: bytes) -> None:
        self.channel.send(
            {
                "ev": "result",
                "id": self.current_id,
                "cmd": command.name.lower(),
                "code": code,
                "kind": kind.name,
                "output": base64.b64encode(output).decode(),
            }
        )

    def on_paused(self, paused: bool) -> None:
        self.channel.send({"ev": "paused", "paused": paused})


def plugin_host_main(spec: dict[str, Any], sock: socket.socket) -> NoReturn:
    """The plugin host's whole life (the fork server's ``host_main``). Never returns."""
    status = EXIT_INTERNAL
    channel = HostChannel(sock)
    try:
        status = run_host(spec, channel)
    except BaseException as e:
        channel.send(
            {"ev": "error", "message": f"internal: {type(e).__name__}: {e}", "bad_input": False}
        )
    finally:
        os._exit(status)


def _lease(spec: dict[str, Any]) -> UidLease:
    """A host uid from the service's range, searched from the service's hint (the lowest
    uid none of its instances holds), so a busy service does not open hundreds of lock
    files per launch."""
    first, count = int(spec["uid_first"]), int(spec["uid_count"])
    return lease_uid(Path(spec["lease_dir"]), first, count, hint=int(spec.get("uid_hint", first)))


#: cgroup.detect() by delegated paths: made once in the fork server (warm_up) and inherited
#: by every plugin host it forks; the hierarchies do not move under a running service.
_DETECTED: dict[tuple[str, ...], cgroup.CgroupHost] = {}


def _cgroups(delegated: tuple[str, ...]) -> cgroup.CgroupHost:
    found = _DETECTED.get(delegated)
    if found is None:
        found = _DETECTED[delegated] = cgroup.detect(delegated=delegated)
    return found


def _module(spec: dict[str, Any], plan: SandboxPlan) -> bytes:
    """The compiled guest module of the service's plan, serialised.

    The service verified the stored package for this start and planned from what it
    established; the module it attested is the one whose digest the spec names. Its
    HMAC'd artifact of that very module is taken as it is. Without one (gone, or not
    ours), the stored package is read and verified here, against the service's trust
    store, and must hold that module: then it is compiled here.

    Raises: VerificationError, PackageError, ManifestError, WasmError.
    """
    digest = str(spec["wasm_sha256"])
    if spec.get("artifact") and spec.get("artifact_key"):
        found = artifacts.load_artifact(
            Path(spec["artifact"]), bytes.fromhex(spec["artifact_key"]), digest
        )
        if found is not None:
            return found.serialized
    trust = signing.TrustStore(
        frozenset(spec["trusted"]), frozenset(spec.get("revoked", ())), str(spec["trust"])
    )
    data = package.read_bounded_file(Path(spec["package"]))
    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise VerificationError(
            f"stored package {spec['package']} does not hash to its registry digest"
        )
    pkg = package.verify_bytes(data, trust)
    if pkg.manifest.name != plan.plugin:
        raise VerificationError(f"stored package names {pkg.manifest.name!r}, not {plan.plugin!r}")
    if hashlib.sha256(pkg.wasm).hexdigest() != digest:
        raise VerificationError(f"stored package {spec['package']} holds another module")
    wasm.check_module(pkg.wasm, pkg.manifest.limits.memory_mb)
    return wasm.compile_serialized(pkg.wasm)


def _refused(channel: HostChannel, e: IsolateError) -> int:
    """Tell the service why the plugin did not start; the host's exit status (2: bad input)."""
    bad = isinstance(e, BadInputError)
    channel.send({"ev": "error", "message": str(e), "bad_input": bad})
    return 2 if bad else 1


def run_host(spec: dict[str, Any], channel: HostChannel) -> int:
    """Run the service's plan for one plugin; report on ``channel``. Returns the exit
    status."""
    from forgeone_isolate import child
    from forgeone_isolate.launch import LaunchResult, record_result, run_plan

    name = str(spec["name"])
    state_dir = Path(spec["state_dir"])
    try:
        planned = plan_from_wire(spec["plan"])
    except (KeyError, WireError) as e:  # the service never sends this: not the plugin's fault
        channel.send({"ev": "error", "message": f"internal: plan: {e}", "bad_input": False})
        return EXIT_INTERNAL
    try:
        serialized = _module(spec, planned)
        cgroups = _cgroups(tuple(str(d) for d in spec.get("delegated", ())))
    except IsolateError as e:
        return _refused(channel, e)
    kv = KvStore(state_dir / "kv.sqlite3") if planned.effective.kv else None
    try:
        with (
            _lease(spec) as lease,
            AuditLog(state_dir / "audit" / f"{name}.jsonl") as audit_log,
        ):
            plan = dataclasses.replace(
                planned,
                host_uid=lease.uid,
                host_gid=lease.uid,
                # the plugin's veth addresses: by its uid (one base for every supervisor)
                address_index=lease.index,
            )

            def observed(launched: LaunchResult) -> None:
                channel.send(
                    {
                        "ev": "observed",
                        "uid": lease.uid,
                        "isolation": launched.isolation,
                        "cgroups": list(launched.cgroup.get("paths", [])),
                    }
                )

            commands = ChannelCommands(channel)
            # What exists now is shared with the keeper and PID 1 after their forks; frozen,
            # no garbage collection in any of the three writes to (and so copies) its pages.
            gc.collect()
            gc.freeze()
            result = run_plan(
                plan,
                child.make_guest_payload(serialized, plan),
                cgroups,
                on_log=lambda level, text: channel.send(
                    {"ev": "log", "level": level, "text": text}
                ),
                on_observed=observed,
                audit=audit_log,
                kv=kv,
                commands=commands,
                sweep=False,  # the service sweeps once when it starts
                read_audit=spec.get("witness") != "service",  # the service names a syscall
            )
    except IsolateError as e:
        return _refused(channel, e)
    finally:
        if kv is not None:
            kv.close()
    with contextlib.suppress(Exception):
        record_result(state_dir, plan, result)
    channel.send(
        {
            "ev": "exit",
            "status": result.status,
            "reason": result.reason,
            "exit_status": result.exit_status,
            "broker": result.broker,
            "metrics": result.metrics,
            "network": result.network,
            "logs_dropped": result.logs_dropped,
        }
    )
    return result.exit_status


WARM_WAT: Final = """(module
  (import "forgeone" "log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "init") (result i32) (i32.const 0)))"""
WARM_MANIFEST: Final = {
    "name": "warm-up",
    "version": "1.0.0",
    "abi": 1,
    "entry": "plugin.wasm",
    "limits": {"memory_mb": 16, "timeout_s": 10},
}


def warm_up() -> None:
    """Take, once in the fork server, every lazily initialised path a plugin host takes.

    Regex caches, OpenSSL's HMAC and Ed25519 state, zlib, tarfile, the manifest parser:
    each initialises on first use and keeps what it allocated. Done here, before the fork
    server's first fork, those pages are shared by every plugin host instead of being
    copied into each one (measured: several MiB less USS per plugin).
    """
    import sqlite3
    import tempfile

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from forgeone_isolate.plan import build_plan

    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="forgeone-warm-") as tmp:
        src = Path(tmp)
        (src / "plugin.wasm").write_bytes(wasm.wat_to_wasm(WARM_WAT))
        (src / "manifest.json").write_text(json.dumps(WARM_MANIFEST))
        data = package.build_package(src, key)
    trust = signing.TrustStore(
        frozenset({signing.fingerprint(key.public_key())}), frozenset(), "warm-up"
    )
    pkg = package.verify_bytes(data, trust)
    eff = policy.effective(pkg.manifest.permissions, None, policy.Defaults())
    limits = policy.cap_limits(pkg.manifest.limits, eff)
    digest = hashlib.sha256(pkg.wasm).hexdigest()
    art = artifacts.Artifact(digest, wasm.compile_serialized(pkg.wasm), ("init",))
    artifacts.decode(bytes(32), artifacts.encode(bytes(32), art), digest)
    # The engine and the linker with the shims, shared by every host (guest._runtime)
    guest.prepare(art.serialized, 16 << 20, ("init",), fds.BROKER_FD)
    warm_plan = build_plan(pkg.manifest, pkg.signer, 1, ("init",), eff, limits, 0)
    # The seccomp filter of every plan (one allow-list): built once here, not in each host
    seccomp_filter.filter_for(warm_plan.seccomp_allow, warm_plan.seccomp_min_fd, NOFILE - 1)
    _cgroups(())
    json.loads(json.dumps({"ev": "warm", "output": base64.b64encode(b"warm").decode()}))
    sqlite3.connect(":memory:").close()


def preload() -> None:
    """The fork server's preload for plugin hosts: imports, then :func:`warm_up`."""
    from forgeone_isolate.forkserver import default_preload

    default_preload()
    warm_up()


def level_name(level: int) -> str:
    """A guest log level's name."""
    return abi.LOG_LEVELS[level] if 0 <= level < len(abi.LOG_LEVELS) else str(level)


__all__ = [
    "ChannelCommands",
    "HostChannel",
    "level_name",
    "plugin_host_main",
    "preload",
    "run_host",
    "warm_up",
]
