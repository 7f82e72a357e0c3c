"""Host probes: what this kernel and these packages let the supervisor do.

Each probe is a function returning a :class:`Probe`; ``doctor`` prints them and the test
markers (``requires_root`` ...) are backed by the same functions, so a skipped test and a
doctor line always agree. Probes that need the kernel to act (user namespace, mount
namespace and pivot_root, seccomp filter) really try it, in a short-lived forked child.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import prctl

from forgeone_isolate import cgroup, mounts
from forgeone_isolate._sys import libc
from forgeone_isolate._sys.libc import CLONE_NEWNS, CLONE_NEWUSER
from forgeone_isolate.errors import SetupError
from forgeone_isolate.kernel import RealKernel

# <linux/landlock.h>
LANDLOCK_CREATE_RULESET_VERSION: Final = 1
# Syscall numbers (asm/unistd_64.h; landlock's 444 is shared by every architecture).
SYS_LANDLOCK_CREATE_RULESET: Final = 444

#: Probes a launch cannot do without (see :func:`launch_possible`).
REQUIRED: Final = ("root", "userns", "mountns", "seccomp")

#: What holds a limit when its cgroup controller is unavailable.
FALLBACKS: Final[dict[str, str]] = {
    "memory": "RLIMIT_AS and wasmtime StoreLimits",
    "cpu": "the parent's deadline kill (timeout_s) and RLIMIT_CPU",
    "pids": "the seccomp filter (no fork or clone after it)",
    "io": "nothing: io through broker-passed fds is not throttled",
}


@dataclass(frozen=True)
class Probe:
    """One host capability: ``ok`` says whether it is there, ``detail`` says what was seen."""

    name: str
    ok: bool
    detail: str


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def _in_child(body: Callable[[], str]) -> str:
    """Run ``body`` in a forked child; return its message ("" on success).

    The child exits with ``os._exit`` and never returns into the caller's code.
    """
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python >= 3.12 warns on fork in a threaded process; the child runs only ctypes.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        try:
            message = body()
        except OSError as exc:
            message = f"{exc.strerror or exc} ({_errname(exc.errno or 0)})"
        except BaseException as exc:  # the child must always report
            message = f"{type(exc).__name__}: {exc}"
        try:
            os.write(write_fd, (message or "ok").encode()[:4000])
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as f:
        chunks.append(f.read())
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    if not text:
        return f"probe child died ({status:#x})"
    return "" if text == "ok" else text


def probe_root() -> Probe:
    """Whether we run with euid 0 (the supervisor writes uid maps and cgroups as root)."""
    euid = os.geteuid()
    return Probe("root", euid == 0, f"euid {euid}")


def probe_kernel() -> Probe:
    """The kernel release (informational)."""
    return Probe("kernel", True, f"{platform.system()} {os.uname().release} {platform.machine()}")


def probe_userns() -> Probe:
    """Whether unshare(CLONE_NEWUSER) works, tried in a forked child."""

    def body() -> str:
        libc.unshare(CLONE_NEWUSER)
        return ""

    failure = _in_child(body)
    limit = _read_text("/proc/sys/user/max_user_namespaces")
    extra = f"; max_user_namespaces={limit}" if limit else ""
    if failure:
        return Probe("userns", False, f"unshare(CLONE_NEWUSER) failed: {failure}{extra}")
    return Probe("userns", True, f"unshare(CLONE_NEWUSER) works{extra}")


def probe_mountns() -> Probe:
    """Whether a mount namespace, a private tmpfs root, pivot_root and read-only work."""
    new_root = tempfile.mkdtemp(prefix="forgeone-probe-")

    def body() -> str:
        # The very steps a launch takes (mounts.setup_empty_root), in a throwaway child.
        flags = CLONE_NEWNS if os.geteuid() == 0 else CLONE_NEWNS | CLONE_NEWUSER
        libc.unshare(flags)
        mounts.setup_empty_root(RealKernel(), new_root)
        return ""

    try:
        failure = _in_child(body)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(new_root)
    if failure:
        return Probe("mountns", False, f"mount namespace + pivot_root failed: {failure}")
    return Probe("mountns", True, "unshare(CLONE_NEWNS), private tmpfs, pivot_root, ro remount")


def probe_seccomp() -> Probe:
    """Whether seccomp filters work: PR_GET_SECCOMP, ``import pyseccomp``, a filter loads."""
    try:
        mode = int(prctl.get_seccomp())
    except OSError as exc:
        return Probe("seccomp", False, f"prctl(PR_GET_SECCOMP) failed: {_errname(exc.errno or 0)}")
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:
        return Probe("seccomp", False, f"libseccomp not importable (pyseccomp): {exc}")

    def body() -> str:
        prctl.set_no_new_privs(1)
        f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        f.add_rule(pyseccomp.ERRNO(errno.EPERM), "uname")
        f.load()
        try:
            os.uname()
        except PermissionError:
            return ""
        return "filter loaded but uname() was not denied"

    failure = _in_child(body)
    version = _dist_version("pyseccomp")
    if failure:
        return Probe("seccomp", False, f"filter did not load: {failure}")
    return Probe("seccomp", True, f"mode {mode} now; filter loads (pyseccomp {version})")


def probe_landlock() -> Probe:
    """The Landlock ABI version (informational; not a launch requirement)."""
    abi = libc.raw_syscall(SYS_LANDLOCK_CREATE_RULESET, 0, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 0:
        err = -abi
        why = {errno.ENOSYS: "not built in", errno.EOPNOTSUPP: "disabled at boot"}.get(err, "")
        return Probe("landlock", False, f"unavailable: {_errname(err)} {why}".rstrip())
    return Probe("landlock", True, f"ABI {abi}")


def probe_wasmtime() -> Probe:
    """The installed wasmtime-py version."""
    version = _dist_version("wasmtime")
    if version is None:
        return Probe("wasmtime", False, "wasmtime is not installed")
    return Probe("wasmtime", True, f"wasmtime {version}")


def probe_kvm() -> Probe:
    """Whether /dev/kvm exists and opens (informational: the integration suite's VM)."""
    path = "/dev/kvm"
    if not os.path.exists(path):
        return Probe("kvm", False, "/dev/kvm absent (integration VM runs under TCG)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Probe("kvm", False, f"/dev/kvm present but not openable: {_errname(exc.errno or 0)}")
    os.close(fd)
    if os.path.isdir("/sys/module/kvm_pvm"):
        return Probe("kvm", True, "/dev/kvm opens, but it is kvm_pvm (PVM guests only; use TCG)")
    return Probe("kvm", True, "/dev/kvm opens")


def probe_cgroup(host: cgroup.CgroupHost | None = None) -> Probe:
    """Which cgroup version is used and which controllers we may use."""
    host = host or cgroup.detect()
    avail = sorted(host.available_controllers())
    if host.version == "none" or not avail:
        why = "; ".join(f"{c}: {r}" for c, r in sorted(host.unavailable.items()))
        return Probe("cgroup", False, f"{host.version}: no usable controller ({why})")
    detail = f"{host.version}: {', '.join(avail)} usable"
    missing = sorted(host.unavailable_limits())
    if missing:
        detail += f"; {', '.join(missing)} falls back"
    return Probe("cgroup", True, detail)


def probe_cgroup2(host: cgroup.CgroupHost | None = None) -> Probe:
    """Whether a cgroup v2 hierarchy with usable controllers is ours (pure v2 hosts)."""
    host = host or cgroup.detect()
    avail = sorted(host.available_controllers())
    if host.version != "v2" or not avail:
        return Probe("cgroup2", False, f"cgroup {host.version} host, no usable v2 controllers")
    return Probe("cgroup2", True, f"v2: {', '.join(avail)}")


def limit_probes(host: cgroup.CgroupHost | None = None) -> list[Probe]:
    """One probe per limit: held by a cgroup (ok) or by its fallback (not ok, says which)."""
    host = host or cgroup.detect()
    missing = host.unavailable_limits()
    probes = []
    for limit in cgroup.LIMITS:
        if limit in missing:
            detail = f"held by {FALLBACKS[limit]} ({missing[limit]})"
            probes.append(Probe(f"limit.{limit}", False, detail))
        else:
            probes.append(Probe(f"limit.{limit}", True, f"cgroup {host.version}"))
    return probes


def all_probes(host: cgroup.CgroupHost | None = None) -> list[Probe]:
    """Every probe, in the order ``doctor`` prints them."""
    try:
        host = host or cgroup.detect()
    except SetupError:
        host = None
    probes = [
        probe_kernel(),
        probe_root(),
        probe_userns(),
        probe_mountns(),
        probe_seccomp(),
    ]
    if host is None:
        probes.append(Probe("cgroup", False, "cannot read /proc/self/mountinfo"))
    else:
        probes += [probe_cgroup(host), *limit_probes(host)]
    probes += [probe_landlock(), probe_wasmtime(), probe_kvm()]
    return probes


def launch_possible(probes: Sequence[Probe]) -> tuple[bool, str]:
    """Decide whether an isolated launch can work, and say why.

    Needed: root, user namespaces, mount namespace with pivot_root, seccomp. Cgroups are
    not needed: without them a launch runs with every limit on its fallback, and says so.
    """
    by_name = {p.name: p for p in probes}
    missing = [
        f"{name} ({by_name[name].detail})" if name in by_name else f"{name} (not probed)"
        for name in REQUIRED
        if name not in by_name or not by_name[name].ok
    ]
    if missing:
        return False, "launch impossible: needs " + "; ".join(missing)
    fallbacks = [p.name.removeprefix("limit.") for p in probes if p.name.startswith("limit.")]
    fallbacks = [name for name in fallbacks if not by_name[f"limit.{name}"].ok]
    cg = by_name.get("cgroup")
    if cg is None or not cg.ok:
        return True, "launch possible WITHOUT cgroups: every limit falls back (see limit.*)"
    if fallbacks:
        return True, (
            "launch possible; not held by a cgroup: "
            + ", ".join(f"{name} -> {FALLBACKS[name]}" for name in fallbacks)
        )
    return True, "launch possible; every limit held by a cgroup"


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = [
    "FALLBACKS",
    "REQUIRED",
    "Probe",
    "all_probes",
    "launch_possible",
    "limit_probes",
    "probe_cgroup",
    "probe_cgroup2",
    "probe_kernel",
    "probe_kvm",
    "probe_landlock",
    "probe_mountns",
    "probe_root",
    "probe_seccomp",
    "probe_userns",
    "probe_wasmtime",
]
