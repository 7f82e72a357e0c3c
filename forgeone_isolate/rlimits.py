"""Resource limits of the child process (setrlimit). Child only; values come from the plan."""

from __future__ import annotations

import resource
from collections.abc import Iterable

from forgeone_isolate.kernel import Kernel

NAMES = {
    "core": resource.RLIMIT_CORE,
    "nofile": resource.RLIMIT_NOFILE,
    "as": resource.RLIMIT_AS,
    "memlock": resource.RLIMIT_MEMLOCK,
    "msgqueue": resource.RLIMIT_MSGQUEUE,
    "cpu": resource.RLIMIT_CPU,
    "fsize": resource.RLIMIT_FSIZE,
}


def apply_rlimits(k: Kernel, limits: Iterable[tuple[str, int, int]]) -> None:
    """Child: set each (name, soft, hard). Raises: OSError; KeyError on an unknown name."""
    for name, soft, hard in limits:
        k.setrlimit(NAMES[name], soft, hard)


def vm_size_bytes(pid: int) -> int:
    """The virtual size (VmSize) of process ``pid`` (read by the parent for PID 1, which has
    no /proc once pivoted), for sizing RLIMIT_AS.

    Raises: OSError when the process is gone.
    """
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0
