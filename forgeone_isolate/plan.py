"""The frozen sandbox plan: what will be unshared, mapped, limited and allowed.

``launch`` compiles a verified package (and, later, the operator's policy) into a
:class:`SandboxPlan`; the launcher only carries plans out, and ``launch --dry-run``
prints one.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from forgeone_isolate import abi, policy, seccomp_filter
from forgeone_isolate.fds import BROKER_FD
from forgeone_isolate.manifest import Limits, Manifest

NAMESPACES: Final = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")

#: What wasmtime and the broker channel need once the filter is in (measured here; see
#: FACTS.md). Everything else kills the process. The engine, module, store and linker are
#: built before the fork and there is one malloc arena, so futex, getrandom, madvise, mremap
#: and rt_sigprocmask are not needed: every test guest (traps, stack exhaustion, memory
#: moved past the reservation, floods, fd I/O) runs without them.
SECCOMP_ALLOW: Final = (
    # memory
    "brk",
    "mmap",
    "munmap",
    "mprotect",
    # the broker channel, the setup channel and passed descriptors (all fd-guarded)
    "read",
    "write",
    "close",
    "recvmsg",
    # wasmtime's trap handling (guard pages, signals), stack overflow detection
    "rt_sigreturn",
    "rt_sigaction",
    "sigaltstack",
    # time, where the vDSO cannot answer (clock sources without vDSO support, as under
    # qemu's TCG): read-only
    "clock_gettime",
    "gettimeofday",
    # the way out
    "exit",
    "exit_group",
)

#: memory the sandboxed process needs besides the guest's own (wasmtime, the Python shims,
#: copy-on-write copies of the interpreter's pages): cgroup memory.max = guest + this
RUNTIME_MEMORY: Final = 64 * 1024 * 1024
#: headroom above the child's virtual size at the rlimit step, beyond the guest memory
AS_HEADROOM: Final = 512 * 1024 * 1024
NOFILE: Final = 16
#: the default pool of plugin veth addresses (the service's config can choose another)
DEFAULT_ADDRESS_POOL: Final = "10.213.0.0/16"


@dataclass(frozen=True)
class SandboxPlan:
    """Everything the launcher needs, decided up front."""

    plugin: str
    version: str
    signer: str
    instance_id: str
    namespaces: tuple[str, ...]
    host_uid: int
    host_gid: int
    hostname: str
    scratch_mount: str
    network: str  # "loopback" | "veth"
    net_bps: int
    address_index: int
    address_pool: str  # IPv4 network the plugin's /30 is carved from
    memory_bytes: int  # the guest's linear memory (wasmtime StoreLimits)
    cgroup_memory_bytes: int  # the whole sandbox process: guest memory + the runtime
    cpu_percent: int
    pids: int
    io_bps: int
    io_device: tuple[int, int] | None
    timeout_s: int
    rlimits: tuple[tuple[str, int, int], ...]
    as_headroom: int
    seccomp_allow: tuple[str, ...]
    seccomp_min_fd: int
    lifecycle: tuple[str, ...]
    effective: policy.Effective
    requested: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``launch --dry-run``)."""
        d = asdict(self)
        d["rlimits"] = {name: {"soft": s, "hard": h} for name, s, h in self.rlimits}
        d["rlimits"]["as"] = f"VmSize at the rlimit step + {self.as_headroom} + memory_bytes"
        d["seccomp"] = seccomp_filter.describe(self.seccomp_allow, self.seccomp_min_fd, NOFILE - 1)
        for k in ("seccomp_allow", "seccomp_min_fd", "as_headroom"):
            d.pop(k)
        d["effective"] = policy.effective_as_dict(self.effective)
        return d


def build_plan(
    manifest: Manifest,
    signer: str,
    host_uid: int,
    lifecycle: tuple[str, ...],
    effective: policy.Effective,
    limits: Limits | None = None,
    address_index: int = 0,
    io_device: tuple[int, int] | None = None,
    address_pool: str = DEFAULT_ADDRESS_POOL,
) -> SandboxPlan:
    """Compile a verified manifest and the plugin's effective permissions into a plan.

    ``effective`` comes from ``policy.effective`` (manifest ∩ operator grant, deny by
    default); ``limits`` are the manifest's limits capped by the policy; ``address_index``
    picks the plugin's veth addresses from the pool when it is granted the network;
    ``io_device`` is the block device (major, minor) ``io_bps`` applies to.
    """
    limits = limits or manifest.limits
    return SandboxPlan(
        plugin=manifest.name,
        version=str(manifest.version),
        signer=signer,
        instance_id=uuid.uuid4().hex[:12],
        namespaces=NAMESPACES,
        host_uid=host_uid,
        host_gid=host_uid,
        hostname="forgeone",
        scratch_mount="/tmp",  # noqa: S108 - a mount point in our private mount namespace only
        network="veth" if effective.net_connect else "loopback",
        net_bps=limits.net_bps,
        address_index=address_index,
        address_pool=address_pool,
        memory_bytes=limits.memory_mb * 1024 * 1024,
        cgroup_memory_bytes=limits.memory_mb * 1024 * 1024 + RUNTIME_MEMORY,
        cpu_percent=limits.cpu_percent,
        pids=limits.pids,
        io_bps=limits.io_bps,
        io_device=io_device,
        timeout_s=limits.timeout_s,
        rlimits=(
            ("core", 0, 0),
            ("nofile", NOFILE, NOFILE),
            ("memlock", 0, 0),
            ("msgqueue", 0, 0),
            ("cpu", limits.timeout_s + 1, limits.timeout_s + 2),
        ),
        as_headroom=AS_HEADROOM,
        seccomp_allow=SECCOMP_ALLOW,
        seccomp_min_fd=BROKER_FD,
        lifecycle=tuple(n for n in abi.LIFECYCLE if n in lifecycle),
        effective=effective,
        requested=manifest.permissions.as_dict(),
    )
