"""The service registry (no root): installs, downgrades, dependencies, states, instances."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from forgeone_isolate.registry import (
    Candidate,
    Installed,
    Registry,
    RegistryError,
    dependency_problems,
)
from forgeone_isolate.semver import Range, Version

SIGNER = "a" * 64
OTHER = "b" * 64


def cand(
    name: str,
    version: str,
    signer: str = SIGNER,
    deps: dict[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[Candidate, bytes]:
    body = data if data is not None else f"{name}-{version}-{signer}".encode()
    return (
        Candidate(
            name=name,
            version=Version.parse(version),
            signer=signer,
            sha256=hashlib.sha256(body).hexdigest(),
            dependencies={k: Range.parse(v) for k, v in (deps or {}).items()},
            limits={"memory_mb": 16},
        ),
        body,
    )


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "state")
    yield r  # type: ignore[misc]
    r.close()


def install(reg: Registry, name: str, version: str, **kw: object) -> tuple[str, Installed]:
    allow = bool(kw.pop("allow_downgrade", False))
    c, data = cand(name, version, **kw)  # type: ignore[arg-type]
    return reg.install(c, data, allow_downgrade=allow)


def test_install_stores_bytes_by_hash_and_records(reg: Registry) -> None:
    kind, row = install(reg, "hello", "1.0.0")
    assert kind == "new"
    assert row.desired == "stopped"
    path = reg.package_path(row.sha256)
    assert path.read_bytes() == f"hello-1.0.0-{SIGNER}".encode()
    assert path.stat().st_mode & 0o777 == 0o600
    assert reg.get("hello") == row
    assert [r.name for r in reg.all()] == ["hello"]
    assert row.limits == {"memory_mb": 16}


def test_same_bytes_again_is_a_no_op(reg: Registry) -> None:
    install(reg, "hello", "1.0.0")
    kind, _ = install(reg, "hello", "1.0.0")
    assert kind == "same"
    assert len(reg.history("hello")) == 1


def test_upgrade_replaces_and_drops_the_old_package(reg: Registry) -> None:
    _, old = install(reg, "hello", "1.0.0")
    reg.set_desired("hello", "running")
    kind, new = install(reg, "hello", "1.1.0")
    assert kind == "upgrade"
    assert new.version == "1.1.0"
    assert new.desired == "running"  # the operator's wish survives an upgrade
    assert not reg.package_path(old.sha256).exists()
    assert reg.package_path(new.sha256).exists()
    assert [h["version"] for h in reg.history("hello")] == ["1.0.0", "1.1.0"]


def test_downgrade_refused_unless_allowed(reg: Registry) -> None:
    install(reg, "hello", "2.0.0")
    with pytest.raises(RegistryError, match=r"downgrade from the installed 2\.0\.0 refused"):
        install(reg, "hello", "1.9.9")
    assert reg.get("hello").version == "2.0.0"  # type: ignore[union-attr]
    kind, row = install(reg, "hello", "1.9.9", allow_downgrade=True)
    assert (kind, row.version) == ("downgrade", "1.9.9")


def test_prerelease_is_lower(reg: Registry) -> None:
    install(reg, "hello", "1.0.0")
    with pytest.raises(RegistryError, match="downgrade"):
        install(reg, "hello", "1.0.0-rc.1")


def test_same_version_other_bytes_refused(reg: Registry) -> None:
    install(reg, "hello", "1.0.0")
    with pytest.raises(RegistryError, match="already installed with other contents"):
        install(reg, "hello", "1.0.0", data=b"different")
    kind, _ = install(reg, "hello", "1.0.0", data=b"different", allow_downgrade=True)
    assert kind == "reinstall"


def test_another_signer_cannot_take_a_name(reg: Registry) -> None:
    install(reg, "hello", "1.0.0")
    with pytest.raises(RegistryError, match=f"already installed from signer {SIGNER}"):
        install(reg, "hello", "9.0.0", signer=OTHER)


def test_missing_dependency_named(reg: Registry) -> None:
    with pytest.raises(RegistryError) as info:
        install(reg, "app", "1.0.0", deps={"libfoo": "^1.2.0", "libbar": ">=2.0.0"})
    message = str(info.value)
    assert "libbar >=2.0.0 is not installed" in message
    assert "libfoo ^1.2.0 is not installed" in message
    assert reg.get("app") is None


def test_conflicting_dependency_named(reg: Registry) -> None:
    install(reg, "libfoo", "2.0.0")
    with pytest.raises(
        RegistryError, match=r"libfoo \^1\.2\.0 conflicts with the installed libfoo 2\.0\.0"
    ):
        install(reg, "app", "1.0.0", deps={"libfoo": "^1.2.0"})
    install(reg, "libfoo", "1.5.0", allow_downgrade=True)
    kind, _ = install(reg, "app", "1.0.0", deps={"libfoo": "^1.2.0"})
    assert kind == "new"


def test_upgrade_that_breaks_a_dependent_refused(reg: Registry) -> None:
    install(reg, "libfoo", "1.5.0")
    install(reg, "app", "1.0.0", deps={"libfoo": "~1.5.0"})
    with pytest.raises(RegistryError, match=r"app 1\.0\.0 depends on libfoo ~1\.5\.0, not 1\.6\.0"):
        install(reg, "libfoo", "1.6.0")
    kind, _ = install(reg, "libfoo", "1.5.1")
    assert kind == "upgrade"


def test_uninstall_refused_while_depended_on(reg: Registry) -> None:
    install(reg, "libfoo", "1.0.0")
    install(reg, "app", "1.0.0", deps={"libfoo": "^1.0.0"})
    assert [r.name for r in reg.dependents("libfoo")] == ["app"]
    with pytest.raises(RegistryError, match=r"uninstall libfoo: required by app \(\^1\.0\.0\)"):
        reg.uninstall("libfoo")
    row = reg.uninstall("app")
    assert not reg.package_path(row.sha256).exists()
    reg.uninstall("libfoo")
    assert reg.all() == []
    with pytest.raises(RegistryError, match="not installed"):
        reg.uninstall("libfoo")


def test_shared_package_file_kept_until_unused(reg: Registry) -> None:
    body = b"same bytes"
    a, _ = cand("a", "1.0.0", data=body)
    b, _ = cand("b", "1.0.0", data=body)
    reg.install(a, body)
    reg.install(b, body)
    reg.uninstall("a")
    assert reg.package_path(a.sha256).exists()
    reg.uninstall("b")
    assert not reg.package_path(a.sha256).exists()


def test_desired_state_and_restart_policy(reg: Registry) -> None:
    install(reg, "hello", "1.0.0")
    for state in ("running", "paused", "stopped"):
        reg.set_desired("hello", state)
        assert reg.get("hello").desired == state  # type: ignore[union-attr]
    with pytest.raises(RegistryError, match="state must be one of"):
        reg.set_desired("hello", "dancing")
    with pytest.raises(RegistryError, match="not installed"):
        reg.set_desired("ghost", "running")
    reg.set_restart("hello", "no", 2)
    row = reg.get("hello")
    assert row is not None
    assert (row.restart_policy, row.max_restarts) == ("no", 2)
    with pytest.raises(RegistryError, match="restart policy"):
        reg.set_restart("hello", "always", None)


def test_install_with_restart_policy(reg: Registry) -> None:
    c, data = cand("hello", "1.0.0")
    _, row = reg.install(c, data, restart_policy="no", max_restarts=0)
    assert (row.restart_policy, row.max_restarts) == ("no", 0)
    with pytest.raises(RegistryError, match="restart policy"):
        reg.install(c, data, restart_policy="sometimes")


def test_state_survives_reopening(tmp_path: Path) -> None:
    r = Registry(tmp_path)
    c, data = cand("hello", "1.0.0")
    r.install(c, data)
    r.set_desired("hello", "paused")
    r.add_instance("abc123", "hello", ["/sys/fs/cgroup/x/forgeone/hello-abc123"])
    r.close()
    again = Registry(tmp_path)
    try:
        row = again.get("hello")
        assert row is not None
        assert row.desired == "paused"
        assert again.instances() == [
            ("abc123", "hello", ["/sys/fs/cgroup/x/forgeone/hello-abc123"])
        ]
        again.remove_instance("abc123")
        assert again.instances() == []
    finally:
        again.close()
    assert (tmp_path / "registry.sqlite3").stat().st_mode & 0o777 == 0o600


def test_only_instance_rows_skip_the_disk_sync(reg: Registry) -> None:
    """Instance rows (crash cleanup of cgroups, which a reboot removes anyway) commit
    without fsync; every other write, before and after them, stays synchronous=FULL."""

    def synchronous() -> int:
        return int(reg._db.execute("PRAGMA synchronous").fetchone()[0])

    assert synchronous() == 2  # FULL
    seen: list[int] = []
    reg._db.set_trace_callback(
        lambda sql: seen.append(synchronous()) if sql.startswith("INSERT OR REPLACE") else None
    )
    reg.add_instance("i1", "hello", ["/x"])
    reg._db.set_trace_callback(None)
    assert seen == [1]  # NORMAL while the row was written
    assert synchronous() == 2
    with pytest.raises(sqlite3.IntegrityError):
        reg.add_instance("i2", None, [])  # type: ignore[arg-type]  # NOT NULL name
    assert synchronous() == 2  # restored after a failed write too
    reg.remove_instance("i1")
    assert synchronous() == 2
    assert reg.instances() == []


def test_reads_do_not_wait_for_a_write_in_progress(reg: Registry) -> None:
    """A start's reads (get, all) never queue behind another's durable commit: the writer
    holds its lock across the fsync; reads have their own connection (WAL) and see the
    last commit."""
    c, data = cand("hello", "1.0.0")
    reg.install(c, data)
    held, release = threading.Event(), threading.Event()

    def slow_writer() -> None:
        with reg._lock:  # as set_desired does across its commit's fsync
            held.set()
            release.wait(5.0)

    t = threading.Thread(target=slow_writer)
    t.start()
    try:
        assert held.wait(5.0)
        started = time.monotonic()
        row = reg.get("hello")
        assert [r.name for r in reg.all()] == ["hello"]
        assert time.monotonic() - started < 1.0  # (it would wait the writer's 5 s)
        assert row is not None
        assert row.desired == "stopped"
    finally:
        release.set()
        t.join()
    reg.set_desired("hello", "running")
    row = reg.get("hello")
    assert row is not None
    assert row.desired == "running"  # the commit, seen at once


def test_package_path_refuses_non_digests(reg: Registry) -> None:
    with pytest.raises(ValueError, match="not a sha256"):
        reg.package_path("../../etc/passwd")


def test_dependency_problems_pure() -> None:
    installed = {
        "lib": Installed("lib", "1.2.3", SIGNER, "0" * 64, 1, 0.0, {}, {}),
        "app": Installed("app", "1.0.0", SIGNER, "1" * 64, 1, 0.0, {"lib": ">=1.2.0 <2.0.0"}, {}),
    }
    assert (
        dependency_problems(
            "new", Version.parse("1.0.0"), {"lib": Range.parse("^1.2.0")}, installed
        )
        == []
    )
    assert dependency_problems("lib", Version.parse("1.9.0"), {}, installed) == []
    assert dependency_problems("lib", Version.parse("2.0.0"), {}, installed) == [
        "app 1.0.0 depends on lib >=1.2.0 <2.0.0, not 2.0.0"
    ]


def test_packages_no_row_names_are_removed_at_start(reg: Registry) -> None:
    """A crash between storing a package and committing its row (or inside a write) leaves
    a file nothing names: removed, and the named ones kept."""
    _, row = install(reg, "kept", "1.0.0")
    orphan = reg.package_path("c" * 64)
    orphan.write_bytes(b"stored, never recorded")
    stray = reg.packages_dir / f".{'d' * 64}.forgepkg.abc123.tmp"
    stray.write_bytes(b"half")
    removed = reg.remove_unreferenced_packages()
    assert sorted(removed) == sorted([orphan.name, stray.name])
    assert not orphan.exists()
    assert not stray.exists()
    assert reg.package_path(row.sha256).exists()
    assert reg.remove_unreferenced_packages() == []
