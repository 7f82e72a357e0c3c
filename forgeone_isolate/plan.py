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
from forgeone_isolate.errors import WireError
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


_WIRE_STRINGS: Final = (
    "plugin",
    "version",
    "signer",
    "instance_id",
    "hostname",
    "scratch_mount",
    "network",
    "address_pool",
)
_WIRE_INTS: Final = (
    "host_uid",
    "host_gid",
    "net_bps",
    "address_index",
    "memory_bytes",
    "cgroup_memory_bytes",
    "cpu_percent",
    "pids",
    "io_bps",
    "timeout_s",
    "as_headroom",
    "seccomp_min_fd",
)
_WIRE_STRING_TUPLES: Final = ("namespaces", "seccomp_allow", "lifecycle")


def plan_to_wire(plan: SandboxPlan) -> dict[str, Any]:
    """``plan`` whole as JSON, for a process of ours (the service plans, a plugin host
    runs it); :func:`plan_from_wire` reads it back."""
    d: dict[str, Any] = {k: getattr(plan, k) for k in (*_WIRE_STRINGS, *_WIRE_INTS)}
    d.update({k: list(getattr(plan, k)) for k in _WIRE_STRING_TUPLES})
    d["io_device"] = list(plan.io_device) if plan.io_device is not None else None
    d["rlimits"] = [list(r) for r in plan.rlimits]
    d["effective"] = policy.effective_to_wire(plan.effective)
    d["requested"] = plan.requested
    return d


def plan_from_wire(d: Any) -> SandboxPlan:
    """The plan of :func:`plan_to_wire`. Raises: WireError naming the first field that is
    not what that function writes."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(d, dict):
        raise WireError("plan: not a table")
    fields: dict[str, Any] = {}
    for k in _WIRE_STRINGS:
        if not isinstance(d.get(k), str):
            raise WireError(f"plan.{k}: not a string")
        fields[k] = d[k]
    for k in _WIRE_INTS:
        if not is_int(d.get(k)):
            raise WireError(f"plan.{k}: not an integer")
        fields[k] = d[k]
    for k in _WIRE_STRING_TUPLES:
        v = d.get(k)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise WireError(f"plan.{k}: not a list of strings")
        fields[k] = tuple(v)
    io = d.get("io_device")
    if io is not None and not (isinstance(io, list) and len(io) == 2 and all(map(is_int, io))):
        raise WireError("plan.io_device: not [major, minor] or null")
    fields["io_device"] = (io[0], io[1]) if io is not None else None
    rl = d.get("rlimits")
    if not isinstance(rl, list) or not all(
        isinstance(r, list)
        and len(r) == 3
        and isinstance(r[0], str)
        and is_int(r[1])
        and is_int(r[2])
        for r in rl
    ):
        raise WireError("plan.rlimits: not a list of [name, soft, hard]")
    fields["rlimits"] = tuple((r[0], r[1], r[2]) for r in rl)
    fields["effective"] = policy.effective_from_wire(d.get("effective"))
    if not isinstance(d.get("requested"), dict):
        raise WireError("plan.requested: not a table")
    fields["requested"] = d["requested"]
    return SandboxPlan(**fields)
