"""forgeone_isolate.probes and the marker hook of tests/conftest.py."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest

from forgeone_isolate import cgroup, probes
from forgeone_isolate.probes import Probe

REQUIRED_OK = [Probe(name, True, "fine") for name in probes.REQUIRED]


def _none_host(tmp_path: Path) -> cgroup.CgroupHost:
    (tmp_path / "mountinfo").write_text("22 27 0:21 / /proc rw,relatime - proc proc rw\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    return cgroup.detect(str(tmp_path / "mountinfo"), str(tmp_path / "cgroup"))


def test_probe_is_frozen() -> None:
    p = Probe("x", True, "d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.ok = False  # type: ignore[misc]


def test_probe_root_and_kernel() -> None:
    assert probes.probe_root().ok == (os.geteuid() == 0)
    kernel = probes.probe_kernel()
    assert kernel.ok
    assert os.uname().release in kernel.detail


def test_probe_wasmtime_and_landlock_report() -> None:
    wasm = probes.probe_wasmtime()
    assert wasm.ok
    assert wasm.detail.startswith("wasmtime ")
    landlock = probes.probe_landlock()
    assert landlock.detail.startswith("ABI ") if landlock.ok else "unavailable" in landlock.detail


def test_probe_kvm_is_informational() -> None:
    kvm = probes.probe_kvm()
    assert kvm.name == "kvm"
    assert "/dev/kvm" in kvm.detail
    assert "kvm" not in probes.REQUIRED


def test_cgroup_probes_on_a_host_without_cgroups(tmp_path: Path) -> None:
    host = _none_host(tmp_path)
    assert not probes.probe_cgroup(host).ok
    assert not probes.probe_cgroup2(host).ok
    limits = probes.limit_probes(host)
    assert [p.name for p in limits] == ["limit.cpu", "limit.memory", "limit.pids", "limit.io"]
    assert not any(p.ok for p in limits)
    memory = limits[1]
    assert memory.detail.startswith("held by RLIMIT_AS and wasmtime StoreLimits")


@pytest.mark.requires_cgroup
def test_cgroup_probe_on_this_host() -> None:
    host = cgroup.detect()
    probe = probes.probe_cgroup(host)
    assert probe.ok
    assert probe.detail.startswith(host.version)
    for limit in probes.limit_probes(host):
        name = limit.name.removeprefix("limit.")
        assert limit.ok == (name not in host.unavailable_limits())


def test_launch_possible_needs_every_required_probe() -> None:
    for missing in probes.REQUIRED:
        found = [p if p.name != missing else Probe(missing, False, "nope") for p in REQUIRED_OK]
        ok, reason = probes.launch_possible(found)
        assert not ok
        assert f"needs {missing} (nope)" in reason
    ok, reason = probes.launch_possible([])
    assert not ok
    assert "root (not probed)" in reason


def test_launch_possible_without_cgroups_is_loud() -> None:
    found = [*REQUIRED_OK, Probe("cgroup", False, "none"), Probe("limit.memory", False, "x")]
    ok, reason = probes.launch_possible(found)
    assert ok
    assert "WITHOUT cgroups" in reason


def test_launch_possible_names_fallbacks() -> None:
    found = [
        *REQUIRED_OK,
        Probe("cgroup", True, "v1"),
        Probe("limit.cpu", True, "cgroup v1"),
        Probe("limit.memory", False, "held by ..."),
    ]
    ok, reason = probes.launch_possible(found)
    assert ok
    assert "memory -> RLIMIT_AS and wasmtime StoreLimits" in reason
    found = [*REQUIRED_OK, Probe("cgroup", True, "v2"), Probe("limit.cpu", True, "cgroup v2")]
    assert probes.launch_possible(found) == (True, "launch possible; every limit held by a cgroup")


@pytest.mark.requires_root
@pytest.mark.requires_userns
def test_probe_userns_really_unshares() -> None:
    probe = probes.probe_userns()
    assert probe.ok, probe.detail
    assert "unshare(CLONE_NEWUSER) works" in probe.detail


@pytest.mark.requires_root
def test_probe_mountns_leaves_nothing_behind() -> None:
    before = set(os.listdir(tempfile.gettempdir()))
    with open("/proc/self/mountinfo") as f:
        mounts_before = f.read()
    probe = probes.probe_mountns()
    assert probe.ok, probe.detail
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts_before
    leftovers = set(os.listdir(tempfile.gettempdir())) - before
    assert not [d for d in leftovers if d.startswith("forgeone-probe-")]


@pytest.mark.requires_seccomp
def test_probe_seccomp_filter_loads_in_child_only() -> None:
    probe = probes.probe_seccomp()
    assert probe.ok, probe.detail
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    assert status["Seccomp"].strip() == "0"  # the filter went to the probe's child only
    os.uname()


def test_all_probes_order_and_names() -> None:
    names = [p.name for p in probes.all_probes()]
    assert names[:5] == ["kernel", "root", "userns", "mountns", "seccomp"]
    assert "cgroup" in names
    assert names[-3:] == ["landlock", "wasmtime", "kvm"]


# --- the marker hook -------------------------------------------------------------------


def _item(*marks: str) -> pytest.Item:
    marks_ = [getattr(pytest.mark, m).mark for m in marks]
    return SimpleNamespace(iter_markers=lambda: marks_)  # type: ignore[return-value]


def test_marker_hook_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "_probe", lambda name: Probe("userns", False, "EPERM"))
    monkeypatch.delenv(conftest.MUST_ISOLATE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="requires_userns: userns unavailable: EPERM"):
        conftest.pytest_runtest_setup(_item("requires_userns"))
    monkeypatch.setenv(conftest.MUST_ISOLATE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="FORGEONE_MUST_ISOLATE=1 forbids skipping"):
        conftest.pytest_runtest_setup(_item("requires_userns"))
    conftest.pytest_runtest_setup(_item("parametrize"))  # unrelated markers: no probe


def test_marker_hook_passes_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "_probe", lambda name: Probe(name, True, "ok"))
    monkeypatch.setenv(conftest.MUST_ISOLATE_ENV, "1")
    conftest.pytest_runtest_setup(_item("requires_root", "requires_cgroup2"))
