"""forgeone_isolate.doctor: exit status, the table, the JSON object."""

from __future__ import annotations

import io
import json

import pytest

from forgeone_isolate import cgroup, doctor, probes
from forgeone_isolate.probes import Probe


@pytest.mark.requires_root
@pytest.mark.requires_userns
@pytest.mark.requires_seccomp
def test_doctor_table_on_this_host() -> None:
    out = io.StringIO()
    assert doctor.run_doctor(False, out) == 0
    text = out.getvalue()
    assert text.startswith("probe ")
    for name in ("root", "userns", "mountns", "seccomp", "cgroup", "landlock", "wasmtime"):
        assert f"\n{name} " in text
    assert "launch possible" in text
    host = cgroup.detect()
    if "memory" in host.unavailable_limits():
        # This hybrid host: memory is not in a cgroup, and doctor says what holds it and why.
        line = next(x for x in text.splitlines() if x.strip().startswith("memory "))
        assert "held by RLIMIT_AS and wasmtime StoreLimits" in line
        assert "because" in line
        if host.version == "v1":
            assert "v1 memory hierarchy not delegated" in line


@pytest.mark.requires_root
@pytest.mark.requires_userns
@pytest.mark.requires_seccomp
def test_doctor_json_on_this_host() -> None:
    out = io.StringIO()
    assert doctor.run_doctor(True, out) == 0
    report = json.loads(out.getvalue())
    assert set(report) == {"launch_possible", "reason", "probes", "limits", "cgroup"}
    assert report["launch_possible"] is True
    assert {p["name"] for p in report["probes"]} >= set(probes.REQUIRED)
    assert set(report["limits"]) == {"cpu", "memory", "pids", "io"}
    for info in report["limits"].values():
        assert set(info) == {"held_by", "cgroup", "reason"}
    assert report["cgroup"]["version"] in ("v1", "v2", "none")


def test_doctor_fails_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(host: object = None) -> list[Probe]:
        return [Probe("root", False, "euid 1000"), Probe("userns", True, "ok")]

    monkeypatch.setattr(probes, "all_probes", fake)
    out = io.StringIO()
    assert doctor.run_doctor(False, out) == 1
    text = out.getvalue()
    assert "\nroot    MISSING   euid 1000\n" in text
    assert "launch impossible: needs root (euid 1000)" in text
    out = io.StringIO()
    assert doctor.run_doctor(True, out) == 1
    report = json.loads(out.getvalue())
    assert report["launch_possible"] is False
    assert report["reason"].startswith("launch impossible: needs root")
