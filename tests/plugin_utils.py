"""Test plugins packed on demand, the launch CLI as a subprocess, and leak checks.

Used by test_launch.py and test_death.py. The key pair is made once per session; each
plugin of ``tests/plugins`` (``X.wat`` + ``X.json``) or of ``examples/`` is packed into a
temporary directory the first time a test asks for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forgeone_isolate import cgroup, package, signing

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PLUGINS = TESTS / "plugins"
EXAMPLES = REPO / "examples"

#: a generous bound for anything that should be prompt (no timed tests, only ceilings)
PROMPT_S = 10.0


@dataclass(frozen=True)
class Signer:
    """A session key pair: ``key`` signs packages, ``trust`` is the public key file."""

    key: Ed25519PrivateKey
    trust: Path
    fingerprint: str


class Packer:
    """Packs plugins (once each) into a session directory."""

    def __init__(self, root: Path, signer: Signer) -> None:
        self.root = root
        self.signer = signer
        self._done: dict[str, Path] = {}

    def plugin(self, name: str) -> Path:
        """``tests/plugins/<name>.wat`` + ``.json`` packed; returns the .forgepkg path."""
        return self._pack(name, PLUGINS / f"{name}.wat", PLUGINS / f"{name}.json")

    def example(self, name: str) -> Path:
        """``examples/<name>/`` packed; returns the .forgepkg path."""
        src = EXAMPLES / name
        return self._pack(f"example-{name}", src / "plugin.wat", src / "manifest.json")

    def verified(self, name: str) -> package.VerifiedPackage:
        """The verified package of a test plugin (for ``run_plan`` in-process)."""
        trust = signing.TrustStore.load(self.signer.trust)
        return package.verify_file(self.plugin(name), trust)

    def _pack(self, label: str, wat: Path, manifest: Path) -> Path:
        if label in self._done:
            return self._done[label]
        src = self.root / f"src-{label}"
        src.mkdir()
        shutil.copyfile(wat, src / "plugin.wat")
        shutil.copyfile(manifest, src / "manifest.json")
        out = self.root / f"{label}.forgepkg"
        out.write_bytes(package.build_package(src, self.signer.key))
        self._done[label] = out
        return out


@pytest.fixture(scope="session")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    """One ed25519 key pair for the session."""
    pair = signing.keygen(tmp_path_factory.mktemp("keys"))
    return Signer(signing.load_private_key(pair.private_path), pair.public_path, pair.fingerprint)


@pytest.fixture(scope="session")
def packer(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Packer:
    """Packs test plugins into a session directory."""
    return Packer(tmp_path_factory.mktemp("packages"), signer)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One supervisor state directory (uid leases) shared by the session's launches."""
    return tmp_path_factory.mktemp("state")


def launch_argv(pkg: Path, signer: Signer, state: Path, *extra: str) -> list[str]:
    """The ``python -m forgeone_isolate launch`` command line."""
    return [
        sys.executable,
        "-m",
        "forgeone_isolate",
        "launch",
        str(pkg),
        "--trust",
        str(signer.trust),
        "--state-dir",
        str(state),
        *extra,
    ]


@dataclass
class Launched:
    """A finished ``launch`` subprocess."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float

    def report(self) -> dict[str, Any]:
        """The ``--json`` report (the last stdout line)."""
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        assert lines, f"no report on stdout; stderr: {self.stderr}"
        obj = json.loads(lines[-1])
        assert isinstance(obj, dict)
        return obj


def run_launch(
    pkg: Path, signer: Signer, state: Path, *extra: str, timeout: float = 60
) -> Launched:
    """Run ``launch`` to completion."""
    started = time.monotonic()
    proc = subprocess.run(
        launch_argv(pkg, signer, state, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )
    return Launched(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def start_launch(pkg: Path, signer: Signer, state: Path, *extra: str) -> subprocess.Popen[str]:
    """Start ``launch`` in the background (stdout/stderr piped)."""
    return subprocess.Popen(
        launch_argv(pkg, signer, state, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def proc_status_field(pid: int, key: str) -> str | None:
    """One field of /proc/<pid>/status, or None (gone, or no such field)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == key:
                    return value.strip()
    except OSError:
        return None
    return None


def rseq_registered(pid: int) -> bool:
    """Whether ``pid`` has a restartable-sequences area registered with the kernel, seen
    from outside (ptrace PTRACE_GET_RSEQ_CONFIGURATION; the process is stopped briefly)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    seize, interrupt, detach, get_rseq = 0x4206, 0x4207, 17, 0x420F
    if libc.ptrace(seize, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), f"ptrace(PTRACE_SEIZE, {pid})")
    try:
        if libc.ptrace(interrupt, pid, None, None) != 0:
            raise OSError(ctypes.get_errno(), f"ptrace(PTRACE_INTERRUPT, {pid})")
        os.waitpid(pid, 0x40000000)  # __WALL: a tracee that is not our child
        config = (ctypes.c_ubyte * 24)()  # struct ptrace_rseq_configuration
        if libc.ptrace(get_rseq, pid, ctypes.c_void_p(24), ctypes.addressof(config)) < 0:
            raise OSError(ctypes.get_errno(), f"ptrace(PTRACE_GET_RSEQ_CONFIGURATION, {pid})")
        return int.from_bytes(bytes(config[:8]), "little") != 0
    finally:
        libc.ptrace(detach, pid, None, None)


def find_sandboxed_pid(root_pid: int, timeout: float = PROMPT_S) -> int:
    """The pid of a descendant of ``root_pid`` under a seccomp filter that is PID 1 of its
    own PID namespace: a plugin's PID 1 (its keeper, outside that namespace, is filtered
    too).

    Polls until one shows ``Seccomp: 2``; fails the test after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = psutil.Process(root_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for kid in kids:
            if proc_status_field(kid.pid, "Seccomp") == "2" and (
                proc_status_field(kid.pid, "NSpid") or ""
            ).split()[-1:] == ["1"]:
                return int(kid.pid)
        time.sleep(0.005)
    pytest.fail(f"no sandboxed descendant of {root_pid} appeared within {timeout} s")


def gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is only a zombie nobody of ours holds)."""
    try:
        p = psutil.Process(pid)
        return bool(p.status() == psutil.STATUS_ZOMBIE and p.ppid() != os.getpid())
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = PROMPT_S) -> bool:
    """Poll until :func:`gone`; return whether it happened within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def plugin_cgroup_dirs(marker: str) -> list[str]:
    """Existing forgeone cgroup directories whose name contains ``marker``."""
    host = cgroup.detect()
    return [d for d in host.existing_plugin_dirs() if marker in os.path.basename(d)]


def live_children() -> list[psutil.Process]:
    """Our descendants that are still alive (zombies excluded)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture
def no_stray_processes() -> Iterator[None]:
    """Fail when the test leaves a live descendant process behind."""
    yield
    deadline = time.monotonic() + 2.0
    left = live_children()
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = live_children()
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
