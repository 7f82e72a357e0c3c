"""`launch` end to end on this host, as root: the report, and every layer seen from outside.

Each test runs ``python -m forgeone_isolate launch`` as a subprocess. While the ``wait``
plugin sits in ``start`` (about 2 s), the test finds PID 1 among the subprocess's
descendants and reads /proc itself: it does not take the report's word for anything.
After every launch: PID 1 is gone and its cgroup directories with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import time_scale

from forgeone_isolate import cgroup

pytest.register_assert_rewrite("plugin_utils")
from plugin_utils import (  # noqa: E402
    PLUGINS,
    PROMPT_S,
    Packer,
    Signer,
    find_sandboxed_pid,
    proc_status_field,
    rseq_registered,
    run_launch,
    start_launch,
    wait_gone,
)

pytest_plugins = ["plugin_utils"]  # fixtures: signer, packer, state_dir, no_stray_processes

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.requires_userns,
    pytest.mark.requires_seccomp,
    pytest.mark.requires_cgroup,
    pytest.mark.usefixtures("leak_check", "no_stray_processes"),
]

NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")
CAP_SETS = ("cap_eff", "cap_prm", "cap_inh", "cap_bnd", "cap_amb")
ZERO_CAPS = "0000000000000000"
MIN_HOST_UID = 1_000_000


def assert_nothing_left(report: dict[str, Any]) -> None:
    """PID 1 is gone (not even a zombie of ours) and its cgroup directories with it."""
    pid = report["isolation"].get("pid")
    if pid is not None:
        assert wait_gone(pid), f"PID 1 ({pid}) still exists after the launch"
    for path in report["isolation"]["cgroup_limits"]["paths"]:
        assert not os.path.exists(path), f"cgroup {path} left behind"


def finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    """Wait for a background launch; return its exit status, report and stderr."""
    out, err = proc.communicate(timeout=60)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, f"no report (exit {proc.returncode}); stderr: {err}"
    return proc.returncode, json.loads(lines[-1]), err


# ------------------------------------------------------------------------- the report


def test_hello_report_has_every_isolation_field(
    packer: Packer, signer: Signer, state_dir: Path
) -> None:
    done = run_launch(packer.example("hello"), signer, state_dir, "--json")
    assert done.returncode == 0, done.stderr
    report = done.report()
    assert report["status"] == "ok", report
    assert report["reason"] == ""
    assert report["signer"] == signer.fingerprint
    assert report["plugin"]["name"] == "hello"

    iso = report["isolation"]
    assert iso["namespaces"] == dict.fromkeys(NAMESPACES, True)
    assert iso["seccomp"] == 2
    assert iso["no_new_privs"] == 1
    for name in CAP_SETS:
        assert iso[name] == ZERO_CAPS, name
    assert iso["uid_map"][0] == "0"
    assert iso["uid_map"][2] == "1"
    host_uid = int(iso["uid_map"][1])
    assert host_uid >= MIN_HOST_UID
    assert iso["gid_map"] == ["0", str(host_uid), "1"]
    assert iso["uid"].split() == [str(host_uid)] * 4
    assert iso["interfaces"] == ["lo"]
    assert iso["mounts"] == ["/"]
    ours = [line for line in iso["cgroup"] if "/forgeone/" in line]
    assert ours, iso["cgroup"]
    instance = report["plugin"]["instance"]
    # the name ends with the supervisor's pid, so a later launch can sweep what a killed
    # supervisor left behind
    assert all(re.search(rf"/forgeone/hello-{instance}-s\d+$", line) for line in ours)
    assert iso["cgroup_limits"]["paths"]
    assert [log["text"] for log in report["logs"]] == ["hello from an isolated plugin"]
    assert_nothing_left(report)


def test_the_sweep_spares_young_leaves_of_unknown_supervisors() -> None:
    """A leaf named for a supervisor pid we cannot see may belong to a supervisor in another
    pid namespace, between creating it and moving its keeper in: the sweep leaves it alone
    until it is STALE_GRACE_S old, and removes it after."""
    from forgeone_isolate.launch import sweep_stale_cgroups

    hosts = cgroup.detect()
    if not any(h.usable for h in hosts.hierarchies):
        pytest.skip("no usable cgroup hierarchy")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid nobody has now
    made = hosts.create(f"sweeptest-{os.getpid()}-s{gone.pid}", cgroup.CgroupLimits())
    try:
        assert made.paths
        assert not any(p in sweep_stale_cgroups(hosts) for p in made.paths)
        assert all(os.path.isdir(p) for p in made.paths)
        removed = sweep_stale_cgroups(hosts, grace_s=0.0)
        assert set(made.paths) <= set(removed), (made.paths, removed)
    finally:
        made.remove()


def test_dry_run_prints_the_plan_and_starts_nothing(
    packer: Packer, signer: Signer, state_dir: Path
) -> None:
    before = set(cgroup.detect().existing_plugin_dirs())
    done = run_launch(packer.example("hello"), signer, state_dir, "--dry-run")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["plugin"] == "hello"
    assert tuple(plan["namespaces"]) == NAMESPACES
    assert plan["host_uid"] == -1  # nothing leased
    assert plan["network"] == "loopback"
    assert plan["seccomp"]["default"] == "kill_process"
    assert plan["seccomp"]["bad_arch"] == "kill_process"
    assert "openat" not in plan["seccomp"]["allow"]
    assert plan["rlimits"]["core"] == {"soft": 0, "hard": 0}
    assert plan["memory_bytes"] == 16 * 1024 * 1024
    created = {d for d in cgroup.detect().existing_plugin_dirs() if "/hello-" in d} - before
    assert not created


# ------------------------------------------------------- every layer, seen from outside


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/<pid>/limits: name -> (soft, hard)."""
    out = {}
    for line in _read(f"/proc/{pid}/limits").splitlines()[1:]:
        parts = line[:26].strip(), line[26:].split()
        out[parts[0]] = (parts[1][0], parts[1][1])
    return out


def _cgroup_dirs_of(pid: int) -> list[str]:
    """The directories of ``pid``'s cgroups in every hierarchy the supervisor uses."""
    lines = [ln.split(":", 2) for ln in _read(f"/proc/{pid}/cgroup").splitlines()]
    dirs = []
    for h in cgroup.detect().usable_hierarchies():
        for _, ctrls, path in lines:
            if (h.kind == "cgroup2" and ctrls == "") or set(ctrls.split(",")) & h.controllers:
                dirs.append(os.path.join(h.mount_point, path.lstrip("/")))
                break
        else:
            pytest.fail(f"PID 1 is in no cgroup of hierarchy {h.mount_point}")
    return dirs


def test_every_layer_from_outside_while_the_plugin_runs(
    packer: Packer, signer: Signer, state_dir: Path
) -> None:
    proc = start_launch(packer.plugin("wait"), signer, state_dir, "--json")
    try:
        pid = find_sandboxed_pid(proc.pid)

        status = _status(pid)
        assert status["Seccomp"] == "2"
        assert status["NoNewPrivs"] == "1"
        for key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
            assert status[key] == ZERO_CAPS, key
        assert status["NSpid"].split()[-1] == "1"  # PID 1 of its own namespace
        # No handler of the supervisor's Python survives in PID 1 (wasmtime's own trap
        # handlers for SIGILL/SIGFPE/SIGSEGV/SIGBUS are expected).
        caught = int(_read(f"/proc/{pid}/status").split("SigCgt:")[1].split()[0], 16)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            assert not caught & (1 << (sig - 1)), f"PID 1 still catches {sig.name}"
        uid_map = _read(f"/proc/{pid}/uid_map").split()
        assert uid_map[0] == "0"
        assert uid_map[2] == "1"
        host_uid = int(uid_map[1])
        assert host_uid >= MIN_HOST_UID
        assert _read(f"/proc/{pid}/gid_map").split() == ["0", str(host_uid), "1"]
        assert _read(f"/proc/{pid}/setgroups").strip() == "deny"
        assert status["Uid"].split() == [str(host_uid)] * 4
        assert status["Gid"].split() == [str(host_uid)] * 4
        assert status["Groups"] == ""

        for name in NAMESPACES:
            theirs = os.readlink(f"/proc/{pid}/ns/{name}")
            assert theirs != os.readlink(f"/proc/self/ns/{name}"), name

        cg_dirs = _cgroup_dirs_of(pid)
        for d in cg_dirs:
            assert f"/{cgroup.SUBTREE}/wait-" in d, d
            assert str(pid) in _read(os.path.join(d, "cgroup.procs")).split(), d

        assert os.listdir(f"/proc/{pid}/root") == []  # an empty root

        # PID 1 is the supervisor's own child: the keeper made it with CLONE_PARENT and
        # ended at once (reaped when it said PID 1's pid), so PID 1's wait status comes
        # from the kernel, not through a process that shared its memory.
        assert psutil.Process(pid).ppid() == proc.pid
        assert [c.pid for c in psutil.Process(proc.pid).children()] == [pid]
        # glibc's rseq area lay in the thread block they shared: PID 1 holds it
        assert rseq_registered(pid)
        interfaces = [
            line.split(":", 1)[0].strip() for line in _read(f"/proc/{pid}/net/dev").splitlines()[2:]
        ]
        assert interfaces == ["lo"]
        mountinfo = _read(f"/proc/{pid}/mountinfo").splitlines()
        assert len(mountinfo) == 1, mountinfo
        fields = mountinfo[0].split()
        assert fields[4] == "/"
        assert "ro" in fields[5].split(",")
        assert fields[fields.index("-") + 1] == "tmpfs"

        limits = _limits(pid)
        assert limits["Max core file size"] == ("0", "0")
        assert limits["Max open files"] == ("16", "16")
        assert limits["Max address space"][0] != "unlimited"
        assert proc.poll() is None, "the launch ended while the test was still looking"
    except BaseException:
        proc.kill()
        proc.communicate()
        raise

    rc, report, err = finish(proc)
    assert rc == 0, err
    assert report["status"] == "ok", report
    assert report["isolation"]["pid"] == pid
    # the keeper as the supervisor saw it when it ended: its own filter, no_new_privs, no
    # capability in any set
    keeper = report["isolation"]["keeper"]
    assert (keeper["seccomp"], keeper["no_new_privs"]) == (2, 1), keeper
    assert all(keeper[k] == ZERO_CAPS for k in ("cap_eff", "cap_prm", "cap_inh", "cap_bnd")), keeper
    assert report["isolation"]["uid_map"] == uid_map
    assert [log["text"] for log in report["logs"]] == ["waiting"]
    assert wait_gone(pid)
    for d in cg_dirs:
        assert not os.path.exists(d), f"{d} left behind"
    assert_nothing_left(report)


# ----------------------------------------------------------------------- hostile plugins


@pytest.mark.parametrize(
    ("plugin", "status", "reason_check"),
    [
        ("spin", "killed", lambda r: "timeout" in r),
        ("memgrow", "killed", lambda r: r.startswith("memory")),
        ("trap", "error", lambda r: "unreachable" in r),
        ("fail", "error", lambda r: "start returned 7" in r),
        ("deeprec", "error", lambda r: "call stack exhausted" in r),
        ("oob", "error", lambda r: "out of bounds memory access" in r),
    ],
)
def test_hostile_plugin_is_stopped_and_reported(
    packer: Packer,
    signer: Signer,
    state_dir: Path,
    plugin: str,
    status: str,
    reason_check: Any,
) -> None:
    timeout_s = json.loads((PLUGINS / f"{plugin}.json").read_text())["limits"]["timeout_s"]
    done = run_launch(packer.plugin(plugin), signer, state_dir, "--json")
    assert done.returncode == 1, done.stderr
    report = done.report()
    assert report["status"] == status, report
    assert reason_check(report["reason"]), report["reason"]
    assert done.wall_s < (timeout_s + 3) * time_scale()
    assert_nothing_left(report)


# ------------------------------------------------------------------ supervisor SIGTERM


def test_sigterm_to_the_supervisor_leaves_nothing(
    packer: Packer, signer: Signer, state_dir: Path
) -> None:
    proc = start_launch(packer.plugin("wait"), signer, state_dir, "--json")
    try:
        pid = find_sandboxed_pid(proc.pid)
        keeper = psutil.Process(pid).ppid()
        cg_dirs = _cgroup_dirs_of(pid)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, report, err = finish(proc)
    assert time.monotonic() - sent < PROMPT_S
    assert rc == 1, err
    assert report["status"] == "killed"
    assert report["reason"] == "supervisor terminated"
    assert wait_gone(pid), "PID 1 outlived its supervisor"
    assert wait_gone(keeper), "the keeper outlived its supervisor"
    for d in cg_dirs:
        assert not os.path.exists(d), f"{d} left behind"
    assert_nothing_left(report)


def test_sigkill_to_the_supervisor_takes_the_plugin_down(
    packer: Packer, signer: Signer, state_dir: Path
) -> None:
    """No cleanup code runs on SIGKILL: PR_SET_PDEATHSIG must still take both children.

    The plugin's cgroup directories do stay (nobody is left to remove them); the test
    removes them once they are empty, which they must be.
    """
    proc = start_launch(packer.plugin("wait"), signer, state_dir, "--json")
    try:
        pid = find_sandboxed_pid(proc.pid)
        keeper = psutil.Process(pid).ppid()
        cg_dirs = _cgroup_dirs_of(pid)
    finally:
        proc.kill()
        proc.communicate()
    assert wait_gone(pid), "PID 1 outlived its SIGKILLed supervisor"
    assert wait_gone(keeper), "the keeper outlived its SIGKILLed supervisor"
    for d in cg_dirs:
        assert _read(os.path.join(d, "cgroup.procs")).split() == [], d
        os.rmdir(d)
        with contextlib.suppress(OSError):  # forgeone/ itself, if we made it and it is empty
            os.rmdir(os.path.dirname(d))


# --------------------------------------------------------------------- two at a time


def test_uid_leases_of_different_ranges_pick_different_links(tmp_path: Path) -> None:
    """A service with its own uid range and a one-shot launch with the default one, at the
    same time: their plugins' network links are picked from one base, so they differ (the
    first uid of each range both picked link 0 before)."""
    from forgeone_isolate import netns
    from forgeone_isolate.uidpool import DEFAULT_FIRST, lease_uid

    pool = netns.AddressPool(netns.DEFAULT_NETWORK)
    with (
        lease_uid(tmp_path, first=DEFAULT_FIRST + 64, count=100) as service,
        lease_uid(tmp_path, first=DEFAULT_FIRST, count=100) as one_shot,
    ):
        assert service.uid != one_shot.uid
        assert pool.lease(service.index % pool.capacity) != pool.lease(
            one_shot.index % pool.capacity
        )


def test_concurrent_launches_get_distinct_host_uids(
    packer: Packer, signer: Signer, state_dir: Path
) -> None:
    procs = [start_launch(packer.plugin("wait"), signer, state_dir, "--json") for _ in range(2)]
    try:
        pids = [find_sandboxed_pid(p.pid) for p in procs]
        # both sandboxes exist at the same time
        uids = [proc_status_field(pid, "Uid") for pid in pids]
        assert all(u is not None for u in uids)
    except BaseException:
        for p in procs:
            p.kill()
            p.communicate()
        raise
    reports = [finish(p) for p in procs]
    for rc, report, err in reports:
        assert rc == 0, err
        assert report["status"] == "ok", report
    maps = [report["isolation"]["uid_map"][1] for _, report, _ in reports]
    assert maps[0] != maps[1]
    assert {u.split()[0] for u in uids if u} == set(maps)
    for _, report, _ in reports:
        assert_nothing_left(report)


def test_a_guest_may_grow_past_the_engine_reservation(
    packer: Packer, signer: Signer, state_dir: Path
) -> None:
    """bigmem grows to ~120 MiB (memory_mb 256): past wasmtime's 64 MiB reservation the memory
    moves; that must fit under RLIMIT_AS and the filter."""
    done = run_launch(packer.plugin("bigmem"), signer, state_dir, "--json")
    assert done.returncode == 0, done.stderr
    report = done.report()
    assert (report["status"], report["reason"]) == ("ok", ""), report
    assert [entry["text"] for entry in report["logs"]] == ["grown"]
    assert_nothing_left(report)
