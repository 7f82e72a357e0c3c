"""A running guest driven through its lifecycle: call, pause (guest pause() then the cgroup
frozen), resume (thawed, then guest resume()), call again, stop (stop, unload).

The freeze is checked from outside, in the plugin's cgroup files, while the guest is paused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forgeone_isolate import cgroup, child, policy, protocol, uidpool, wasm
from forgeone_isolate.launch import run_plan
from forgeone_isolate.plan import build_plan

pytest.register_assert_rewrite("plugin_utils")
from plugin_utils import Packer  # noqa: E402

pytest_plugins = ["plugin_utils"]

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.requires_userns,
    pytest.mark.requires_seccomp,
    pytest.mark.requires_cgroup,
    pytest.mark.usefixtures("leak_check"),
]


def _frozen(paths: list[str]) -> bool | None:
    """The plugin cgroup's freeze state, read from the kernel's files (None: no freezer)."""
    for path in paths:
        state = Path(path, "freezer.state")
        if state.exists():
            return state.read_text().strip() == "FROZEN"
        events = Path(path, "cgroup.events")
        if events.exists() and Path(path, "cgroup.freeze").exists():
            return "frozen 1" in events.read_text().splitlines()
    return None


class Script:
    """A CommandSource that replays a list of commands and records what it saw."""

    def __init__(self, commands: list[tuple[protocol.Command, bytes]]) -> None:
        self.commands = list(commands)
        self.results: list[tuple[str, int, str, bytes]] = []
        self.frozen_seen: list[bool | None] = []

    def fileno(self) -> int | None:
        return None

    def next_command(self) -> tuple[protocol.Command, bytes] | None:
        return self.commands.pop(0) if self.commands else (protocol.Command.STOP, b"")

    def on_result(
        self, command: protocol.Command, code: int, kind: protocol.DoneKind, output: bytes
    ) -> None:
        self.results.append((command.name, code, kind.name, output))

    def on_paused(self, paused: bool) -> None:
        mine = [
            d
            for d in cgroup.detect().existing_plugin_dirs()
            if os.path.basename(d).startswith("lifecycle-") and d.endswith(f"-s{os.getpid()}")
        ]
        self.frozen_seen.append(_frozen(mine) if paused else not _frozen(mine))


def test_call_pause_resume_call_stop(packer: Packer) -> None:
    pkg = packer.verified("lifecycle")
    info = wasm.check_module(pkg.wasm)
    cmd = protocol.Command
    script = Script(
        [(cmd.CALL, b"hello"), (cmd.PAUSE, b""), (cmd.RESUME, b""), (cmd.CALL, b"again")]
    )
    with uidpool.lease_uid(uidpool.default_lease_dir()) as lease:
        plan = build_plan(pkg.manifest, pkg.signer, lease.uid, info.lifecycle, policy.Effective())
        result = run_plan(
            plan,
            child.make_guest_payload(wasm.compile_serialized(pkg.wasm), plan),
            cgroup.detect(),
            commands=script,
        )
    assert (result.status, result.reason) == ("ok", ""), result
    assert [text for _, text in result.logs] == [
        "init",
        "start",
        "pause",
        "resume",
        "stop",
        "unload",
    ]
    assert script.results == [
        ("CALL", 0, "OK", b"hello"),
        ("PAUSE", 0, "OK", b""),
        ("RESUME", 0, "OK", b""),
        ("CALL", 0, "OK", b"again"),
    ]
    # frozen while paused, thawed after resume: as the kernel's cgroup files said
    assert script.frozen_seen == [True, True], script.frozen_seen
