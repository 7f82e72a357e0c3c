"""Cgroups for plugins: one interface, with v2, v1 and "none" behind it.

Mechanism only: this module turns a :class:`CgroupLimits` into files written in a plugin's
own cgroup and reports exactly what it wrote (``applied``) and what it could not
(``not_applied``). It never reads a manifest and never decides a fallback: the caller (the
launcher) reads ``not_applied`` / :meth:`CgroupHost.unavailable_limits` and applies rlimits
and wasmtime's limits instead, loudly.

Layout. Plugin cgroups live in ``<mount>/<own cgroup>/forgeone/<name>``, where ``<own
cgroup>`` is the supervisor's own cgroup in that hierarchy (from ``/proc/self/cgroup``).

Delegation rule. A hierarchy is used only where the supervisor's own cgroup is the root
``/`` (a bare host, or a cgroup namespace) or is listed in ``delegated`` (e.g. the service's
cgroup under systemd ``Delegate=yes``; a path below a delegated one counts too). Any other
hierarchy belongs to someone else: it is left alone and its controller is reported in
``CgroupHost.unavailable`` with the reason. On a hybrid host whose v1 memory hierarchy puts us
in ``/process_api/<id>``, memory is therefore unavailable and the caller falls back to
``RLIMIT_AS`` and wasmtime ``StoreLimits``.

Version choice (:func:`detect`): v2 when a cgroup2 mount offers cpu, memory, pids or io in its
``cgroup.controllers`` (a unified host); else v1 when v1 controller hierarchies are mounted (a
hybrid or legacy host); else "none".

v2 and the no-internal-process rule. To give ``forgeone/<name>`` its controllers they must be
enabled in ``cgroup.subtree_control`` of the own cgroup and of ``forgeone/``. The kernel
refuses that (EBUSY) while a non-root cgroup holds processes, so before the first enable the
processes of the own cgroup (the supervisor itself, in a delegated service cgroup) are moved
into a ``<own>/supervisor`` leaf. That leaf is never removed by this module.

Never touched: any directory we did not create. :meth:`PluginCgroup.remove` removes only the
plugin's leaves and then ``forgeone/`` when it is empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Final, Literal

from cgroupspy.controllers import CpuController, MemoryController

from forgeone_isolate.errors import SetupError

Version = Literal["v2", "v1", "none"]

SUBTREE: Final = "forgeone"
SUPERVISOR_LEAF: Final = "supervisor"
CPU_PERIOD_US: Final = 100_000
NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: The limits this module knows, by the name used in ``applied`` / ``not_applied``.
LIMITS: Final = ("cpu", "memory", "pids", "io")
#: Controllers used on a v2 host (freeze and kill are core files there, not controllers).
V2_CONTROLLERS: Final = ("cpu", "memory", "pids", "io")
#: Controllers used on a v1 host; cpu and cpuacct may be one hierarchy ("cpu,cpuacct").
V1_CONTROLLERS: Final = ("cpu", "cpuacct", "memory", "pids", "blkio", "freezer")
_LIMIT_CONTROLLER: Final[dict[str, dict[str, str]]] = {
    "v2": {"cpu": "cpu", "memory": "memory", "pids": "pids", "io": "io"},
    "v1": {"cpu": "cpu", "memory": "memory", "pids": "pids", "io": "blkio"},
}
_POLL_S: Final = 0.005


@dataclass(frozen=True)
class CgroupLimits:
    """Resource limits for one plugin cgroup; ``None`` leaves a resource unlimited.

    ``cpu_percent`` is a share of one core (150 = one and a half cores). ``io_bps`` caps
    reads and writes alike, in bytes per second, on the block device ``io_device``
    (major, minor); without a device it cannot be applied.

    Raises:
        ValueError: a limit is not a positive integer, or the device is malformed.
    """

    cpu_percent: int | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    io_bps: int | None = None
    io_device: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for key in ("cpu_percent", "memory_bytes", "pids", "io_bps"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"cgroup limit {key} must be a positive integer, not {value!r}")
        if self.io_device is not None:
            major_minor = self.io_device
            if len(major_minor) != 2 or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in major_minor
            ):
                raise ValueError(f"io_device must be (major, minor), not {major_minor!r}")

    def requested(self) -> dict[str, int]:
        """The limits that are set, by limit name (``cpu``, ``memory``, ``pids``, ``io``)."""
        values = {
            "cpu": self.cpu_percent,
            "memory": self.memory_bytes,
            "pids": self.pids,
            "io": self.io_bps,
        }
        return {k: v for k, v in values.items() if v is not None}


def backing_device(path: str, sys_root: str = "/sys") -> tuple[int, int] | None:
    """The whole block device (major, minor) holding ``path``, for ``io_device``.

    A partition is resolved to its disk (the io/blkio throttles take whole disks). Returns
    None when ``path`` is on no block device (tmpfs, overlay, NFS).

    Raises:
        OSError: ``path`` cannot be stat'ed.
    """
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    node = os.path.join(sys_root, "dev/block", f"{major}:{minor}")
    if not os.path.exists(node):
        return None
    if os.path.exists(os.path.join(node, "partition")):
        node = os.path.dirname(os.path.realpath(node))
        with open(os.path.join(node, "dev"), encoding="ascii") as f:
            disk_major, _, disk_minor = f.read().strip().partition(":")
        return int(disk_major), int(disk_minor)
    return major, minor


class CgroupFs:
    """The file operations this module performs on a cgroup tree: the seam tests replace.

    Every method raises ``OSError`` as the kernel reports it.
    """

    def read(self, path: str) -> str:
        """Return the whole content of a control file."""
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()

    def write(self, path: str, value: str) -> None:
        """Write ``value`` in one write(2); the file must exist (no O_CREAT)."""
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)

    def mkdir(self, path: str) -> None:
        """Create one cgroup directory (the kernel fills in its control files)."""
        os.mkdir(path, 0o755)

    def rmdir(self, path: str) -> None:
        """Remove one cgroup directory (the kernel refuses while it has tasks or children)."""
        os.rmdir(path)

    def exists(self, path: str) -> bool:
        """Whether a path exists."""
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        """Whether a path is a directory."""
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        """Entries of a directory."""
        return os.listdir(path)

    def writable(self, path: str) -> bool:
        """Whether we may create cgroups in this directory."""
        return os.access(path, os.W_OK)


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy as this process sees it.

    ``base`` is the directory of our own cgroup in it; plugin cgroups go below
    ``base/forgeone``. ``usable`` is False when the delegation rule (or access) forbids it,
    and ``reason`` says why.
    """

    kind: Literal["cgroup2", "cgroup"]
    mount_point: str
    mount_root: str
    controllers: frozenset[str]
    own_cgroup: str
    base: str
    usable: bool
    reason: str = ""

    @property
    def subtree(self) -> str:
        """``<base>/forgeone``."""
        return os.path.join(self.base, SUBTREE)


def _error(step: str, exc: OSError, path: str) -> SetupError:
    return SetupError(step, exc.errno or errno.EIO, f"{path}: {exc.strerror or exc}")


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


@dataclass(frozen=True)
class _Mount:
    kind: Literal["cgroup2", "cgroup"]
    mount_point: str
    root: str
    controllers: frozenset[str]


def _parse_mountinfo(text: str) -> list[_Mount]:
    mounts: list[_Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        super_opts = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        controllers = frozenset(
            o for o in super_opts if o in V1_CONTROLLERS or o in ("cpuset", "devices")
        )
        kind: Literal["cgroup2", "cgroup"] = "cgroup2" if fstype == "cgroup2" else "cgroup"
        mounts.append(_Mount(kind, _unescape(fields[4]), _unescape(fields[3]), controllers))
    return mounts


def _parse_proc_cgroup(text: str) -> tuple[str | None, dict[str, str]]:
    """Return (own v2 path or None, {v1 controller: own path})."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier_id, ctrls, path = parts
        if hier_id == "0" and ctrls == "":
            v2 = path
            continue
        for c in ctrls.split(","):
            if c and not c.startswith("name="):
                v1[c] = path
    return v2, v1


def _relative(own: str, mount_root: str) -> str | None:
    """Own cgroup path relative to the mount's root, or None if it is not visible there."""
    if mount_root == "/":
        return own
    if own == mount_root:
        return "/"
    if own.startswith(mount_root.rstrip("/") + "/"):
        return own[len(mount_root.rstrip("/")) :]
    return None


def _is_delegated(own: str, delegated: Sequence[str]) -> bool:
    if own == "/":
        return True
    for entry in delegated:
        d = "/" + entry.strip("/")
        if own == d or own.startswith(d.rstrip("/") + "/"):
            return True
    return False


def _hierarchy(
    mount: _Mount,
    own: str,
    delegated: Sequence[str],
    *,
    fs_root: str,
    fs: CgroupFs,
    label: str,
) -> Hierarchy:
    mount_point = os.path.join(fs_root, mount.mount_point.lstrip("/"))
    h = Hierarchy(
        kind=mount.kind,
        mount_point=mount_point,
        mount_root=mount.root,
        controllers=mount.controllers,
        own_cgroup=own,
        base=mount_point,
        usable=False,
    )
    rel = _relative(own, mount.root)
    if rel is None:
        reason = f"own cgroup {own} is not visible under the {label} mount (root {mount.root})"
        return replace(h, reason=reason)
    h = replace(h, base=os.path.normpath(os.path.join(mount_point, rel.lstrip("/"))))
    if not _is_delegated(own, delegated):
        reason = (
            f"{label} hierarchy not delegated: own cgroup {own} is neither '/' "
            "nor listed as delegated"
        )
        return replace(h, reason=reason)
    if not fs.isdir(h.base) or not fs.writable(h.base):
        return replace(h, reason=f"{label} hierarchy: no write access to own cgroup {h.base}")
    return replace(h, usable=True)


def detect(
    mountinfo_path: str = "/proc/self/mountinfo",
    cgroup_path: str = "/proc/self/cgroup",
    delegated: Sequence[str] = (),
    *,
    fs_root: str = "/",
    fs: CgroupFs | None = None,
) -> CgroupHost:
    """Find the cgroup hierarchies this process may use.

    ``fs_root`` is prefixed to every mount point read from ``mountinfo_path`` (tests point
    it at a fake cgroupfs tree); ``delegated`` lists cgroup paths handed to us (systemd
    ``Delegate=yes``). See the module docstring for the version and delegation rules.

    Raises:
        SetupError: ``mountinfo_path`` or ``cgroup_path`` cannot be read.
    """
    fs = fs or CgroupFs()
    try:
        mounts = _parse_mountinfo(fs.read(mountinfo_path))
        own_v2, own_v1 = _parse_proc_cgroup(fs.read(cgroup_path))
    except OSError as exc:
        raise _error("cgroup detect", exc, exc.filename or mountinfo_path) from exc

    # v2: a unified mount whose root offers our controllers.
    for mount in mounts:
        if mount.kind != "cgroup2" or own_v2 is None:
            continue
        mount_point = os.path.join(fs_root, mount.mount_point.lstrip("/"))
        try:
            root_ctrls = fs.read(os.path.join(mount_point, "cgroup.controllers")).split()
        except OSError:
            continue
        if not set(root_ctrls) & set(V2_CONTROLLERS):
            continue  # hybrid: the unified mount holds none of ours (maybe hugetlb, misc)
        h = _hierarchy(mount, own_v2, delegated, fs_root=fs_root, fs=fs, label="v2")
        own_ctrls: set[str] = set()
        if h.usable:
            try:
                own_ctrls = set(fs.read(os.path.join(h.base, "cgroup.controllers")).split())
            except OSError as exc:
                reason = f"v2: cannot read {h.base}/cgroup.controllers: {exc.strerror}"
                h = replace(h, usable=False, reason=reason)
        h = replace(h, controllers=frozenset(c for c in V2_CONTROLLERS if c in own_ctrls))
        by_ctrl: dict[str, Hierarchy] = {}
        unavailable: dict[str, str] = {}
        for c in V2_CONTROLLERS:
            if not h.usable:
                unavailable[c] = h.reason
            elif c in own_ctrls:
                by_ctrl[c] = h
            else:
                unavailable[c] = (
                    f"v2 controller {c} not delegated to own cgroup {h.own_cgroup} "
                    "(absent from its cgroup.controllers)"
                )
        return CgroupHost("v2", [h], by_ctrl, unavailable, fs=fs, delegated=tuple(delegated))

    # v1: one hierarchy per mount of the controllers we use.
    hierarchies: list[Hierarchy] = []
    by_ctrl = {}
    unavailable = {}
    for mount in mounts:
        used = mount.controllers & set(V1_CONTROLLERS)
        if mount.kind != "cgroup" or not used:
            continue
        if any(c in by_ctrl for c in used):
            continue  # a second (bind) mount of a hierarchy we already have
        own = next((own_v1[c] for c in sorted(used) if c in own_v1), None)
        if own is None:
            continue
        label = "v1 " + ",".join(sorted(used))
        h = _hierarchy(mount, own, delegated, fs_root=fs_root, fs=fs, label=label)
        if not h.usable and any(c in unavailable for c in used):
            continue
        hierarchies.append(h)
        for c in used:
            if h.usable:
                by_ctrl[c] = h
                unavailable.pop(c, None)
            else:
                unavailable[c] = h.reason
    if not hierarchies:
        reason = "no cgroup hierarchy with controllers is mounted"
        return CgroupHost(
            "none", [], {}, dict.fromkeys(V2_CONTROLLERS, reason), fs=fs, delegated=()
        )
    for c in V1_CONTROLLERS:
        if c not in by_ctrl and c not in unavailable:
            unavailable[c] = f"no v1 {c} hierarchy is mounted"
    return CgroupHost("v1", hierarchies, by_ctrl, unavailable, fs=fs, delegated=tuple(delegated))


class CgroupHost:
    """The cgroup hierarchies usable on this host; made by :func:`detect`."""

    def __init__(
        self,
        version: Version,
        hierarchies: list[Hierarchy],
        by_controller: dict[str, Hierarchy],
        unavailable: dict[str, str],
        *,
        fs: CgroupFs,
        delegated: tuple[str, ...],
    ) -> None:
        self.version: Version = version
        self.hierarchies = hierarchies
        self.unavailable: dict[str, str] = unavailable
        self.delegated = delegated
        self.supervisor_leaf: str | None = None
        self._by_controller = by_controller
        self._fs = fs

    def available_controllers(self) -> set[str]:
        """Controllers we may use (v2: cpu memory pids io; v1: also cpuacct blkio freezer)."""
        return set(self._by_controller)

    def controller_dir(self, controller: str) -> str | None:
        """Our own cgroup's directory in the hierarchy of ``controller``, if usable."""
        h = self._by_controller.get(controller)
        return h.base if h else None

    def unavailable_limits(self) -> dict[str, str]:
        """Limits this host cannot put in a cgroup, by limit name, with the reason."""
        if self.version == "none":
            return dict.fromkeys(LIMITS, "no usable cgroup hierarchy")
        mapping = _LIMIT_CONTROLLER[self.version]
        return {
            limit: self.unavailable.get(ctrl, f"{ctrl} controller unavailable")
            for limit, ctrl in mapping.items()
            if ctrl not in self._by_controller
        }

    def can_freeze(self) -> bool:
        """Whether :meth:`PluginCgroup.freeze` can work here."""
        if self.version == "v2":
            return bool(self._by_controller)
        return "freezer" in self._by_controller

    def usable_hierarchies(self) -> list[Hierarchy]:
        """Hierarchies we create plugin cgroups in (each once, even if co-mounted)."""
        return [h for h in self.hierarchies if h.usable]

    def plugin_roots(self) -> list[str]:
        """Every ``<own cgroup>/forgeone`` directory this host would use."""
        return [h.subtree for h in self.usable_hierarchies()]

    def existing_plugin_dirs(self) -> list[str]:
        """Every directory now under a ``forgeone/`` root, the roots included (leak checks)."""
        found: list[str] = []
        for root in self.plugin_roots():
            if not self._fs.isdir(root):
                continue
            found.append(root)
            for dirpath, dirnames, _files in os.walk(root):
                found.extend(os.path.join(dirpath, d) for d in dirnames)
        return sorted(found)

    def create(self, name: str, limits: CgroupLimits) -> PluginCgroup:
        """Create ``forgeone/<name>`` in every usable hierarchy and write ``limits``.

        Limits whose controller is unavailable land in ``not_applied`` with the reason; a
        write that fails on an available controller is an error (nothing is left behind).

        Raises:
            ValueError: ``name`` is not 1-64 of ``[A-Za-z0-9_.-]`` (or is ``.``/``..``).
            SetupError: a directory or control file could not be created or written.
        """
        if not NAME_RE.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"invalid cgroup name {name!r}: want 1-64 of [A-Za-z0-9_.-]")
        cg: PluginCgroup
        if self.version == "v2":
            cg = _V2Cgroup(self, name, self._fs)
        elif self.version == "v1":
            cg = _V1Cgroup(self, name, self._fs)
        else:
            cg = _NoCgroup(self, name, self._fs)
        try:
            cg._setup(limits)
        except BaseException:
            # Leave nothing behind; the setup error is the one worth reporting.
            with contextlib.suppress(SetupError):
                cg.remove()
            raise
        return cg

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary for ``doctor`` and the launch report."""
        return {
            "version": self.version,
            "available": sorted(self.available_controllers()),
            "unavailable": dict(sorted(self.unavailable.items())),
            "unavailable_limits": self.unavailable_limits(),
            "can_freeze": self.can_freeze(),
            "delegated": list(self.delegated),
            "supervisor_leaf": self.supervisor_leaf,
            "hierarchies": [
                {
                    "kind": h.kind,
                    "controllers": sorted(h.controllers),
                    "mount": h.mount_point,
                    "own_cgroup": h.own_cgroup,
                    "dir": h.subtree,
                    "usable": h.usable,
                    "reason": h.reason,
                }
                for h in self.hierarchies
            ],
        }

    # -- v2 parent side ----------------------------------------------------------------

    def _v2_prepare_subtree(self) -> str:
        """Enable our controllers down to ``forgeone/`` and return its path (v2 only)."""
        h = self.hierarchies[0]
        fs = self._fs
        wanted = [c for c in V2_CONTROLLERS if c in self._by_controller]
        own_ctl = os.path.join(h.base, "cgroup.subtree_control")
        try:
            enabled = set(fs.read(own_ctl).split())
        except OSError as exc:
            raise _error("cgroup v2 subtree_control", exc, own_ctl) from exc
        missing = [c for c in wanted if c not in enabled]
        # Only the real root cgroup may hold processes and enable controllers for its
        # children. "/" in /proc/self/cgroup is also the root of a cgroup namespace (a
        # container's), which is not exempt: the real root is the one without cgroup.type.
        real_root = h.own_cgroup == "/" and not fs.exists(os.path.join(h.base, "cgroup.type"))
        if missing and not real_root:
            self._v2_move_out_of_own(h)
        for c in missing:
            try:
                fs.write(own_ctl, f"+{c}")
            except OSError as exc:
                raise _error("cgroup v2 enable controller", exc, f"{own_ctl} +{c}") from exc
        subtree = h.subtree
        _mkdir_exist_ok(fs, subtree)
        sub_ctl = os.path.join(subtree, "cgroup.subtree_control")
        try:
            enabled = set(fs.read(sub_ctl).split())
        except OSError as exc:
            raise _error("cgroup v2 subtree_control", exc, sub_ctl) from exc
        for c in wanted:
            if c not in enabled:
                try:
                    fs.write(sub_ctl, f"+{c}")
                except OSError as exc:
                    raise _error("cgroup v2 enable controller", exc, f"{sub_ctl} +{c}") from exc
        return subtree

    def _v2_move_out_of_own(self, h: Hierarchy) -> None:
        # No internal processes: a non-root cgroup with processes cannot enable controllers
        # for its children, so its processes (the supervisor) move to a leaf of their own.
        fs = self._fs
        procs_file = os.path.join(h.base, "cgroup.procs")
        try:
            pids = [int(p) for p in fs.read(procs_file).split()]
        except OSError as exc:
            raise _error("cgroup v2 supervisor leaf", exc, procs_file) from exc
        if not pids:
            return
        leaf = os.path.join(h.base, SUPERVISOR_LEAF)
        _mkdir_exist_ok(fs, leaf)
        target = os.path.join(leaf, "cgroup.procs")
        for pid in pids:
            try:
                fs.write(target, str(pid))
            except ProcessLookupError:
                continue  # exited meanwhile
            except OSError as exc:
                raise _error("cgroup v2 supervisor leaf", exc, f"{target} {pid}") from exc
        self.supervisor_leaf = leaf


def _mkdir_exist_ok(fs: CgroupFs, path: str) -> None:
    try:
        fs.mkdir(path)
    except FileExistsError:
        return
    except OSError as exc:
        raise _error("cgroup create", exc, path) from exc


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _parse_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, memory.oom_control) into a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


class _CgroupspyNode:
    # cgroupspy controllers need only a node with a bytes ``full_path``.
    def __init__(self, path: str) -> None:
        self.full_path = os.fsencode(path)


class PluginCgroup(ABC):
    """One plugin's cgroup (one leaf per hierarchy on v1). Made by :meth:`CgroupHost.create`.

    ``paths`` lists the directories created; ``applied`` maps a limit to the ``file=value``
    pairs written; ``not_applied`` maps a requested limit to why it is not in a cgroup.
    Usable as a context manager that calls :meth:`remove` on exit.
    """

    version: Version

    def __init__(self, host: CgroupHost, name: str, fs: CgroupFs) -> None:
        self.name = name
        self.paths: list[str] = []
        self.applied: dict[str, str] = {}
        self.not_applied: dict[str, str] = {}
        self._host = host
        self._fs = fs
        self._parents: list[str] = []
        self._removed = False

    def __enter__(self) -> PluginCgroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.paths}>"

    @abstractmethod
    def _setup(self, limits: CgroupLimits) -> None: ...

    def _make_leaf(self, subtree: str, prepare: Callable[[], object] | None = None) -> str:
        """Make our leaf in ``subtree``, which ``prepare`` (v2: also enabling our
        controllers in it) or a plain mkdir makes first; again when another supervisor's
        remove() took an empty ``subtree`` away meanwhile (a v2 one remade by a plain mkdir
        would lack its controllers, and our leaf its limit files)."""
        leaf = os.path.join(subtree, self.name)
        for _attempt in range(5):
            if prepare is None:
                _mkdir_exist_ok(self._fs, subtree)
            else:
                try:
                    prepare()
                except SetupError as e:
                    if e.errno == errno.ENOENT:
                        continue  # taken away while being prepared
                    raise
            try:
                self._fs.mkdir(leaf)
            except FileNotFoundError:
                continue  # a concurrent remove() took an empty forgeone/ away: retry
            except OSError as exc:
                raise _error("cgroup create", exc, leaf) from exc
            break
        else:
            raise SetupError("cgroup create", errno.ENOENT, f"{leaf}: parent keeps vanishing")
        self.paths.append(leaf)
        if subtree not in self._parents:
            self._parents.append(subtree)
        return leaf

    def _write(self, step: str, path: str, value: str) -> None:
        try:
            self._fs.write(path, value)
        except OSError as exc:
            raise _error(step, exc, f"{path} <- {value!r}") from exc

    def _read(self, path: str) -> str | None:
        try:
            return self._fs.read(path)
        except OSError:
            return None

    def _read_int(self, path: str) -> int | None:
        text = self._read(path)
        if text is None:
            return None
        text = text.strip()
        return int(text) if text.lstrip("-").isdigit() else None

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup in every hierarchy.

        Raises:
            SetupError: a ``cgroup.procs`` write failed.
        """
        for path in self.paths:
            self._write("cgroup attach", os.path.join(path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        """Processes now in this cgroup (the union over hierarchies)."""
        found: set[int] = set()
        for path in self.paths:
            text = self._read(os.path.join(path, "cgroup.procs"))
            if text:
                found.update(int(p) for p in text.split())
        return sorted(found)

    @abstractmethod
    def freeze(self, timeout: float = 5.0) -> None:
        """Stop every process in the cgroup; returns once the kernel reports it frozen.

        Raises:
            SetupError: no freezer here (EOPNOTSUPP), a write failed, or timeout (ETIMEDOUT).
        """

    @abstractmethod
    def thaw(self, timeout: float = 5.0) -> None:
        """Let the processes run again.

        Raises:
            SetupError: as :meth:`freeze`.
        """

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Accounting read back from the cgroup; keys present only where the host has them.

        ``cpu_usage_ns``, ``nr_throttled``, ``memory_current``, ``memory_peak``,
        ``oom_kill``, ``pids_current``, ``io_read_bytes``, ``io_write_bytes``.
        """

    def _signal_all(self, own: int) -> None:
        for pid in self.pids():
            if pid == own:
                raise SetupError("cgroup kill", errno.EPERM, "the supervisor is in the cgroup")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup, repeated until it is empty.

        Raises:
            SetupError: processes remain after ``timeout`` seconds (ETIMEDOUT), or the
                supervisor itself is in the cgroup (EPERM).
        """
        own = os.getpid()

        def empty() -> bool:
            if not self.pids():
                return True
            self._signal_all(own)
            self._after_signal()
            return False

        if not _wait_until(empty, timeout):
            raise SetupError("cgroup kill", errno.ETIMEDOUT, f"{self.name}: {self.pids()} remain")

    def _after_signal(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Hook run after each round of SIGKILL (v1 thaws a frozen cgroup there)."""

    def remove(self) -> None:
        """Kill what is left, remove our leaves, then ``forgeone/`` if empty. Idempotent.

        Raises:
            SetupError: processes would not die, or a leaf would not go away.
        """
        if self._removed:
            return
        if self.pids():
            self.kill()
        for path in reversed(self.paths):
            self._rmdir_leaf(path)
        for parent in self._parents:
            try:
                self._fs.rmdir(parent)
            except OSError as exc:
                # Another plugin still lives there, or someone removed it already.
                if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY, errno.ENOENT, errno.EEXIST):
                    raise _error("cgroup remove", exc, parent) from exc
        self._removed = True

    def _rmdir_leaf(self, path: str) -> None:
        def gone() -> bool:
            try:
                self._fs.rmdir(path)
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    return False  # dying tasks not yet released
                raise _error("cgroup remove", exc, path) from exc
            return True

        if not _wait_until(gone, 5.0):
            raise SetupError("cgroup remove", errno.EBUSY, path)


class _NoCgroup(PluginCgroup):
    """No usable hierarchy: creates nothing; the caller must contain the process itself."""

    version: Version = "none"

    def _setup(self, limits: CgroupLimits) -> None:
        for limit in limits.requested():
            self.not_applied[limit] = "no usable cgroup hierarchy on this host"

    def freeze(self, timeout: float = 5.0) -> None:
        raise SetupError("cgroup freeze", errno.EOPNOTSUPP, "no usable cgroup hierarchy")

    def thaw(self, timeout: float = 5.0) -> None:
        raise SetupError("cgroup thaw", errno.EOPNOTSUPP, "no usable cgroup hierarchy")

    def stats(self) -> dict[str, int]:
        return {}


class _V2Cgroup(PluginCgroup):
    version: Version = "v2"

    @property
    def leaf(self) -> str:
        return self.paths[0]

    def _setup(self, limits: CgroupLimits) -> None:
        host = self._host
        avail = host.available_controllers()
        req = limits.requested()
        for limit in req:
            if limit not in avail:
                self.not_applied[limit] = host.unavailable.get(limit, f"{limit} unavailable")
        if not host.usable_hierarchies():
            return
        leaf = self._make_leaf(host.hierarchies[0].subtree, prepare=host._v2_prepare_subtree)

        def put(limit: str, filename: str, value: str) -> None:
            path = os.path.join(leaf, filename)
            self._write(f"cgroup v2 {filename}", path, value)
            entry = f"{filename}={value}"
            self.applied[limit] = (
                f"{self.applied[limit]}; {entry}" if limit in self.applied else entry
            )

        if "cpu" in req and "cpu" in avail:
            put("cpu", "cpu.max", f"{req['cpu'] * CPU_PERIOD_US // 100} {CPU_PERIOD_US}")
        if "memory" in req and "memory" in avail:
            put("memory", "memory.max", str(req["memory"]))
            if self._fs.exists(os.path.join(leaf, "memory.swap.max")):
                put("memory", "memory.swap.max", "0")
            else:
                self.not_applied["memory_swap"] = "memory.swap.max absent (no swap accounting)"
            if self._fs.exists(os.path.join(leaf, "memory.oom.group")):
                put("memory", "memory.oom.group", "1")
        if "pids" in req and "pids" in avail:
            put("pids", "pids.max", str(req["pids"]))
        if "io" in req and "io" in avail:
            if limits.io_device is None:
                self.not_applied["io"] = "no block device given for io_bps"
            else:
                major, minor = limits.io_device
                bps = req["io"]
                put("io", "io.max", f"{major}:{minor} rbps={bps} wbps={bps}")

    def _frozen(self) -> bool:
        text = self._read(os.path.join(self.leaf, "cgroup.events")) or ""
        return _parse_keyed(text).get("frozen") == 1

    def _set_frozen(self, frozen: bool, timeout: float) -> None:
        step = "cgroup freeze" if frozen else "cgroup thaw"
        if not self.paths:
            raise SetupError(step, errno.EOPNOTSUPP, "no usable cgroup hierarchy")
        path = os.path.join(self.leaf, "cgroup.freeze")
        if not self._fs.exists(path):
            raise SetupError(step, errno.EOPNOTSUPP, f"{path} absent (kernel < 5.2)")
        self._write(step, path, "1" if frozen else "0")
        if not _wait_until(lambda: self._frozen() == frozen, timeout):
            raise SetupError(step, errno.ETIMEDOUT, f"{self.leaf}: cgroup.events never settled")

    def freeze(self, timeout: float = 5.0) -> None:
        self._set_frozen(True, timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        self._set_frozen(False, timeout)

    def kill(self, timeout: float = 5.0) -> None:
        if self.paths:
            kill_file = os.path.join(self.leaf, "cgroup.kill")
            if self._fs.exists(kill_file):
                self._write("cgroup kill", kill_file, "1")
        super().kill(timeout)

    def stats(self) -> dict[str, int]:
        if not self.paths:
            return {}
        leaf = self.leaf
        out: dict[str, int] = {}
        cpu = _parse_keyed(self._read(os.path.join(leaf, "cpu.stat")) or "")
        if "usage_usec" in cpu:
            out["cpu_usage_ns"] = cpu["usage_usec"] * 1000
        if "nr_throttled" in cpu:
            out["nr_throttled"] = cpu["nr_throttled"]
        for key, filename in (
            ("memory_current", "memory.current"),
            ("memory_peak", "memory.peak"),
            ("pids_current", "pids.current"),
        ):
            value = self._read_int(os.path.join(leaf, filename))
            if value is not None:
                out[key] = value
        events = _parse_keyed(self._read(os.path.join(leaf, "memory.events")) or "")
        if "oom_kill" in events:
            out["oom_kill"] = events["oom_kill"]
        io_text = self._read(os.path.join(leaf, "io.stat"))
        if io_text is not None:
            rbytes = wbytes = 0
            for line in io_text.splitlines():
                for item in line.split()[1:]:
                    io_key, _, io_value = item.partition("=")
                    if io_key == "rbytes":
                        rbytes += int(io_value)
                    elif io_key == "wbytes":
                        wbytes += int(io_value)
            out["io_read_bytes"] = rbytes
            out["io_write_bytes"] = wbytes
        return out


class _V1Cgroup(PluginCgroup):
    version: Version = "v1"

    def __init__(self, host: CgroupHost, name: str, fs: CgroupFs) -> None:
        super().__init__(host, name, fs)
        self._dir_for: dict[str, str] = {}

    def _setup(self, limits: CgroupLimits) -> None:
        host = self._host
        for h in host.usable_hierarchies():
            leaf = self._make_leaf(h.subtree)
            for c in h.controllers:
                self._dir_for[c] = leaf
        req = limits.requested()
        for limit, value in req.items():
            ctrl = _LIMIT_CONTROLLER["v1"][limit]
            where = self._dir_for.get(ctrl)
            if where is None:
                self.not_applied[limit] = host.unavailable.get(ctrl, f"{ctrl} unavailable")
                continue
            if limit == "cpu":
                quota = value * CPU_PERIOD_US // 100
                try:
                    ctl = CpuController(_CgroupspyNode(where))
                    ctl.cfs_period_us = CPU_PERIOD_US
                    ctl.cfs_quota_us = quota
                except OSError as exc:
                    raise _error("cgroup v1 cpu", exc, where) from exc
                self.applied["cpu"] = f"cpu.cfs_period_us={CPU_PERIOD_US}; cpu.cfs_quota_us={quota}"
            elif limit == "memory":
                self._setup_memory(where, value)
            elif limit == "pids":
                # cgroupspy has no pids controller class: plain write.
                self._write("cgroup v1 pids", os.path.join(where, "pids.max"), str(value))
                self.applied["pids"] = f"pids.max={value}"
            elif limit == "io":
                if limits.io_device is None:
                    self.not_applied["io"] = "no block device given for io_bps"
                    continue
                # Plain writes: cgroupspy's throttle_write_bps_device names a file with a
                # trailing space ("blkio.throttle.write_bps_device ") and fails with EACCES.
                major, minor = limits.io_device
                entries = []
                for filename in (
                    "blkio.throttle.read_bps_device",
                    "blkio.throttle.write_bps_device",
                ):
                    line = f"{major}:{minor} {value}"
                    self._write("cgroup v1 blkio", os.path.join(where, filename), line)
                    entries.append(f"{filename}={line}")
                self.applied["io"] = "; ".join(entries)

    def _setup_memory(self, where: str, value: int) -> None:
        try:
            ctl = MemoryController(_CgroupspyNode(where))
            ctl.limit_in_bytes = value
        except OSError as exc:
            raise _error("cgroup v1 memory", exc, where) from exc
        entries = [f"memory.limit_in_bytes={value}"]
        # memsw = memory + swap; equal to the memory limit means no swap at all.
        memsw = os.path.join(where, "memory.memsw.limit_in_bytes")
        if self._fs.exists(memsw):
            self._write("cgroup v1 memory", memsw, str(value))
            entries.append(f"memory.memsw.limit_in_bytes={value}")
        else:
            self.not_applied["memory_swap"] = (
                "memory.memsw.limit_in_bytes absent (no swap accounting)"
            )
        self.applied["memory"] = "; ".join(entries)

    def _freezer_state(self) -> str:
        where = self._dir_for.get("freezer")
        text = self._read(os.path.join(where, "freezer.state")) if where else None
        return (text or "").strip()

    def _set_state(self, state: str, timeout: float) -> None:
        step = "cgroup freeze" if state == "FROZEN" else "cgroup thaw"
        where = self._dir_for.get("freezer")
        if where is None:
            reason = self._host.unavailable.get("freezer", "no v1 freezer hierarchy")
            raise SetupError(step, errno.EOPNOTSUPP, reason)
        self._write(step, os.path.join(where, "freezer.state"), state)
        # FREEZING until every task has stopped.
        if not _wait_until(lambda: self._freezer_state() == state, timeout):
            raise SetupError(step, errno.ETIMEDOUT, f"{where}: {self._freezer_state()}")

    def freeze(self, timeout: float = 5.0) -> None:
        self._set_state("FROZEN", timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        self._set_state("THAWED", timeout)

    def _after_signal(self) -> None:
        # A v1-frozen task does not act on SIGKILL until thawed.
        if self._freezer_state() in ("FROZEN", "FREEZING"):
            where = self._dir_for["freezer"]
            self._write("cgroup kill", os.path.join(where, "freezer.state"), "THAWED")

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}

        def at(ctrl: str, filename: str) -> str | None:
            where = self._dir_for.get(ctrl)
            return os.path.join(where, filename) if where else None

        def put_int(key: str, path: str | None) -> None:
            value = self._read_int(path) if path else None
            if value is not None:
                out[key] = value

        put_int("cpu_usage_ns", at("cpuacct", "cpuacct.usage"))
        cpu_stat = at("cpu", "cpu.stat")
        cpu = _parse_keyed(self._read(cpu_stat) or "") if cpu_stat else {}
        if "nr_throttled" in cpu:
            out["nr_throttled"] = cpu["nr_throttled"]
        put_int("memory_current", at("memory", "memory.usage_in_bytes"))
        put_int("memory_peak", at("memory", "memory.max_usage_in_bytes"))
        oom = at("memory", "memory.oom_control")
        oom_ctl = _parse_keyed(self._read(oom) or "") if oom else {}
        if "oom_kill" in oom_ctl:
            out["oom_kill"] = oom_ctl["oom_kill"]
        put_int("pids_current", at("pids", "pids.current"))
        io_path = at("blkio", "blkio.throttle.io_service_bytes")
        io_text = self._read(io_path) if io_path else None
        if io_text is not None:
            rbytes = wbytes = 0
            for line in io_text.splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] == "Read":
                    rbytes += int(parts[2])
                elif len(parts) == 3 and parts[1] == "Write":
                    wbytes += int(parts[2])
            out["io_read_bytes"] = rbytes
            out["io_write_bytes"] = wbytes
        return out


__all__ = [
    "CPU_PERIOD_US",
    "LIMITS",
    "SUBTREE",
    "SUPERVISOR_LEAF",
    "CgroupFs",
    "CgroupHost",
    "CgroupLimits",
    "Hierarchy",
    "PluginCgroup",
    "backing_device",
    "detect",
]
