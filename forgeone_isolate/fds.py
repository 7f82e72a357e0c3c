"""File descriptors: the child keeps only the channels it was given.

Child only. The broker socket and the setup channel are moved to fixed numbers, stdio is
pointed at /dev/null (opened before the root disappears), everything else is closed with
close_range(2).
"""

from __future__ import annotations

from forgeone_isolate.kernel import Kernel

BROKER_FD = 3
CONTROL_FD = 4


def setup_fds(k: Kernel, devnull: int, broker: int, control: int) -> None:
    """Child: 0-2 -> /dev/null, broker -> 3, control -> 4, close everything from 5 up."""
    # Move both channels above the targets first, so dup2 never clobbers one of them.
    for fd, target in ((broker, BROKER_FD), (control, CONTROL_FD)):
        if fd != target:
            k.dup2(fd, 100 + target)
    for target in (BROKER_FD, CONTROL_FD):
        src = broker if target == BROKER_FD else control
        if src != target:
            k.dup2(100 + target, target)
    for std in (0, 1, 2):
        k.dup2(devnull, std)
    k.close_range(CONTROL_FD + 1)
