"""forgeone_isolate.cgroup: detection, v2/v1/none against fake cgroupfs trees, and real v1.

The fake trees live in tmp_path; :class:`FakeKernelFs` plays the kernel's part (fills a new
cgroup directory with control files, refuses rmdir of a cgroup with children or tasks, shows
only live processes in cgroup.procs, updates cgroup.events on cgroup.freeze) and records
every write the module makes. The real tests at the bottom run on this host's v1 hierarchies
and show each limit biting.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forgeone_isolate import cgroup
from forgeone_isolate.cgroup import SUPERVISOR_LEAF, CgroupFs, CgroupLimits
from forgeone_isolate.errors import SetupError

# --- sample hosts ---------------------------------------------------------------------

DEBIAN12_MOUNTINFO = """\
21 26 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
22 26 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
26 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
27 21 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
"""
DEBIAN12_CGROUP = "0::/system.slice/forgeone.service\n"
DEBIAN12_SERVICE = "/system.slice/forgeone.service"

# Copied from this host (hybrid: v1 controllers, an empty unified v2 mount).
HYBRID_MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict,resuid=65534,resgid=65534
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_MEMCG = "/process_api/7b9f8ea09bf04ad9ab2594424605e083"
HYBRID_CGROUP = f"""\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:{HYBRID_MEMCG}
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""

# A legacy v1-only host (CentOS 7 style): cpu and cpuacct co-mounted, no cgroup2 at all.
LEGACY_MOUNTINFO = """\
24 19 0:20 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
25 24 0:21 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup \
rw,xattr,release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd
28 24 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:10 - cgroup \
cgroup rw,cpu,cpuacct
29 24 0:25 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup \
rw,memory
30 24 0:26 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,pids
31 24 0:27 / /sys/fs/cgroup/blkio rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup \
rw,blkio
32 24 0:28 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup \
rw,freezer
"""
LEGACY_CGROUP = """\
11:freezer:/
10:blkio:/
9:pids:/
8:memory:/
3:cpu,cpuacct:/
1:name=systemd:/system.slice/forgeone.service
"""

NO_CGROUP_MOUNTINFO = "22 27 0:21 / /proc rw,relatime - proc proc rw\n"

V2_FILES = {
    "cgroup.procs": "",
    "cgroup.subtree_control": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.freeze": "0",
    "cgroup.kill": "",
    "cpu.max": "max 100000",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\nnr_periods 0\nnr_throttled 0\n",
    "memory.max": "max",
    "memory.swap.max": "max",
    "memory.oom.group": "0",
    "memory.current": "0",
    "memory.peak": "0",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "pids.max": "max",
    "pids.current": "0",
    "io.max": "",
    "io.stat": "",
}

V1_FILES = {
    "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1", "cpu.stat": ""},
    "cpuacct": {"cpuacct.usage": "0"},
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712",
        "memory.memsw.limit_in_bytes": "9223372036854771712",
        "memory.usage_in_bytes": "0",
        "memory.max_usage_in_bytes": "0",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    },
    "pids": {"pids.max": "max", "pids.current": "0"},
    "blkio": {
        "blkio.throttle.read_bps_device": "",
        "blkio.throttle.write_bps_device": "",
        "blkio.throttle.io_service_bytes": "Total 0\n",
    },
    "freezer": {"freezer.state": "THAWED"},
}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class FakeKernelFs(CgroupFs):
    """CgroupFs over a tmp_path tree, standing in for the kernel, recording every write."""

    def __init__(self, root: Path, files_for: Callable[[Path], dict[str, str]]) -> None:
        self.root = root
        self.files_for = files_for
        self.writes: list[tuple[str, str]] = []
        self.mkdirs: list[str] = []

    def rel(self, path: str) -> str:
        return "/" + str(Path(path).relative_to(self.root))

    def read(self, path: str) -> str:
        text = super().read(path)
        if os.path.basename(path) == "cgroup.procs":
            return "".join(f"{p}\n" for p in text.split() if _alive(int(p)))
        return text

    def write(self, path: str, value: str) -> None:
        self.writes.append((self.rel(path), value))
        super().write(path, value)
        p = Path(path)
        if p.name == "cgroup.freeze":
            (p.parent / "cgroup.events").write_text(f"populated 1\nfrozen {value}\n")

    def mkdir(self, path: str) -> None:
        super().mkdir(path)
        self.mkdirs.append(self.rel(path))
        for name, content in self.files_for(Path(path)).items():
            (Path(path) / name).write_text(content)

    def rmdir(self, path: str) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if any(c.is_dir() for c in p.iterdir()) or self.read(str(p / "cgroup.procs")).strip():
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        for c in p.iterdir():
            c.unlink()
        p.rmdir()


def _v2_files(_path: Path) -> dict[str, str]:
    # (every cgroup but the real root has cgroup.type: fixtures delete the root's)
    return dict(V2_FILES, **{"cgroup.controllers": "cpu io memory pids", "cgroup.type": "domain\n"})


def _v1_files_for(cgroot: Path) -> Callable[[Path], dict[str, str]]:
    def files(path: Path) -> dict[str, str]:
        mount = path.relative_to(cgroot).parts[0]
        out = {"cgroup.procs": "", "tasks": ""}
        for ctrl in mount.split(","):
            out.update(V1_FILES.get(ctrl, {}))
        return out

    return files


def _make_dir(fs: FakeKernelFs, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in fs.files_for(path).items():
        (path / name).write_text(content)


def _write_proc_files(tmp: Path, mountinfo: str, proc_cgroup: str) -> tuple[str, str]:
    (tmp / "mountinfo").write_text(mountinfo)
    (tmp / "cgroup").write_text(proc_cgroup)
    return str(tmp / "mountinfo"), str(tmp / "cgroup")


@pytest.fixture
def v2_tree(tmp_path: Path) -> tuple[Path, FakeKernelFs, tuple[str, str]]:
    """A Debian 12 host: pure v2, the supervisor in its own service cgroup."""
    fsroot = tmp_path / "root"
    cgroot = fsroot / "sys/fs/cgroup"
    fs = FakeKernelFs(fsroot, _v2_files)
    _make_dir(fs, cgroot)
    (cgroot / "cgroup.type").unlink()  # the real root has none
    (cgroot / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (cgroot / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    own = cgroot / DEBIAN12_SERVICE.lstrip("/")
    _make_dir(fs, own)
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n")
    return fsroot, fs, _write_proc_files(tmp_path, DEBIAN12_MOUNTINFO, DEBIAN12_CGROUP)


@pytest.fixture
def v1_tree(tmp_path: Path) -> tuple[Path, FakeKernelFs, tuple[str, str]]:
    """This hybrid host, as a fake tree: v1 hierarchies, our memory cgroup not ours."""
    fsroot = tmp_path / "root"
    cgroot = fsroot / "sys/fs/cgroup"
    fs = FakeKernelFs(fsroot, _v1_files_for(cgroot))
    for mount in ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids"):
        _make_dir(fs, cgroot / mount)
    _make_dir(fs, cgroot / "memory" / HYBRID_MEMCG.lstrip("/"))
    (cgroot / "unified").mkdir()
    (cgroot / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    return fsroot, fs, _write_proc_files(tmp_path, HYBRID_MOUNTINFO, HYBRID_CGROUP)


def _detect(
    tree: tuple[Path, FakeKernelFs, tuple[str, str]], delegated: tuple[str, ...] = ()
) -> cgroup.CgroupHost:
    fsroot, fs, (mountinfo, proc_cgroup) = tree
    return cgroup.detect(mountinfo, proc_cgroup, delegated, fs_root=str(fsroot), fs=fs)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real, harmless child process to put into cgroups; always reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


ALL_LIMITS = CgroupLimits(
    cpu_percent=20, memory_bytes=64 << 20, pids=5, io_bps=1 << 20, io_device=(8, 0)
)

# --- limits and names -----------------------------------------------------------------


def test_limits_validate() -> None:
    assert CgroupLimits().requested() == {}
    assert CgroupLimits(cpu_percent=150, pids=3).requested() == {"cpu": 150, "pids": 3}
    for bad in ({"cpu_percent": 0}, {"memory_bytes": -1}, {"pids": True}, {"io_bps": 1.5}):
        with pytest.raises(ValueError, match="positive integer"):
            CgroupLimits(**bad)
    with pytest.raises(ValueError, match="major, minor"):
        CgroupLimits(io_bps=1, io_device=(8, -1))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x" * 65, "sp ace", "ümlaut"])
def test_create_rejects_bad_names(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]], name: str
) -> None:
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    with pytest.raises(ValueError, match="invalid cgroup name"):
        host.create(name, CgroupLimits())
    assert v2_tree[1].mkdirs == []


# --- detection ------------------------------------------------------------------------


def test_detect_debian12_pure_v2_delegated(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]],
) -> None:
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    assert host.version == "v2"
    assert host.available_controllers() == {"cpu", "memory", "pids", "io"}
    assert host.unavailable == {}
    assert host.unavailable_limits() == {}
    assert host.can_freeze()
    root = v2_tree[0]
    assert host.plugin_roots() == [f"{root}/sys/fs/cgroup{DEBIAN12_SERVICE}/forgeone"]
    described = host.describe()
    assert described["version"] == "v2"
    assert described["available"] == ["cpu", "io", "memory", "pids"]


def test_detect_v2_not_delegated_uses_nothing(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]],
) -> None:
    host = _detect(v2_tree)
    assert host.version == "v2"
    assert host.available_controllers() == set()
    assert set(host.unavailable_limits()) == {"cpu", "memory", "pids", "io"}
    assert "not delegated" in host.unavailable["memory"]
    assert not host.can_freeze()
    cg = host.create("p1", ALL_LIMITS)
    assert cg.paths == []
    assert set(cg.not_applied) == {"cpu", "memory", "pids", "io"}
    assert v2_tree[1].writes == []
    assert v2_tree[1].mkdirs == []


def test_detect_delegation_covers_subpaths(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]],
) -> None:
    assert _detect(v2_tree, ("/system.slice",)).available_controllers() == {
        "cpu",
        "memory",
        "pids",
        "io",
    }
    assert _detect(v2_tree, ("/system",)).available_controllers() == set()


def test_detect_v2_partial_delegation(v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]]) -> None:
    own = v2_tree[0] / "sys/fs/cgroup" / DEBIAN12_SERVICE.lstrip("/")
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    assert host.available_controllers() == {"cpu", "memory", "pids"}
    assert set(host.unavailable_limits()) == {"io"}
    cg = host.create("p1", ALL_LIMITS)
    try:
        assert "io" in cg.not_applied
        assert "io" not in cg.applied
        assert "absent from its cgroup.controllers" in cg.not_applied["io"]
    finally:
        cg.remove()


def test_detect_this_hybrid_host(v1_tree: tuple[Path, FakeKernelFs, tuple[str, str]]) -> None:
    host = _detect(v1_tree)
    assert host.version == "v1"
    assert host.available_controllers() == {"cpu", "cpuacct", "pids", "blkio", "freezer"}
    assert set(host.unavailable) == {"memory"}
    assert host.unavailable["memory"] == (
        f"v1 memory hierarchy not delegated: own cgroup {HYBRID_MEMCG} is neither '/' "
        "nor listed as delegated"
    )
    assert set(host.unavailable_limits()) == {"memory"}
    assert host.can_freeze()
    mounts = [h.mount_point for h in host.usable_hierarchies()]
    assert [m.rsplit("/", 1)[1] for m in mounts] == ["cpu", "cpuacct", "freezer", "blkio", "pids"]


def test_detect_hybrid_with_memory_delegated(
    v1_tree: tuple[Path, FakeKernelFs, tuple[str, str]],
) -> None:
    host = _detect(v1_tree, ("/process_api",))
    assert "memory" in host.available_controllers()
    assert host.unavailable == {}
    assert host.controller_dir("memory") == (f"{v1_tree[0]}/sys/fs/cgroup/memory{HYBRID_MEMCG}")


def test_detect_legacy_v1_comounted(tmp_path: Path) -> None:
    fsroot = tmp_path / "root"
    cgroot = fsroot / "sys/fs/cgroup"
    fs = FakeKernelFs(fsroot, _v1_files_for(cgroot))
    for mount in ("cpu,cpuacct", "memory", "pids", "blkio", "freezer"):
        _make_dir(fs, cgroot / mount)
    paths = _write_proc_files(tmp_path, LEGACY_MOUNTINFO, LEGACY_CGROUP)
    host = _detect((fsroot, fs, paths))
    assert host.version == "v1"
    assert host.available_controllers() == {"cpu", "cpuacct", "memory", "pids", "blkio", "freezer"}
    assert len(host.usable_hierarchies()) == 5
    with host.create("p1", CgroupLimits(cpu_percent=50, memory_bytes=1 << 30)) as cg:
        assert [p.split("sys/fs/cgroup/")[1] for p in cg.paths] == [
            "cpu,cpuacct/forgeone/p1",
            "memory/forgeone/p1",
            "pids/forgeone/p1",
            "blkio/forgeone/p1",
            "freezer/forgeone/p1",
        ]
        leaf = Path(cg.paths[0])
        assert (leaf / "cpu.cfs_quota_us").read_text() == "50000"
        assert (cgroot / "memory/forgeone/p1/memory.limit_in_bytes").read_text() == str(1 << 30)
        assert cg.not_applied == {}
    assert not (cgroot / "cpu,cpuacct/forgeone").exists()


def test_detect_no_cgroups(tmp_path: Path) -> None:
    mountinfo, proc_cgroup = _write_proc_files(tmp_path, NO_CGROUP_MOUNTINFO, "0::/\n")
    host = cgroup.detect(mountinfo, proc_cgroup, fs_root=str(tmp_path))
    assert host.version == "none"
    assert host.available_controllers() == set()
    assert set(host.unavailable_limits()) == {"cpu", "memory", "pids", "io"}
    cg = host.create("p1", CgroupLimits(cpu_percent=10, pids=3))
    assert cg.paths == []
    assert cg.applied == {}
    assert set(cg.not_applied) == {"cpu", "pids"}
    cg.add_pid(os.getpid())  # nothing to join: a no-op
    assert cg.pids() == []
    assert cg.stats() == {}
    with pytest.raises(SetupError, match="freeze") as info:
        cg.freeze()
    assert info.value.errno == errno.EOPNOTSUPP
    cg.remove()
    cg.remove()


def test_detect_unreadable_mountinfo(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="cgroup detect"):
        cgroup.detect(str(tmp_path / "absent"), str(tmp_path / "absent"))


def test_detect_mount_root_not_slash(tmp_path: Path) -> None:
    # A cgroup2 mount of a subtree (container): the own path is relative to the mount root.
    fsroot = tmp_path / "root"
    cgroot = fsroot / "sys/fs/cgroup"
    fs = FakeKernelFs(fsroot, _v2_files)
    _make_dir(fs, cgroot)
    (cgroot / "cgroup.controllers").write_text("cpu memory pids\n")
    _make_dir(fs, cgroot / "inner")
    mountinfo = "27 21 0:25 /ctr /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    paths = _write_proc_files(tmp_path, mountinfo, "0::/ctr/inner\n")
    host = _detect((fsroot, fs, paths), ("/ctr",))
    assert host.version == "v2"
    assert host.controller_dir("cpu") == f"{cgroot}/inner"
    paths = _write_proc_files(tmp_path, mountinfo, "0::/elsewhere\n")
    host = _detect((fsroot, fs, paths), ("/elsewhere",))
    assert host.available_controllers() == set()
    assert "not visible" in host.unavailable["cpu"]


# --- v2 against a fake tree -------------------------------------------------------------


def test_v2_create_writes_exact_files(v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]]) -> None:
    fsroot, fs, _ = v2_tree
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    svc = f"/sys/fs/cgroup{DEBIAN12_SERVICE}"
    cg = host.create("plug-1", ALL_LIMITS)
    try:
        assert fs.mkdirs == [f"{svc}/supervisor", f"{svc}/forgeone", f"{svc}/forgeone/plug-1"]
        leaf = f"{svc}/forgeone/plug-1"
        assert fs.writes == [
            # no internal processes: the supervisor leaves its own cgroup first
            (f"{svc}/supervisor/cgroup.procs", str(os.getpid())),
            (f"{svc}/cgroup.subtree_control", "+cpu"),
            (f"{svc}/cgroup.subtree_control", "+memory"),
            (f"{svc}/cgroup.subtree_control", "+pids"),
            (f"{svc}/cgroup.subtree_control", "+io"),
            (f"{svc}/forgeone/cgroup.subtree_control", "+cpu"),
            (f"{svc}/forgeone/cgroup.subtree_control", "+memory"),
            (f"{svc}/forgeone/cgroup.subtree_control", "+pids"),
            (f"{svc}/forgeone/cgroup.subtree_control", "+io"),
            (f"{leaf}/cpu.max", "20000 100000"),
            (f"{leaf}/memory.max", str(64 << 20)),
            (f"{leaf}/memory.swap.max", "0"),
            (f"{leaf}/memory.oom.group", "1"),
            (f"{leaf}/pids.max", "5"),
            (f"{leaf}/io.max", "8:0 rbps=1048576 wbps=1048576"),
        ]
        assert cg.applied == {
            "cpu": "cpu.max=20000 100000",
            "memory": f"memory.max={64 << 20}; memory.swap.max=0; memory.oom.group=1",
            "pids": "pids.max=5",
            "io": "io.max=8:0 rbps=1048576 wbps=1048576",
        }
        assert cg.not_applied == {}
        assert cg.paths == [str(fsroot) + leaf]
        assert host.supervisor_leaf == f"{fsroot}{svc}/supervisor"
        assert host.describe()["supervisor_leaf"] == host.supervisor_leaf
    finally:
        cg.remove()


def test_v2_second_plugin_does_not_move_again(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]],
) -> None:
    fsroot, fs, _ = v2_tree
    own = fsroot / "sys/fs/cgroup" / DEBIAN12_SERVICE.lstrip("/")
    (own / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    (own / "cgroup.procs").write_text("")  # the kernel moved the supervisor out already
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    with host.create("p2", CgroupLimits(pids=7)) as cg:
        assert [w for w in fs.writes if "supervisor" in w[0]] == []
        assert [w[0].rsplit("/", 2)[-2:] for w in fs.writes] == [
            ["forgeone", "cgroup.subtree_control"],
            ["forgeone", "cgroup.subtree_control"],
            ["forgeone", "cgroup.subtree_control"],
            ["forgeone", "cgroup.subtree_control"],
            ["p2", "pids.max"],
        ]
        assert cg.applied == {"pids": "pids.max=7"}
    assert host.supervisor_leaf is None


def test_v2_root_cgroup_never_moves(tmp_path: Path) -> None:
    # In the real root cgroup the no-internal-process rule does not apply.
    fsroot = tmp_path / "root"
    cgroot = fsroot / "sys/fs/cgroup"
    fs = FakeKernelFs(fsroot, _v2_files)
    _make_dir(fs, cgroot)
    (cgroot / "cgroup.type").unlink()  # the real root has none
    (cgroot / "cgroup.controllers").write_text("cpu io memory pids\n")
    (cgroot / "cgroup.procs").write_text(f"{os.getpid()}\n")
    paths = _write_proc_files(tmp_path, DEBIAN12_MOUNTINFO, "0::/\n")
    host = _detect((fsroot, fs, paths))
    with host.create("p", CgroupLimits(cpu_percent=5)) as cg:
        assert fs.mkdirs == ["/sys/fs/cgroup/forgeone", "/sys/fs/cgroup/forgeone/p"]
        assert ("/sys/fs/cgroup/cgroup.subtree_control", "+cpu") in fs.writes
        assert cg.applied == {"cpu": "cpu.max=5000 100000"}
    assert host.supervisor_leaf is None


def test_v2_the_root_of_a_cgroup_namespace_moves_out_like_any_cgroup(tmp_path: Path) -> None:
    """In a container's cgroup namespace /proc/self/cgroup says "0::/" too, but its root
    is an ordinary cgroup (it has cgroup.type): enabling controllers there while it holds
    the supervisor fails with EBUSY, so the supervisor moves to a leaf first."""
    fsroot = tmp_path / "root"
    cgroot = fsroot / "sys/fs/cgroup"
    fs = FakeKernelFs(fsroot, _v2_files)
    _make_dir(fs, cgroot)  # (keeps its cgroup.type: not the real root)
    (cgroot / "cgroup.controllers").write_text("cpu io memory pids\n")
    (cgroot / "cgroup.procs").write_text(f"{os.getpid()}\n")
    paths = _write_proc_files(tmp_path, DEBIAN12_MOUNTINFO, "0::/\n")
    host = _detect((fsroot, fs, paths))
    with host.create("p", CgroupLimits(cpu_percent=5)) as cg:
        assert host.supervisor_leaf is not None
        moved = [w for w in fs.writes if w[0].endswith(f"{SUPERVISOR_LEAF}/cgroup.procs")]
        assert moved == [(f"/sys/fs/cgroup/{SUPERVISOR_LEAF}/cgroup.procs", str(os.getpid()))]
        assert cg.applied == {"cpu": "cpu.max=5000 100000"}


def test_v2_a_subtree_removed_under_us_is_prepared_again(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]],
) -> None:
    """Another supervisor's remove() takes the empty forgeone/ away between our preparing
    it and making our leaf: it is made again with our controllers enabled in it (a plain
    mkdir would leave it without, and our leaf without its limit files)."""
    _, fs, _ = v2_tree
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    real_mkdir = fs.mkdir
    raced: list[str] = []

    def racing_mkdir(path: str) -> None:
        if path.endswith("/forgeone/p") and not raced:
            raced.append(path)
            fs.rmdir(os.path.dirname(path))  # the other supervisor's remove()
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        real_mkdir(path)

    fs.mkdir = racing_mkdir  # type: ignore[method-assign]
    with host.create("p", CgroupLimits(cpu_percent=5)) as cg:
        assert raced
        enables = [v for p, v in fs.writes if p.endswith("/forgeone/cgroup.subtree_control")]
        assert enables, fs.writes
        assert all(enables.count(v) == 2 for v in enables), enables
        assert cg.applied == {"cpu": "cpu.max=5000 100000"}


def test_v2_swap_file_absent_and_io_without_device(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]],
) -> None:
    fs = v2_tree[1]
    fs.files_for = lambda p: {k: v for k, v in _v2_files(p).items() if k != "memory.swap.max"}
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    with host.create("p", CgroupLimits(memory_bytes=1 << 20, io_bps=100)) as cg:
        assert cg.applied == {"memory": f"memory.max={1 << 20}; memory.oom.group=1"}
        assert cg.not_applied == {
            "memory_swap": "memory.swap.max absent (no swap accounting)",
            "io": "no block device given for io_bps",
        }


def test_v2_failed_write_cleans_up(v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]]) -> None:
    fsroot, fs, _ = v2_tree
    fs.files_for = lambda p: {k: v for k, v in _v2_files(p).items() if k != "pids.max"}
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    with pytest.raises(SetupError, match=r"pids\.max") as info:
        host.create("p", CgroupLimits(pids=3))
    assert info.value.errno == errno.ENOENT
    svc = fsroot / "sys/fs/cgroup" / DEBIAN12_SERVICE.lstrip("/")
    assert not (svc / "forgeone").exists()
    assert (svc / "supervisor").is_dir()  # holds the supervisor: never removed


def test_v2_existing_leaf_is_an_error(v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]]) -> None:
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    with host.create("dup", CgroupLimits()):
        with pytest.raises(SetupError, match="cgroup create") as info:
            host.create("dup", CgroupLimits())
        assert info.value.errno == errno.EEXIST


def test_v2_add_pid_freeze_thaw_kill(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]], sleeper: subprocess.Popen[bytes]
) -> None:
    fs = v2_tree[1]
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    cg = host.create("p", CgroupLimits())
    leaf = Path(cg.paths[0])
    cg.add_pid(sleeper.pid)
    assert cg.pids() == [sleeper.pid]
    fs.writes.clear()
    cg.freeze()
    cg.thaw()
    cg.kill()
    rel = fs.rel(str(leaf))
    assert fs.writes[:3] == [
        (f"{rel}/cgroup.freeze", "1"),
        (f"{rel}/cgroup.freeze", "0"),
        (f"{rel}/cgroup.kill", "1"),
    ]
    assert sleeper.wait(5) == -9
    assert cg.pids() == []
    cg.remove()
    assert not leaf.exists()


def test_v2_stats(v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]]) -> None:
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    with host.create("p", CgroupLimits()) as cg:
        leaf = Path(cg.paths[0])
        (leaf / "cpu.stat").write_text(
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 9\nnr_throttled 4\n"
            "throttled_usec 77\n"
        )
        (leaf / "memory.current").write_text("4096\n")
        (leaf / "memory.peak").write_text("8192\n")
        (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        (leaf / "pids.current").write_text("2\n")
        (leaf / "io.stat").write_text(
            "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n"
            "8:16 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n"
        )
        assert cg.stats() == {
            "cpu_usage_ns": 1_500_000,
            "nr_throttled": 4,
            "memory_current": 4096,
            "memory_peak": 8192,
            "oom_kill": 1,
            "pids_current": 2,
            "io_read_bytes": 101,
            "io_write_bytes": 202,
        }


def test_v2_remove_idempotent_and_never_foreign(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]],
) -> None:
    fsroot, fs, _ = v2_tree
    svc = fsroot / "sys/fs/cgroup" / DEBIAN12_SERVICE.lstrip("/")
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    a = host.create("a", CgroupLimits())
    b = host.create("b", CgroupLimits())
    foreign = svc / "someone-else"
    _make_dir(fs, foreign)
    a.remove()
    assert not (svc / "forgeone/a").exists()
    assert (svc / "forgeone/b").is_dir()  # forgeone/ still has a plugin: kept
    a.remove()  # idempotent
    b.remove()
    b.remove()
    assert not (svc / "forgeone").exists()
    assert foreign.is_dir()
    assert (svc / "supervisor").is_dir()
    assert svc.is_dir()
    assert host.existing_plugin_dirs() == []


def test_v2_remove_tolerates_vanished_dirs(
    v2_tree: tuple[Path, FakeKernelFs, tuple[str, str]],
) -> None:
    host = _detect(v2_tree, (DEBIAN12_SERVICE,))
    cg = host.create("gone", CgroupLimits())
    fs = v2_tree[1]
    fs.rmdir(cg.paths[0])  # someone (a previous remove) got there first
    cg.remove()
    assert host.existing_plugin_dirs() == []


# --- v1 against a fake tree -------------------------------------------------------------


def test_v1_create_writes_exact_files(v1_tree: tuple[Path, FakeKernelFs, tuple[str, str]]) -> None:
    fsroot, fs, _ = v1_tree
    cgroot = fsroot / "sys/fs/cgroup"
    host = _detect(v1_tree)
    limits = CgroupLimits(
        cpu_percent=20, memory_bytes=1 << 26, pids=5, io_bps=1 << 20, io_device=(254, 0)
    )
    cg = host.create("plug-1", limits)
    try:
        assert [fs.rel(p) for p in cg.paths] == [
            "/sys/fs/cgroup/cpu/forgeone/plug-1",
            "/sys/fs/cgroup/cpuacct/forgeone/plug-1",
            "/sys/fs/cgroup/freezer/forgeone/plug-1",
            "/sys/fs/cgroup/blkio/forgeone/plug-1",
            "/sys/fs/cgroup/pids/forgeone/plug-1",
        ]
        for untouched in ("memory", "cpuset", "devices"):
            assert not (cgroot / untouched / "forgeone").exists()
        assert not (cgroot / "memory" / HYBRID_MEMCG.lstrip("/") / "forgeone").exists()
        cpu = cgroot / "cpu/forgeone/plug-1"
        assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
        assert (cpu / "cpu.cfs_quota_us").read_text() == "20000"
        assert (cgroot / "pids/forgeone/plug-1/pids.max").read_text() == "5"
        blkio = cgroot / "blkio/forgeone/plug-1"
        assert (blkio / "blkio.throttle.read_bps_device").read_text() == "254:0 1048576"
        assert (blkio / "blkio.throttle.write_bps_device").read_text() == "254:0 1048576"
        assert cg.applied == {
            "cpu": "cpu.cfs_period_us=100000; cpu.cfs_quota_us=20000",
            "pids": "pids.max=5",
            "io": (
                "blkio.throttle.read_bps_device=254:0 1048576; "
                "blkio.throttle.write_bps_device=254:0 1048576"
            ),
        }
        assert cg.not_applied == {"memory": host.unavailable["memory"]}
        assert "v1 memory hierarchy not delegated" in cg.not_applied["memory"]
    finally:
        cg.remove()
    assert host.existing_plugin_dirs() == []
    for mount in ("cpu", "cpuacct", "freezer", "blkio", "pids"):
        assert not (cgroot / mount / "forgeone").exists()
        assert (cgroot / mount).is_dir()


def test_v1_memory_when_delegated(v1_tree: tuple[Path, FakeKernelFs, tuple[str, str]]) -> None:
    fsroot, _, _ = v1_tree
    host = _detect(v1_tree, (HYBRID_MEMCG,))
    with host.create("m", CgroupLimits(memory_bytes=1 << 26)) as cg:
        mem = fsroot / "sys/fs/cgroup/memory" / HYBRID_MEMCG.lstrip("/") / "forgeone/m"
        assert str(mem) in cg.paths
        assert (mem / "memory.limit_in_bytes").read_text() == str(1 << 26)
        assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(1 << 26)
        assert cg.applied == {
            "memory": f"memory.limit_in_bytes={1 << 26}; memory.memsw.limit_in_bytes={1 << 26}"
        }
        assert cg.not_applied == {}
    assert not (mem.parent).exists()
    assert mem.parent.parent.is_dir()  # the own (delegated) cgroup itself stays


def test_v1_add_pid_freeze_stats_kill(
    v1_tree: tuple[Path, FakeKernelFs, tuple[str, str]], sleeper: subprocess.Popen[bytes]
) -> None:
    fsroot, fs, _ = v1_tree
    host = _detect(v1_tree)
    cg = host.create("p", CgroupLimits())
    fs.writes.clear()
    cg.add_pid(sleeper.pid)
    assert [w for w in fs.writes] == [
        (fs.rel(p) + "/cgroup.procs", str(sleeper.pid)) for p in cg.paths
    ]
    freezer = Path(cg.paths[2])
    cg.freeze()
    assert (freezer / "freezer.state").read_text() == "FROZEN"
    cg.thaw()
    assert (freezer / "freezer.state").read_text() == "THAWED"
    cgroot = fsroot / "sys/fs/cgroup"
    (cgroot / "cpuacct/forgeone/p/cpuacct.usage").write_text("123456789\n")
    (cgroot / "cpu/forgeone/p/cpu.stat").write_text(
        "nr_periods 10\nnr_throttled 3\nthrottled_time 9\n"
    )
    (cgroot / "pids/forgeone/p/pids.current").write_text("1\n")
    (cgroot / "blkio/forgeone/p/blkio.throttle.io_service_bytes").write_text(
        "254:0 Read 4096\n254:0 Write 8192\n254:0 Sync 0\n254:0 Async 0\n"
        "254:0 Total 12288\nTotal 12288\n"
    )
    assert cg.stats() == {
        "cpu_usage_ns": 123456789,
        "nr_throttled": 3,
        "pids_current": 1,
        "io_read_bytes": 4096,
        "io_write_bytes": 8192,
    }
    cg.freeze()
    cg.remove()  # kills (thawing the frozen cgroup so SIGKILL lands), then removes
    assert sleeper.wait(5) == -9
    assert (freezer / "freezer.state").exists() is False
    assert host.existing_plugin_dirs() == []


def test_v1_never_removes_foreign_dirs(v1_tree: tuple[Path, FakeKernelFs, tuple[str, str]]) -> None:
    fsroot, fs, _ = v1_tree
    cgroot = fsroot / "sys/fs/cgroup"
    other = cgroot / "pids/forgeone/other-plugin"
    _make_dir(fs, other)
    foreign = cgroot / "cpu/not-ours"
    _make_dir(fs, foreign)
    host = _detect(v1_tree)
    cg = host.create("p", CgroupLimits(pids=2))
    cg.remove()
    cg.remove()
    assert other.is_dir()
    assert foreign.is_dir()
    assert (cgroot / "pids/forgeone").is_dir()
    assert not (cgroot / "cpu/forgeone").exists()
    assert host.existing_plugin_dirs() == [str(cgroot / "pids/forgeone"), str(other)]


def test_v1_freeze_without_freezer(tmp_path: Path) -> None:
    fsroot = tmp_path / "root"
    cgroot = fsroot / "sys/fs/cgroup"
    fs = FakeKernelFs(fsroot, _v1_files_for(cgroot))
    _make_dir(fs, cgroot / "pids")
    mountinfo = "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
    paths = _write_proc_files(tmp_path, mountinfo, "8:pids:/\n")
    host = _detect((fsroot, fs, paths))
    assert not host.can_freeze()
    assert "no v1 freezer hierarchy is mounted" in host.unavailable["freezer"]
    with host.create("p", CgroupLimits(cpu_percent=10)) as cg:
        assert cg.not_applied == {"cpu": "no v1 cpu hierarchy is mounted"}
        with pytest.raises(SetupError, match="freeze") as info:
            cg.freeze()
        assert info.value.errno == errno.EOPNOTSUPP


# --- real v1 on this host -------------------------------------------------------------

BUSY = "while True: pass"
FORKER = """
import os, sys, time
sys.stdin.readline()
kids, err = [], 0
for _ in range(10):
    try:
        pid = os.fork()
    except BlockingIOError as e:
        err = e.errno
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
print(len(kids), err, flush=True)
sys.stdin.readline()
"""

real = pytest.mark.usefixtures("leak_check")


def _name(tag: str) -> str:
    return f"t{os.getpid()}-{tag}"


def _popen(code: str, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE if stdin else None,
        text=True,
    )


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream:
            stream.close()


def _usage(cg: cgroup.PluginCgroup) -> int:
    return cg.stats()["cpu_usage_ns"]


def _cpu_shares(cgs: list[cgroup.PluginCgroup], seconds: float) -> list[float]:
    """Fraction of one core each cgroup used over the same wall-clock window."""
    start = [_usage(cg) for cg in cgs]
    t0 = time.monotonic()
    time.sleep(seconds)
    end = [_usage(cg) for cg in cgs]
    elapsed = time.monotonic() - t0
    return [(e - s) / (elapsed * 1e9) for s, e in zip(start, end, strict=True)]


@pytest.mark.requires_root
@pytest.mark.requires_cgroup
@real
def test_real_cpu_limit_bites_side_by_side() -> None:
    host = cgroup.detect()
    limited = host.create(_name("cpu20"), CgroupLimits(cpu_percent=20, pids=5))
    free = host.create(_name("cpufree"), CgroupLimits())
    procs = [_popen(BUSY), _popen(BUSY)]
    try:
        want = "cpu.max=20000 100000" if host.version == "v2" else "cpu.cfs_quota_us=20000"
        assert limited.applied["cpu"].endswith(want), limited.applied
        limited.add_pid(procs[0].pid)
        free.add_pid(procs[1].pid)
        # Both on one CPU: the unlimited twin takes what the capped one leaves there.
        cpu = max(os.sched_getaffinity(0))
        for p in procs:
            os.sched_setaffinity(p.pid, {cpu})
        time.sleep(0.2)  # past the first period's burst
        # Other work shares this machine: the unlimited twin must show, in at least one of
        # three 1 s windows, more than the cap allows; the limited one never exceeds it.
        windows = []
        for _ in range(3):
            share_limited, share_free = _cpu_shares([limited, free], 1.0)
            windows.append((round(share_limited, 3), round(share_free, 3)))
            assert 0.05 < share_limited <= 0.25, windows
            if share_free > 0.4:
                break
        print("cpu share per window (limited, unlimited):", windows)
        assert max(free_share for _, free_share in windows) > 0.4, windows
        assert limited.stats()["nr_throttled"] > 0
    finally:
        limited.remove()
        free.remove()
        for p in procs:
            _reap(p)


@pytest.mark.requires_root
@pytest.mark.requires_cgroup
@real
def test_real_pids_limit_bites() -> None:
    host = cgroup.detect()
    if "pids" not in host.available_controllers():
        pytest.skip("pids controller unavailable: " + host.unavailable.get("pids", ""))
    results = {}
    for tag, limits in (("pids5", CgroupLimits(pids=5)), ("pidsfree", CgroupLimits())):
        cg = host.create(_name(tag), limits)
        proc = _popen(FORKER, stdin=True)
        try:
            cg.add_pid(proc.pid)
            assert proc.stdin is not None
            assert proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            forked, err = proc.stdout.readline().split()
            results[tag] = (int(forked), int(err))
            assert len(cg.pids()) == 1 + int(forked)
        finally:
            cg.remove()  # kills the forker and its children, all inside the cgroup
            _reap(proc)
        assert cg.pids() == []
    # the forker itself is one of the five: four forks, then EAGAIN
    assert results["pids5"] == (4, errno.EAGAIN)
    assert results["pidsfree"] == (10, 0)


@pytest.mark.requires_root
@pytest.mark.requires_cgroup
@real
def test_real_freeze_stops_cpu_accounting() -> None:
    host = cgroup.detect()
    if not host.can_freeze():
        pytest.skip("no freezer")
    cg = host.create(_name("freeze"), CgroupLimits())
    proc = _popen(BUSY)
    try:
        cg.add_pid(proc.pid)
        time.sleep(0.1)
        cg.freeze()
        # What ran just before the freeze can reach cpu.stat a tick or two later (a
        # guest under qemu TCG has shown 8 ms); a busy loop left running would add ~500.
        time.sleep(0.1)
        frozen_a = _usage(cg)
        time.sleep(0.5)
        frozen_b = _usage(cg)
        assert frozen_b - frozen_a < 25_000_000  # < 5% of a CPU in 0.5 s frozen
        cg.thaw()
        time.sleep(0.3)
        assert _usage(cg) - frozen_b > 50_000_000  # it runs again
        cg.freeze()  # and a frozen cgroup still dies on remove()
    finally:
        cg.remove()
        _reap(proc)
    assert proc.returncode == -9


@pytest.mark.requires_root
@pytest.mark.requires_cgroup
@real
def test_real_remove_leaves_nothing() -> None:
    host = cgroup.detect()
    cg = host.create(_name("rm"), CgroupLimits(cpu_percent=50, pids=10))
    code = (
        "import os, sys, time\nsys.stdin.readline()\nos.fork()\nprint(flush=True)\ntime.sleep(60)"
    )
    proc = _popen(code, stdin=True)
    try:
        cg.add_pid(proc.pid)
        assert proc.pid in cg.pids()
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.stdout.readline()
        assert len(cg.pids()) == 2  # child and grandchild, both inside
        paths = list(cg.paths)
        with cg:
            pass
        assert all(not os.path.exists(p) for p in paths)
        cg.remove()  # idempotent
    finally:
        cg.remove()
        _reap(proc)
    assert proc.returncode == -9
    assert not [d for d in host.existing_plugin_dirs() if _name("rm") in d]


@pytest.mark.requires_root
@pytest.mark.requires_cgroup
@real
def test_real_host_reports_memory_fallback() -> None:
    host = cgroup.detect()
    with host.create(_name("mem"), CgroupLimits(memory_bytes=64 << 20)) as cg:
        if "memory" in host.available_controllers():
            assert "memory" in cg.applied
        else:
            assert cg.not_applied["memory"] == host.unavailable["memory"]
            assert "memory" not in cg.applied


DIRECT_WRITER = """
import mmap, os, sys, time
sys.stdin.readline()
block = mmap.mmap(-1, 1 << 16)  # page-aligned, as O_DIRECT wants
block.write(b"x" * (1 << 16))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
t0 = time.monotonic()
for _ in range(int(sys.argv[2]) >> 16):
    os.write(fd, block)
os.fsync(fd)
os.close(fd)
print(time.monotonic() - t0, flush=True)
"""


def _timed_direct_write(cg: cgroup.PluginCgroup, target: Path, nbytes: int) -> float:
    proc = subprocess.Popen(
        [sys.executable, "-c", DIRECT_WRITER, str(target), str(nbytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        cg.add_pid(proc.pid)
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert proc.wait(30) == 0
        return float(line)
    finally:
        _reap(proc)


@pytest.mark.requires_root
@pytest.mark.requires_cgroup
@real
def test_real_io_limit_bites(tmp_path: Path) -> None:
    host = cgroup.detect()
    ctrl = "io" if host.version == "v2" else "blkio"
    if ctrl not in host.available_controllers():
        pytest.skip(f"{ctrl} unavailable: {host.unavailable.get(ctrl, '')}")
    device = cgroup.backing_device(str(tmp_path))
    if device is None:
        pytest.skip(f"{tmp_path} is on no block device")
    bps, nbytes = 1 << 20, 2 << 20
    limited = host.create(_name("io"), CgroupLimits(io_bps=bps, io_device=device))
    free = host.create(_name("iofree"), CgroupLimits())
    try:
        assert "io" in limited.applied
        slow = _timed_direct_write(limited, tmp_path / "limited.bin", nbytes)
        fast = _timed_direct_write(free, tmp_path / "free.bin", nbytes)
        expected = nbytes / bps
        assert 0.8 * expected <= slow <= 1.2 * expected, slow
        assert fast < 0.5 * expected, fast
        assert limited.stats()["io_write_bytes"] >= nbytes
    finally:
        limited.remove()
        free.remove()


def test_backing_device(tmp_path: Path) -> None:
    sysroot = tmp_path / "sys"
    st = os.stat(tmp_path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    assert cgroup.backing_device(str(tmp_path), str(sysroot)) is None  # no such block node
    disk = sysroot / "devices/virtual/block/vdz"
    part = disk / "vdz1"
    part.mkdir(parents=True)
    (disk / "dev").write_text("254:16\n")
    (part / "partition").write_text("1\n")
    (sysroot / "dev/block").mkdir(parents=True)
    (sysroot / "dev/block" / f"{major}:{minor}").symlink_to(part)
    assert cgroup.backing_device(str(tmp_path), str(sysroot)) == (254, 16)
    (part / "partition").unlink()
    assert cgroup.backing_device(str(tmp_path), str(sysroot)) == (major, minor)
