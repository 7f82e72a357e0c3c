"""The setup channel between the supervisor and its two child processes, documented once.

A SOCK_SEQPACKET socketpair carries small JSON messages, each ``{"m": MARKER, ...}``,
strictly in this order::

    keeper  -> parent  UNSHARED                 namespaces made; map me
    parent  -> keeper  MAPPED                   uid/gid maps written (the parent now moves
                                                the keeper into its cgroup while the
                                                children go on with their setup)
    keeper  -> parent  PID1 {pid}               host pid of PID 1 of the new namespace
    plugin  -> parent  READY                    mounts, fds, wasmtime prepared: place me
    parent  -> plugin  PLACED {vm_size}         PID 1 is in its cgroup (then it unshares
                                                its cgroup namespace, rooted there);
                                                vm_size: its VmSize, for RLIMIT_AS
    either  -> parent  STEP_FAILED {step, errno[, message]}  (then exits EXIT_SETUP_FAILED;
                                                the keeper sends no message: the parent
                                                words it from the errno)
    plugin  -> parent  FILTERED {steps}         every layer applied (PID 1 then instantiates
                                                the module while the parent observes)
    parent  -> plugin  OBSERVED                 parent has read /proc/<pid>; run the lifecycle

"keeper" is the first child (outside the new PID namespace): it unshares, makes PID 1 as
the parent's own child (CLONE_PARENT), reports its pid and exits. "plugin" is PID 1 of the
new PID namespace, which builds the sandbox and runs wasmtime; the parent reaps it and so
has its wait status from the kernel (nothing on this channel says how PID 1 ended: the
keeper shared PID 1's memory, and a plugin that took PID 1 over could make it say anything).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Final

UNSHARED: Final = "UNSHARED"
MAPPED: Final = "MAPPED"
PID1: Final = "PID1"
READY: Final = "READY"
PLACED: Final = "PLACED"
STEP_FAILED: Final = "STEP_FAILED"
FILTERED: Final = "FILTERED"
OBSERVED: Final = "OBSERVED"
MAX_MESSAGE: Final = 4096

# Exit statuses of the children (both distinct from a plugin's 0/1).
EXIT_SETUP_FAILED: Final = 120
EXIT_PARENT_GONE: Final = 121
EXIT_PROTOCOL: Final = 122
EXIT_PAYLOAD_CRASHED: Final = 123


def send(sock: socket.socket, marker: str, **fields: Any) -> None:
    """Send one marker message."""
    # write/read rather than send/recv: after the seccomp filter only these are allowed.
    os.write(sock.fileno(), json.dumps({"m": marker, **fields}).encode()[:MAX_MESSAGE])


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """Receive one marker message; None at end of stream or on a malformed message."""
    try:
        data = os.read(sock.fileno(), MAX_MESSAGE)
    except OSError:
        return None
    if not data:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return {"m": "MALFORMED"}
    return obj if isinstance(obj, dict) and isinstance(obj.get("m"), str) else {"m": "MALFORMED"}
