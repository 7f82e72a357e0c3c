"""The service's registry: installed plugins, their desired state and restart policy (SQLite).

One row per installed plugin name (``plugins``); the verified package bytes are kept in
``<state_dir>/packages/<sha256>.forgepkg`` (the plugin host verifies them again at every
start). ``installs`` keeps every version ever installed per identity (signer, name), for
the record. ``instances`` lists the cgroup directories of plugin instances the service has
started, so a service restarted after a crash can remove what its dead plugins left.

Install rules (:meth:`Registry.check_install`), each refusal a :class:`RegistryError` naming
what is wrong:

- a name installed by another signer is refused (uninstall it first);
- a lower version than the one the same signer has installed is a downgrade: refused
  unless ``allow_downgrade``; the same version with other bytes likewise;
- every ``dependencies`` entry of the manifest must name an installed plugin whose version
  satisfies the range (missing and conflicting ones are all named);
- an upgrade must keep satisfying the ranges of the installed plugins that depend on it.

Uninstall is refused while another installed plugin depends on the plugin (named).

Thread-safe: one connection guarded by a lock (the service calls it from several threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from forgeone_isolate.errors import BadInputError
from forgeone_isolate.package import write_atomic
from forgeone_isolate.semver import Range, SemverError, Version

DESIRED_STATES: Final = ("running", "stopped", "paused")
RESTART_POLICIES: Final = ("no", "on-failure")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS plugins (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    signer TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    installed_at REAL NOT NULL,
    dependencies TEXT NOT NULL,
    limits TEXT NOT NULL,
    desired TEXT NOT NULL DEFAULT 'stopped',
    restart_policy TEXT,
    max_restarts INTEGER,
    wasm_sha256 TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS installs (
    signer TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    installed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    instance TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    cgroups TEXT NOT NULL,
    started_at REAL NOT NULL
);
"""


_COLUMNS: Final = (
    "name, version, signer, sha256, size, installed_at, dependencies, limits, desired,"
    " restart_policy, max_restarts, wasm_sha256"
)


class RegistryError(BadInputError):
    """Raised when an install, uninstall or state change is refused (the reason named)."""


@dataclass(frozen=True)
class Installed:
    """One installed plugin."""

    name: str
    version: str
    signer: str
    sha256: str
    size: int
    installed_at: float
    dependencies: dict[str, str]
    limits: dict[str, int]
    desired: str = "stopped"
    restart_policy: str | None = None  # None: the service's default
    max_restarts: int | None = None
    wasm_sha256: str = ""  # the guest module's digest (names its compiled artifact)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "version": self.version,
            "signer": self.signer,
            "sha256": self.sha256,
            "size": self.size,
            "installed_at": self.installed_at,
            "dependencies": dict(self.dependencies),
            "limits": dict(self.limits),
            "desired": self.desired,
            "restart_policy": self.restart_policy,
            "max_restarts": self.max_restarts,
            "wasm_sha256": self.wasm_sha256,
        }


@dataclass(frozen=True)
class Candidate:
    """What an install would add: the attested facts of a package."""

    name: str
    version: Version
    signer: str
    sha256: str
    dependencies: Mapping[str, Range] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)
    wasm_sha256: str = ""


def dependency_problems(
    name: str,
    version: Version,
    dependencies: Mapping[str, Range],
    installed: Mapping[str, Installed],
) -> list[str]:
    """Why ``name`` ``version`` with ``dependencies`` cannot join ``installed`` (empty: it can).

    Names every missing dependency, every installed one outside its range, and every
    installed plugin whose own range for ``name`` would no longer hold.
    """
    problems: list[str] = []
    for dep, rng in sorted(dependencies.items()):
        have = installed.get(dep)
        if have is None:
            problems.append(f"dependency {dep} {rng.text} is not installed")
            continue
        try:
            ok = rng.satisfied_by(Version.parse(have.version))
        except SemverError:
            ok = False
        if not ok:
            problems.append(
                f"dependency {dep} {rng.text} conflicts with the installed {dep} {have.version}"
            )
    for other in sorted(installed.values(), key=lambda r: r.name):
        if other.name == name or name not in other.dependencies:
            continue
        text = other.dependencies[name]
        try:
            holds = Range.parse(text).satisfied_by(version)
        except SemverError:
            holds = False
        if not holds:
            problems.append(f"{other.name} {other.version} depends on {name} {text}, not {version}")
    return problems


class Registry:
    """The SQLite registry in ``state_dir`` (``registry.sqlite3``) and the package store."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.packages_dir = state_dir / "packages"
        for d in (state_dir, self.packages_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = state_dir / "registry.sqlite3"
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            path, isolation_level=None, timeout=10.0, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(plugins)")}
        if "wasm_sha256" not in columns:  # a registry from before artifacts
            self._db.execute("ALTER TABLE plugins ADD COLUMN wasm_sha256 TEXT NOT NULL DEFAULT ''")
        # Reads have a connection of their own (WAL: they see the last commit and never wait
        # for a write's fsync, which the writer's lock is held across).
        self._rlock = threading.Lock()
        self._rdb = sqlite3.connect(
            path, isolation_level=None, timeout=10.0, check_same_thread=False
        )

    # -- reading ---------------------------------------------------------------------

    def package_path(self, sha256: str) -> Path:
        """Where the package with this digest is stored."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256[:80]!r}")
        return self.packages_dir / f"{sha256}.forgepkg"

    def _store_package(self, sha256: str, data: bytes) -> None:
        """Keep ``data`` (whose digest is ``sha256``) at its path: written when missing, and
        rewritten when what is there does not hash to it (deleted or damaged on disk)."""
        path = self.package_path(sha256)
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
                return
        except FileNotFoundError:
            pass
        write_atomic(path, data, mode=0o600)

    def get(self, name: str) -> Installed | None:
        """The installed plugin ``name``, or None."""
        with self._rlock:
            row = self._rdb.execute(
                f"SELECT {_COLUMNS} FROM plugins WHERE name=?",  # noqa: S608 - fixed names
                (name,),
            ).fetchone()
            return None if row is None else self._row(row)

    def all(self) -> list[Installed]:
        """Every installed plugin, by name."""
        with self._rlock:
            rows = self._rdb.execute(
                f"SELECT {_COLUMNS} FROM plugins ORDER BY name"  # noqa: S608 - fixed names
            ).fetchall()
        return [self._row(r) for r in rows]

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every install of ``name``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT signer, version, sha256, installed_at FROM installs WHERE name=? "
                "ORDER BY installed_at, rowid",
                (name,),
            ).fetchall()
        return [{"signer": s, "version": v, "sha256": h, "installed_at": t} for s, v, h, t in rows]

    def _row(self, row: tuple[Any, ...]) -> Installed:
        (name, version, signer, sha, size, at, deps, limits, desired, policy, max_r, wsha) = row
        return Installed(
            name=name,
            version=version,
            signer=signer,
            sha256=sha,
            size=int(size),
            installed_at=float(at),
            dependencies=dict(json.loads(deps)),
            limits=dict(json.loads(limits)),
            desired=desired,
            restart_policy=policy,
            max_restarts=None if max_r is None else int(max_r),
            wasm_sha256=wsha or "",
        )

    # -- install / uninstall ---------------------------------------------------------

    def check_install(self, cand: Candidate, allow_downgrade: bool = False) -> str:
        """Whether ``cand`` may be installed: "new", "upgrade", "downgrade", "reinstall" or
        "same" (already installed, byte for byte).

        Raises: RegistryError naming the reason (another signer, downgrade, dependencies).
        """
        with self._lock:
            installed = {r.name: r for r in self.all()}
        current = installed.get(cand.name)
        kind = "new"
        if current is not None:
            if current.signer != cand.signer:
                raise RegistryError(
                    f"install {cand.name}: already installed from signer {current.signer};"
                    " uninstall it first"
                )
            have = Version.parse(current.version)
            if cand.sha256 == current.sha256:
                return "same"
            if cand.version < have:
                if not allow_downgrade:
                    raise RegistryError(
                        f"install {cand.name} {cand.version}: downgrade from the installed"
                        f" {current.version} refused (use --allow-downgrade)"
                    )
                kind = "downgrade"
            elif cand.version == have:
                if not allow_downgrade:
                    raise RegistryError(
                        f"install {cand.name} {cand.version}: version {current.version} is"
                        " already installed with other contents; bump the version"
                        " (or use --allow-downgrade to replace it)"
                    )
                kind = "reinstall"
            else:
                kind = "upgrade"
        problems = dependency_problems(cand.name, cand.version, cand.dependencies, installed)
        if problems:
            raise RegistryError(f"install {cand.name} {cand.version}: " + "; ".join(problems))
        return kind

    def install(
        self,
        cand: Candidate,
        data: bytes,
        allow_downgrade: bool = False,
        restart_policy: str | None = None,
        max_restarts: int | None = None,
    ) -> tuple[str, Installed]:
        """Check, store the bytes by hash, and record ``cand``. Returns (kind, row).

        The desired state of an installed plugin is kept across upgrades; a new one is
        "stopped". Raises: RegistryError (see :meth:`check_install`).
        """
        if restart_policy is not None and restart_policy not in RESTART_POLICIES:
            raise RegistryError(f"restart policy must be one of {', '.join(RESTART_POLICIES)}")
        with self._lock:
            kind = self.check_install(cand, allow_downgrade)
            current = self.get(cand.name)
            self._store_package(cand.sha256, data)  # (a reinstall repairs a lost copy)
            if kind == "same" and current is not None:
                if restart_policy is not None or max_restarts is not None:
                    self.set_restart(cand.name, restart_policy, max_restarts)
                    current = self.get(cand.name)
                assert current is not None
                return kind, current
            now = time.time()
            desired = current.desired if current is not None else "stopped"
            policy = restart_policy or (current.restart_policy if current else None)
            max_r = (
                max_restarts
                if max_restarts is not None
                else (current.max_restarts if current else None)
            )
            deps = {k: r.text for k, r in cand.dependencies.items()}
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO plugins(name, version, signer, sha256, size, installed_at,"
                    " dependencies, limits, desired, restart_policy, max_restarts, wasm_sha256)"
                    " VALUES(?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(name) DO UPDATE SET version=excluded.version,"
                    " signer=excluded.signer, sha256=excluded.sha256, size=excluded.size,"
                    " installed_at=excluded.installed_at, dependencies=excluded.dependencies,"
                    " limits=excluded.limits, restart_policy=excluded.restart_policy,"
                    " max_restarts=excluded.max_restarts, wasm_sha256=excluded.wasm_sha256",
                    (
                        cand.name,
                        str(cand.version),
                        cand.signer,
                        cand.sha256,
                        len(data),
                        now,
                        json.dumps(deps, sort_keys=True),
                        json.dumps(dict(cand.limits), sort_keys=True),
                        desired,
                        policy,
                        max_r,
                        cand.wasm_sha256,
                    ),
                )
                self._db.execute(
                    "INSERT INTO installs(signer, name, version, sha256, installed_at)"
                    " VALUES(?,?,?,?,?)",
                    (cand.signer, cand.name, str(cand.version), cand.sha256, now),
                )
            if current is not None and current.sha256 != cand.sha256:
                self._drop_package_if_unused(current.sha256)
            row = self.get(cand.name)
            assert row is not None
            return kind, row

    def dependents(self, name: str) -> list[Installed]:
        """Installed plugins whose manifest depends on ``name``."""
        return [r for r in self.all() if name in r.dependencies and r.name != name]

    def uninstall(self, name: str) -> Installed:
        """Remove ``name`` and its stored package. Returns the removed row.

        Raises: RegistryError when it is not installed or another plugin depends on it.
        """
        with self._lock:
            row = self.get(name)
            if row is None:
                raise RegistryError(f"uninstall {name}: not installed")
            deps = self.dependents(name)
            if deps:
                names = ", ".join(f"{d.name} ({d.dependencies[name]})" for d in deps)
                raise RegistryError(f"uninstall {name}: required by {names}")
            with self._db:
                self._db.execute("DELETE FROM plugins WHERE name=?", (name,))
            self._drop_package_if_unused(row.sha256)
            return row

    def remove_unreferenced_packages(self) -> list[str]:
        """Delete stored packages no row names, and temporary files a write left: what a
        crash between storing a package and committing its row leaves (the service calls
        this at start, holding the state directory). Returns the names removed."""
        with self._lock:
            used = {r[0] for r in self._db.execute("SELECT sha256 FROM plugins")}
            removed: list[str] = []
            for entry in os.scandir(self.packages_dir):
                stem = entry.name.removesuffix(".forgepkg")
                stray = entry.name.startswith(".") and entry.name.endswith(".tmp")
                if stray or (entry.name.endswith(".forgepkg") and stem not in used):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    removed.append(entry.name)
            return removed

    def _drop_package_if_unused(self, sha256: str) -> None:
        used = self._db.execute("SELECT 1 FROM plugins WHERE sha256=?", (sha256,)).fetchone()
        if used is None:
            with contextlib.suppress(FileNotFoundError):
                self.package_path(sha256).unlink()

    # -- states ----------------------------------------------------------------------

    def set_desired(self, name: str, desired: str) -> None:
        """Record the state the operator wants ``name`` in. Raises: RegistryError."""
        if desired not in DESIRED_STATES:
            raise RegistryError(f"state must be one of {', '.join(DESIRED_STATES)}")
        with self._lock, self._db:
            cur = self._db.execute("UPDATE plugins SET desired=? WHERE name=?", (desired, name))
            if cur.rowcount == 0:
                raise RegistryError(f"{name}: not installed")

    def set_restart(self, name: str, policy: str | None, max_restarts: int | None) -> None:
        """Change ``name``'s restart policy (None keeps the current value)."""
        if policy is not None and policy not in RESTART_POLICIES:
            raise RegistryError(f"restart policy must be one of {', '.join(RESTART_POLICIES)}")
        with self._lock, self._db:
            if policy is not None:
                self._db.execute("UPDATE plugins SET restart_policy=? WHERE name=?", (policy, name))
            if max_restarts is not None:
                self._db.execute(
                    "UPDATE plugins SET max_restarts=? WHERE name=?", (max_restarts, name)
                )

    def set_wasm_sha256(self, name: str, digest: str) -> None:
        """Record the digest of ``name``'s guest module (registries from before artifacts)."""
        with self._lock, self._db:
            self._db.execute("UPDATE plugins SET wasm_sha256=? WHERE name=?", (digest, name))

    # -- instances (crash cleanup) ---------------------------------------------------

    @contextlib.contextmanager
    def _undurable(self) -> Iterator[None]:
        """One transaction committed without waiting for the disk (``synchronous=NORMAL``:
        the WAL is synced at the next durable commit or checkpoint). Only for what is moot
        after a power loss: a crash of this process loses nothing committed either way."""
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._db:
                    yield
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def add_instance(self, instance: str, name: str, cgroups: list[str]) -> None:
        """Remember the cgroup directories of a started instance (for the cleanup after a
        crash of the service; cgroups do not outlive a reboot, so this need not be synced)."""
        with self._undurable():
            self._db.execute(
                "INSERT OR REPLACE INTO instances(instance, name, cgroups, started_at)"
                " VALUES(?,?,?,?)",
                (instance, name, json.dumps(cgroups), time.time()),
            )

    def remove_instance(self, instance: str) -> None:
        """Forget an instance (its cgroups are gone)."""
        with self._undurable():
            self._db.execute("DELETE FROM instances WHERE instance=?", (instance,))

    def instances(self) -> list[tuple[str, str, list[str]]]:
        """Every remembered instance: (instance, name, cgroup directories)."""
        with self._lock:
            rows = self._db.execute("SELECT instance, name, cgroups FROM instances").fetchall()
        return [(i, n, [str(p) for p in json.loads(c)]) for i, n, c in rows]

    def close(self) -> None:
        """Close the database."""
        with self._lock, self._rlock:
            self._rdb.close()
            self._db.close()


__all__ = [
    "DESIRED_STATES",
    "Candidate",
    "Installed",
    "Registry",
    "RegistryError",
    "dependency_problems",
]
