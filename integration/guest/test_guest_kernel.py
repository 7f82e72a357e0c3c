"""Smoke suite of the integration guest: proves the environment the v2 tests rely on.

A pure cgroup-v2 kernel (no v1 hierarchy at all) whose cpu, io, memory and pids limits
bite, unprivileged user namespaces, seccomp, and the project importable from the 9p
source share with its dependencies installed from wheels. Each test reports the figure it
measured (listed at the end of the run). Runs only inside the guest that
``integration/run.py`` boots (``FORGEONE_GUEST=1``); anywhere else it is skipped.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest

if os.environ.get("FORGEONE_GUEST") != "1":
    pytest.skip(
        "runs only inside the integration guest (python3 integration/run.py)",
        allow_module_level=True,
    )

# Selected along with the v2 host tests by `-m requires_cgroup2`.
pytestmark = [pytest.mark.requires_root, pytest.mark.requires_cgroup2]

CGROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "io", "memory", "pids")
Figure = Callable[[str], None]


def keyed(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (memory.events, cpu.stat, pids.events) as a dict."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = int(value)
    return out


def in_cgroup(cgroup: Path, argv: list[str]) -> list[str]:
    """argv, run by a shell that first moves itself into cgroup, then execs it."""
    join = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'
    return ["sh", "-c", join, "sh", str(cgroup), *argv]


@pytest.fixture
def cgroup(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh child of the root cgroup with cpu, io, memory and pids enabled."""
    (CGROOT / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
    path = CGROOT / ("smoke-" + re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name))
    path.mkdir()
    try:
        yield path
    finally:
        (path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 30
        while (path / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        path.rmdir()


def test_pure_cgroup2_with_the_controllers(figure: Figure) -> None:
    controllers = (CGROOT / "cgroup.controllers").read_text().split()
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    cgroup_mounts = [(m[1], m[2], m[3]) for m in mounts if m[2].startswith("cgroup")]
    figure(f"controllers: {' '.join(controllers)}; cgroup mounts: {cgroup_mounts}")
    assert set(CONTROLLERS) <= set(controllers)
    assert cgroup_mounts == [(str(CGROOT), "cgroup2", cgroup_mounts[0][2])]
    assert "nsdelegate" in cgroup_mounts[0][2].split(",")
    assert Path("/proc/self/cgroup").read_text().startswith("0::/")
    assert len(Path("/proc/self/cgroup").read_text().splitlines()) == 1
    # cgroup_no_v1=all: no v1 controller can be mounted, not even by root.
    target = Path("/tmp/v1-probe")
    target.mkdir(exist_ok=True)
    probe = subprocess.run(
        ["mount", "-t", "cgroup", "-o", "memory", "cgroup", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode == 0:
        subprocess.run(["umount", str(target)], check=False)
    assert probe.returncode != 0, "a v1 memory hierarchy could be mounted"


def test_memory_max_oom_kills_the_child(cgroup: Path, figure: Figure) -> None:
    (cgroup / "memory.max").write_text("64M")
    if (cgroup / "memory.swap.max").exists():
        (cgroup / "memory.swap.max").write_text("0")
    started = time.monotonic()
    proc = subprocess.run(
        in_cgroup(cgroup, [sys.executable, "-c", "b = b'x' * (200 << 20); print(len(b))"]),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    events = keyed(cgroup / "memory.events")
    peak = (
        (cgroup / "memory.peak").read_text().strip() if (cgroup / "memory.peak").exists() else "?"
    )
    figure(
        f"200 MB under memory.max=64M: exit {proc.returncode}, oom_kill={events['oom_kill']}, "
        f"memory.peak={peak}, {time.monotonic() - started:.1f} s"
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert events["oom_kill"] >= 1


def test_cpu_max_holds_a_busy_loop(cgroup: Path, figure: Figure) -> None:
    (cgroup / "cpu.max").write_text("20000 100000")
    proc = subprocess.Popen(in_cgroup(cgroup, ["sh", "-c", "while :; do :; done"]))
    try:
        deadline = time.monotonic() + 60
        while not (cgroup / "cgroup.procs").read_text().strip():
            assert time.monotonic() < deadline, "the busy loop never joined its cgroup"
            time.sleep(0.01)
        usage0 = keyed(cgroup / "cpu.stat")["usage_usec"]
        t0 = time.monotonic()
        time.sleep(2.0)
        stat = keyed(cgroup / "cpu.stat")
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    share = (stat["usage_usec"] - usage0) / 1e6 / elapsed
    figure(
        f"busy loop under cpu.max 20000 100000: {share:.1%} of a CPU over {elapsed:.2f} s, "
        f"nr_throttled={stat['nr_throttled']}"
    )
    assert share <= 0.25
    assert share >= 0.05, "the busy loop hardly ran: the measurement proves nothing"
    assert stat["nr_throttled"] >= 1


FORK_UNTIL_REFUSED = """
import os, time
n, refused = 0, ""
for _ in range(20):
    try:
        pid = os.fork()
    except OSError as error:
        refused = error.strerror
        break
    if pid == 0:
        os.close(1)
        os.close(2)
        time.sleep(60)
        os._exit(0)
    n += 1
print(n, refused)
"""


def test_pids_max_refuses_forks(cgroup: Path, figure: Figure) -> None:
    (cgroup / "pids.max").write_text("8")
    proc = subprocess.run(
        in_cgroup(cgroup, [sys.executable, "-c", FORK_UNTIL_REFUSED]),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    count, _, refused = proc.stdout.strip().partition(" ")
    events = keyed(cgroup / "pids.events")
    figure(
        f"pids.max=8: {count} forks succeeded beside the parent, then {refused!r}; "
        f"pids.events max={events['max']}"
    )
    assert int(count) == 7
    assert refused
    assert events["max"] >= 1


DIRECT_WRITE = """
import mmap, os, sys, time
buf = mmap.mmap(-1, 1 << 20)
buf.write(b"x" * (1 << 20))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
started = time.monotonic()
for _ in range(4):
    assert os.write(fd, buf) == 1 << 20
os.fsync(fd)
print(time.monotonic() - started)
os.close(fd)
"""


def test_io_max_throttles_direct_writes(cgroup: Path, figure: Figure) -> None:
    device = Path("/sys/block/vda/dev").read_text().strip()
    (cgroup / "io.max").write_text(f"{device} wbps=1048576")
    target = Path("/var/tmp/forgeone-io-smoke")  # on the root disk (a qemu snapshot)
    try:
        proc = subprocess.run(
            in_cgroup(cgroup, [sys.executable, "-c", DIRECT_WRITE, str(target)]),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        target.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr
    elapsed = float(proc.stdout.strip())
    stat = (cgroup / "io.stat").read_text()
    written = re.search(rf"^{re.escape(device)} .*\bwbytes=(\d+)", stat, re.MULTILINE)
    figure(
        f"4 MiB O_DIRECT to vda ({device}) under wbps=1MiB: {elapsed:.2f} s "
        f"({4 / elapsed:.2f} MiB/s); io.stat wbytes={written.group(1) if written else '?'}"
    )
    assert elapsed >= 2.5
    assert written is not None
    assert int(written.group(1)) >= 4 << 20


def test_unprivileged_user_namespaces(figure: Figure) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "unshare",
            "-Urmpn",
            "--fork",
            "--mount-proc",
            "sh",
            "-c",
            "echo $(id -u) $$ $(ip -o link | wc -l)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - started
    figure(f"unshare -Urmpn as uid 65534: {proc.stdout.strip()!r} in {elapsed * 1000:.0f} ms")
    assert proc.returncode == 0, proc.stderr
    # root in the new user namespace, PID 1 of the new PID namespace, loopback only.
    assert proc.stdout.split() == ["0", "1", "1"]


SECCOMP_PROBE = """
import errno, os, pyseccomp
f = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
f.add_rule(pyseccomp.ERRNO(errno.EPERM), "mkdir")
f.add_rule(pyseccomp.ERRNO(errno.EPERM), "mkdirat")
f.load()
try:
    os.mkdir("/tmp/seccomp-probe")
except PermissionError:
    print("EPERM")
"""


def test_seccomp_filters(figure: Figure) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SECCOMP_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    figure(f"mkdir under a seccomp ERRNO(EPERM) rule: {proc.stdout.strip() or proc.stderr}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "EPERM"


WAT = '(module (func (export "answer") (result i32) i32.const 42))'


def test_project_and_wheels_import(figure: Figure) -> None:
    # Imported here, not at the top: a host without the guest's wheels still collects this.
    mods = {
        name: importlib.import_module(name)
        for name in (
            "forgeone_isolate.errors",
            "wasmtime",
            "cryptography.hazmat.primitives.asymmetric.ed25519",
            "pyseccomp",
            "prctl",
            "psutil",
            "pyroute2",
            "cgroupspy",
        )
    }
    source = Path(str(mods["forgeone_isolate.errors"].__file__)).parent
    assert source == Path.cwd() / "forgeone_isolate"  # the copy of the 9p source share
    wasmtime = mods["wasmtime"]
    store = wasmtime.Store(wasmtime.Engine())
    module = wasmtime.Module(store.engine, WAT)
    answer = wasmtime.Instance(store, module, []).exports(store)["answer"]
    assert answer(store) == 42
    key = mods["cryptography.hazmat.primitives.asymmetric.ed25519"].Ed25519PrivateKey.generate()
    key.public_key().verify(key.sign(b"forgeone"), b"forgeone")
    assert not mods["prctl"].get_no_new_privs()
    assert mods["psutil"].Process().pid == os.getpid()
    with mods["pyroute2"].IPRoute() as ipr:
        links = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    assert "lo" in links
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in (
            "wasmtime",
            "cryptography",
            "pyseccomp",
            "python-prctl",
            "psutil",
            "pyroute2",
            "cgroupspy",
            "pytest",
            "hypothesis",
        )
    )
    figure(f"forgeone_isolate from {source}; {versions}; wasm answer 42; links {links}")
