"""The root host service, end to end: ``serve`` as a subprocess on a temporary socket and
state directory, driven through the CLI and the control socket.

The plugin is the C sample (``native/build/sample``, ``make -C native``): its ``handle``
uppercases its input. Packages are packed with a test key; manifests are varied (names,
versions, dependencies) around the same module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from guestgen import Guest, write_plugin

from forgeone_isolate import audit, control, netns, package, signing
from forgeone_isolate.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PLUGIN_FAILED

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "native" / "build" / "sample"
PROMPT_S = 15.0

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.requires_userns,
    pytest.mark.requires_seccomp,
    pytest.mark.requires_cgroup,
]


# ----------------------------------------------------------------------------- helpers


def wait_for(check: Callable[[], bool], timeout: float = PROMPT_S, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@dataclass
class Keys:
    key: Any
    trust: Path
    fingerprint: str


class Packages:
    """Packs the C sample under any name, version and dependencies (cached)."""

    def __init__(self, root: Path, keys: Keys) -> None:
        self.root = root
        self.keys = keys
        self.base = json.loads((SAMPLE / "manifest.json").read_text())

    def get(self, name: str, version: str = "1.0.0", deps: dict[str, str] | None = None) -> Path:
        label = f"{name}-{version}-" + "-".join(f"{k}{v}" for k, v in sorted((deps or {}).items()))
        out = self.root / f"{label.replace('^', 'c').replace(' ', '_')}.forgepkg"
        if out.exists():
            return out
        src = self.root / f"src-{out.stem}"
        src.mkdir()
        shutil.copyfile(SAMPLE / "plugin.wasm", src / "plugin.wasm")
        manifest = dict(self.base, name=name, version=version)
        if deps:
            manifest["dependencies"] = deps
        (src / "manifest.json").write_text(json.dumps(manifest))
        out.write_bytes(package.build_package(src, self.keys.key))
        return out


class Service:
    """``python -m forgeone_isolate serve --config ...`` in a subprocess."""

    def __init__(self, root: Path, keys: Keys, **overrides: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.state = root / "state"
        # The socket's directory is traversable by everyone: the peer-check tests connect
        # as another uid.
        self.sockdir = Path(tempfile.mkdtemp(prefix="fo-sock-"))
        os.chmod(self.sockdir, 0o755)
        self.socket = self.sockdir / "control.sock"
        self.log = root / "service.log"
        self.config = root / "config.toml"
        metrics_port = overrides.pop("metrics_port", None)
        group = overrides.pop("group", "")
        max_connections = overrides.pop("max_connections", 64)
        policy_file = overrides.pop("policy", None)
        restart = {"backoff_base_s": 0.1, "backoff_cap_s": 2.0, "max_restarts": 3}
        restart.update(overrides.pop("restart", {}))
        lines = [
            f'state_dir = "{self.state}"',
            f'trust = "{keys.trust}"',
            *([f'policy = "{policy_file}"'] if policy_file else []),
            'log_level = "debug"',
            f"stop_timeout_s = {overrides.pop('stop_timeout_s', 5.0)}",
            "[control]",
            f'socket = "{self.socket}"',
            f'group = "{group}"',
            f"max_connections = {max_connections}",
            "[metrics]",
            f'listen = "127.0.0.1:{metrics_port}"' if metrics_port else 'listen = ""',
            "[restart]",
            *(f"{k} = {json.dumps(v)}" for k, v in restart.items()),
        ]
        assert not overrides, overrides
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forgeone_isolate", "serve", "--config", str(self.config)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        assert wait_for(self.answers, 30.0), self.log_text()
        return self

    def serve_refused(self) -> subprocess.CompletedProcess[str]:
        """Run ``serve`` with this config in the foreground: for one that must not start."""
        return subprocess.run(
            [sys.executable, "-m", "forgeone_isolate", "serve", "--config", str(self.config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            with control.Client(self.socket, timeout=5.0) as c:
                c.request("ping")
        except control.ServiceUnavailable:
            return False
        return True

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def request(self, op: str, **fields: Any) -> Any:
        with control.Client(self.socket, timeout=60.0) as c:
            return c.request(op, **fields)

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "forgeone_isolate", *argv, "--socket", str(self.socket)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def ok(self, *argv: str) -> str:
        proc = self.cli(*argv)
        assert proc.returncode == EXIT_OK, (argv, proc.stdout, proc.stderr, self.log_text()[-3000:])
        return proc.stdout

    def plugin(self, name: str) -> dict[str, Any]:
        for p in self.request("list")["plugins"]:
            if p["name"] == name:
                return dict(p)
        raise AssertionError(f"{name} not listed")

    def descendants(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()
        shutil.rmtree(self.sockdir, ignore_errors=True)


def freezer_state(dirs: list[str]) -> str | None:
    for d in dirs:
        for name in ("freezer.state", "cgroup.freeze"):
            path = Path(d) / name
            if path.exists():
                value = path.read_text().strip()
                return {"0": "THAWED", "1": "FROZEN"}.get(value, value)
    return None


def cpu_usage(dirs: list[str]) -> int | None:
    for d in dirs:
        path = Path(d) / "cpuacct.usage"
        if path.exists():
            return int(path.read_text())
        stat = Path(d) / "cpu.stat"
        if stat.exists():
            for line in stat.read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) * 1000
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    if not (SAMPLE / "plugin.wasm").exists():
        pytest.fail("native/build/sample is missing: run `make -C native`")
    pair = signing.keygen(tmp_path_factory.mktemp("svc-keys"))
    return Keys(signing.load_private_key(pair.private_path), pair.public_path, pair.fingerprint)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Packages:
    return Packages(tmp_path_factory.mktemp("svc-pkgs"), keys)


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def svc(
    tmp_path_factory: pytest.TempPathFactory, keys: Keys, metrics_port: int
) -> Iterator[Service]:
    s = Service(tmp_path_factory.mktemp("svc"), keys, metrics_port=metrics_port)
    s.start()
    yield s
    status = s.terminate()
    s.cleanup()
    assert status == 0, s.log_text()[-3000:]


@pytest.fixture
def fresh(tmp_path: Path, keys: Keys) -> Iterator[Callable[..., Service]]:
    """Services of the test's own (killed or stopped by the test)."""
    made: list[Service] = []

    def make(**overrides: Any) -> Service:
        own_keys = overrides.pop("keys", keys)  # a test's own trust store
        s = Service(tmp_path / f"svc{len(made)}", own_keys, **overrides)
        made.append(s)
        return s

    yield make
    for s in made:
        s.cleanup()


# ----------------------------------------------------------------------------- lifecycle


def test_install_start_call_pause_resume_stop_uninstall_through_the_cli(
    svc: Service, packages: Packages
) -> None:
    pkg = packages.get("lifecycle")
    assert "new: lifecycle 1.0.0" in svc.ok("install", str(pkg))
    assert "same: lifecycle 1.0.0" in svc.ok("install", str(pkg))
    listed = json.loads(svc.ok("list", "--json"))
    row = next(p for p in listed if p["name"] == "lifecycle")
    assert (row["state"], row["desired"], row["pid"]) == ("stopped", "stopped", None)
    assert row["signer"] == svc.plugin("lifecycle")["signer"]

    assert "lifecycle 1.0.0: running (pid" in svc.ok("start", "lifecycle")
    info = svc.plugin("lifecycle")
    assert info["state"] == "running"
    pid1 = info["pid"]
    assert isinstance(pid1, int)
    assert psutil.pid_exists(pid1)
    assert info["isolation"]["seccomp"] == 2
    assert info["isolation"]["no_new_privs"] == 1
    assert info["isolation"]["cap_eff"] == "0000000000000000"
    assert all(info["isolation"]["namespaces"].values())
    assert info["limits"]["memory_mb"] == 16
    assert info["uptime_s"] >= 0
    table = svc.ok("list")
    assert table.splitlines()[0].split()[:6] == [
        "NAME",
        "VERSION",
        "SIGNER",
        "STATE",
        "PID",
        "UPTIME",
    ]
    assert any(line.startswith("lifecycle") and " running " in line for line in table.splitlines())

    assert svc.ok("call", "lifecycle", "--input", "hello world") == "HELLO WORLD\n"
    assert svc.ok("call", "lifecycle", "--input", "second call") == "SECOND CALL\n"

    assert "paused" in svc.ok("pause", "lifecycle")
    dirs = svc.plugin("lifecycle")["cgroups"]
    assert dirs, "the plugin's cgroups are listed"
    assert freezer_state(dirs) == "FROZEN"
    assert svc.plugin("lifecycle")["state"] == "paused"
    assert psutil.Process(pid1).status() in (
        psutil.STATUS_STOPPED,
        "frozen",
        psutil.STATUS_DISK_SLEEP,
        psutil.STATUS_SLEEPING,
    )
    before = cpu_usage(dirs)
    time.sleep(0.3)
    assert cpu_usage(dirs) == before  # no CPU time while frozen
    refused = svc.cli("call", "lifecycle", "--input", "x")
    assert refused.returncode == EXIT_PLUGIN_FAILED
    assert "paused" in refused.stderr

    assert "running" in svc.ok("resume", "lifecycle")
    assert freezer_state(dirs) == "THAWED"
    assert svc.ok("call", "lifecycle", "--input", "after resume") == "AFTER RESUME\n"
    assert svc.plugin("lifecycle")["pid"] == pid1  # the same instance throughout

    logs = svc.ok("logs", "lifecycle")
    assert "hello from the C sample plugin" in logs

    assert "stopped" in svc.ok("stop", "lifecycle")
    assert wait_for(lambda: gone(pid1))
    assert all(not Path(d).exists() for d in dirs)
    info = svc.plugin("lifecycle")
    assert (info["state"], info["desired"], info["pid"]) == ("stopped", "stopped", None)
    assert "C sample plugin stopping" in svc.ok("logs", "lifecycle")
    stopped_call = svc.cli("call", "lifecycle", "--input", "x")
    assert stopped_call.returncode == EXIT_PLUGIN_FAILED
    assert "not running" in stopped_call.stderr

    trail = svc.ok("audit", "lifecycle", "-n", "200")
    ops = [json.loads(line)["op"] for line in trail.splitlines()[:-1]]
    for op in ("install", "start", "pause", "resume", "stop", "log", "clock_now", "output"):
        assert op in ops, (op, ops)
    assert trail.splitlines()[-1].startswith("OK: ")

    assert "uninstalled lifecycle 1.0.0" in svc.ok("uninstall", "lifecycle")
    assert all(p["name"] != "lifecycle" for p in json.loads(svc.ok("list", "--json")))
    again = svc.cli("start", "lifecycle")
    assert again.returncode == EXIT_BAD_INPUT
    assert "not installed" in again.stderr


def _audit_sockets(pid: int) -> int:
    """How many audit-netlink sockets process ``pid`` holds (/proc/net/netlink, protocol 9)."""
    with open("/proc/net/netlink") as f:
        audit = {row.split()[9] for row in f.readlines()[1:] if row.split()[1] == "9"}
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            held += target.startswith("socket:[") and target[8:-1] in audit
    return held


def test_one_seccomp_witness_for_the_service_none_per_plugin(
    svc: Service, packages: Packages
) -> None:
    """The kernel copies every audit record into every audit-netlink socket: the service
    reads them once for all its plugins, and no plugin host opens one of its own."""
    svc.ok("install", str(packages.get("witnessed")))
    svc.ok("start", "witnessed")
    try:
        info = svc.plugin("witnessed")
        assert _audit_sockets(info["host_pid"]) == 0
        assert svc.proc is not None
        assert _audit_sockets(svc.proc.pid) == 1
    finally:
        svc.ok("stop", "witnessed")
        svc.ok("uninstall", "witnessed")


def test_a_crashed_plugin_is_restarted_and_the_restart_audited(
    svc: Service, packages: Packages
) -> None:
    svc.ok("install", str(packages.get("crashy")))
    svc.ok("start", "crashy")
    first = svc.plugin("crashy")["pid"]
    os.kill(first, signal.SIGKILL)

    def restarted() -> bool:
        p = svc.plugin("crashy")
        return p["state"] == "running" and p["pid"] not in (None, first)

    assert wait_for(restarted), svc.plugin("crashy")
    info = svc.plugin("crashy")
    assert info["restarts"] == 1
    assert "SIGKILL" in info["last_exit"]["cause"]
    assert svc.ok("call", "crashy", "--input", "still here") == "STILL HERE\n"
    result = svc.request("audit", name="crashy", n=500)
    restarts = [r for r in result["records"] if r["op"] == "restart"]
    assert len(restarts) == 1
    record = restarts[0]
    assert record["decision"] == "allow"
    assert record["args"]["attempt"] == 1
    assert "SIGKILL" in record["args"]["cause"]
    assert record["identity"]["plugin"] == "crashy"
    assert result["verify"]["ok"] is True
    assert audit.verify(Path(result["path"])).ok
    svc.ok("stop", "crashy")


def test_restart_policy_no_leaves_it_failed(svc: Service, packages: Packages) -> None:
    svc.ok("install", str(packages.get("fragile")), "--restart", "no")
    svc.ok("start", "fragile")
    pid = svc.plugin("fragile")["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: svc.plugin("fragile")["state"] == "failed"), svc.plugin("fragile")
    info = svc.plugin("fragile")
    assert "not restarted" in info["failed"]
    assert info["restarts"] == 0
    records = svc.request("audit", name="fragile", n=100)["records"]
    denied = [r for r in records if r["op"] == "restart"]
    assert [r["decision"] for r in denied] == ["deny"]
    svc.ok("start", "fragile")  # an operator's start clears the failure
    assert svc.plugin("fragile")["state"] == "running"
    svc.ok("stop", "fragile")


def test_a_killed_plugin_host_is_cleaned_up_and_restarted(svc: Service, packages: Packages) -> None:
    svc.ok("install", str(packages.get("hostkill")))
    svc.ok("start", "hostkill")
    info = svc.plugin("hostkill")
    dirs, pid1 = info["cgroups"], info["pid"]
    os.kill(info["host_pid"], signal.SIGKILL)
    assert wait_for(lambda: gone(pid1))
    assert wait_for(
        lambda: (
            svc.plugin("hostkill")["state"] == "running" and svc.plugin("hostkill")["pid"] != pid1
        )
    )
    assert all(not Path(d).exists() for d in dirs)
    assert "plugin host died" in svc.plugin("hostkill")["last_exit"]["cause"]
    svc.ok("stop", "hostkill")


def test_a_plugin_failing_at_start_is_retried_then_given_up(
    svc: Service, keys: Keys, tmp_path: Path
) -> None:
    src = tmp_path / "failing"
    src.mkdir()
    shutil.copyfile(REPO / "tests" / "plugins" / "fail.wat", src / "plugin.wat")
    manifest = json.loads((REPO / "tests" / "plugins" / "fail.json").read_text())
    manifest["name"] = "failing"
    (src / "manifest.json").write_text(json.dumps(manifest))
    pkg = tmp_path / "failing.forgepkg"
    pkg.write_bytes(package.build_package(src, keys.key))
    svc.ok("install", str(pkg))
    started = time.monotonic()
    proc = svc.cli("start", "failing")  # waits through the restarts the policy allows
    assert proc.returncode == EXIT_PLUGIN_FAILED
    assert "start returned 7" in proc.stderr
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.4  # the backoff was honoured
    info = svc.plugin("failing")
    assert info["state"] == "failed"
    assert info["restarts"] == 3
    assert "3 restarts in a row" in info["failed"]
    records = [
        r for r in svc.request("audit", name="failing", n=200)["records"] if r["op"] == "restart"
    ]
    assert [(r["decision"], r["args"].get("attempt")) for r in records] == [
        ("allow", 1),
        ("allow", 2),
        ("allow", 3),
        ("deny", None),
    ]
    assert [r["args"]["delay_s"] for r in records[:3]] == [0.1, 0.2, 0.4]
    svc.ok("stop", "failing")
    assert svc.plugin("failing")["state"] == "stopped"
    svc.ok("uninstall", "failing")


# ----------------------------------------------------------------------------- install rules


def test_downgrade_refused_unless_allowed(svc: Service, packages: Packages) -> None:
    svc.ok("install", str(packages.get("versioned", "1.2.0")))
    proc = svc.cli("install", str(packages.get("versioned", "1.1.0")))
    assert proc.returncode == EXIT_BAD_INPUT
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "downgrade from the installed 1.2.0 refused" in proc.stderr
    assert svc.plugin("versioned")["version"] == "1.2.0"
    assert "downgrade: versioned 1.1.0" in svc.ok(
        "install", str(packages.get("versioned", "1.1.0")), "--allow-downgrade"
    )
    assert "upgrade: versioned 1.3.0" in svc.ok("install", str(packages.get("versioned", "1.3.0")))
    svc.ok("uninstall", "versioned")


def test_upgrade_of_a_running_plugin_restarts_it(svc: Service, packages: Packages) -> None:
    svc.ok("install", str(packages.get("upgraded", "1.0.0")))
    svc.ok("start", "upgraded")
    old = svc.plugin("upgraded")["pid"]
    assert "(restarted)" in svc.ok("install", str(packages.get("upgraded", "1.0.1")))
    info = svc.plugin("upgraded")
    assert (info["version"], info["state"]) == ("1.0.1", "running")
    assert info["pid"] != old
    svc.ok("stop", "upgraded")
    svc.ok("uninstall", "upgraded")


def test_an_upgrade_whose_restart_fails_is_installed_and_says_so(
    fresh: Callable[..., Service], packages: Packages, tmp_path: Path
) -> None:
    """The new version is installed (and audited) before the running one is replaced; if
    the replacement cannot start (here: the operator's policy has become malformed), the
    answer says the install happened and the restart did not (status 1), and the plugin
    is marked failed, not left looking stopped on purpose."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text("[defaults]\nrate_per_s = 100\n")
    s = fresh(policy=policy_file).start()
    try:
        s.ok("install", str(packages.get("upbroken", "1.0.0")))
        s.ok("start", "upbroken")
        policy_file.write_text("[[grant]]\nsigner = 5\n")
        proc = s.cli("install", str(packages.get("upbroken", "1.1.0")))
        assert proc.returncode == EXIT_PLUGIN_FAILED, (proc.stdout, proc.stderr)
        assert "upbroken 1.1.0 is installed, but did not restart" in proc.stderr
        assert str(policy_file) in proc.stderr
        row = s.plugin("upbroken")
        assert (row["version"], row["desired"]) == ("1.1.0", "running")
        assert row["state"] == "failed", row
        ops = [r["op"] for r in s.request("audit", name="upbroken", n=50)["records"]]
        assert ops.count("install") == 2, ops
    finally:
        assert s.terminate() == 0, s.log_text()[-3000:]


def test_missing_and_conflicting_dependencies_refused(svc: Service, packages: Packages) -> None:
    needy = packages.get("needy", "1.0.0", {"depbase": "^1.2.0"})
    proc = svc.cli("install", str(needy))
    assert proc.returncode == EXIT_BAD_INPUT
    assert "dependency depbase ^1.2.0 is not installed" in proc.stderr
    svc.ok("install", str(packages.get("depbase", "1.1.0")))
    proc = svc.cli("install", str(needy))
    assert proc.returncode == EXIT_BAD_INPUT
    assert "conflicts with the installed depbase 1.1.0" in proc.stderr
    svc.ok("install", str(packages.get("depbase", "1.4.0")))
    svc.ok("install", str(needy))
    proc = svc.cli("uninstall", "depbase")
    assert proc.returncode == EXIT_BAD_INPUT
    assert "required by needy" in proc.stderr
    proc = svc.cli("install", str(packages.get("depbase", "2.0.0")))
    assert proc.returncode == EXIT_BAD_INPUT
    assert "needy 1.0.0 depends on depbase ^1.2.0, not 2.0.0" in proc.stderr
    svc.ok("uninstall", "needy")
    svc.ok("uninstall", "depbase")


def test_untrusted_or_tampered_packages_refused(
    svc: Service, packages: Packages, tmp_path: Path
) -> None:
    other = signing.keygen(tmp_path / "other")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(SAMPLE / "plugin.wasm", src / "plugin.wasm")
    shutil.copyfile(SAMPLE / "manifest.json", src / "manifest.json")
    stranger = tmp_path / "stranger.forgepkg"
    stranger.write_bytes(package.build_package(src, signing.load_private_key(other.private_path)))
    proc = svc.cli("install", str(stranger))
    assert proc.returncode == EXIT_BAD_INPUT
    assert "not in the trust store" in proc.stderr
    tampered = tmp_path / "tampered.forgepkg"
    data = bytearray(packages.get("tamper").read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    proc = svc.cli("install", str(tampered))
    assert proc.returncode == EXIT_BAD_INPUT
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_stored_package_tampered_on_disk_is_refused_at_start(
    svc: Service, packages: Packages
) -> None:
    """A damaged stored copy is refused at start; installing the same package again
    repairs it (as it does a deleted one), and the plugin starts."""
    pkg = packages.get("ondisk")
    svc.ok("install", str(pkg))
    stored = svc.state / "packages" / f"{hashlib.sha256(pkg.read_bytes()).hexdigest()}.forgepkg"
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-10] + b"\0" * 10)
        proc = svc.cli("start", "ondisk")
        assert proc.returncode == EXIT_BAD_INPUT
        assert "does not hash to its registry digest" in proc.stderr
        assert wait_for(lambda: svc.plugin("ondisk")["state"] == "failed")
        assert "same: ondisk 1.0.0" in svc.ok("install", str(pkg))
        assert stored.read_bytes() == original
        svc.ok("start", "ondisk")
        svc.ok("stop", "ondisk")
        stored.unlink()
        assert "same: ondisk 1.0.0" in svc.ok("install", str(pkg))
        assert stored.read_bytes() == original
        svc.ok("start", "ondisk")
        svc.ok("stop", "ondisk")
    finally:
        stored.write_bytes(original)
    svc.ok("uninstall", "ondisk")


def test_the_operators_policy_applies_to_a_start_and_is_reread_when_it_changes(
    fresh: Callable[..., Service], keys: Keys, packages: Packages, tmp_path: Path
) -> None:
    """The service plans each start under the policy file as it is then: a grant's limit
    caps lower the plugin's limits (seen in its cgroup from outside), a changed file is
    read again, and a malformed one refuses the start, naming it."""
    policy_file = tmp_path / "policy.toml"

    def grant(cpu_cap: int) -> str:
        return (
            f'[[grant]]\nsigner = "{keys.fingerprint}"\nplugin = "capped"\n'
            f"limits = {{ cpu_percent = {cpu_cap} }}\n"
        )

    policy_file.write_text(grant(20))
    s = fresh(policy=policy_file).start()
    try:
        s.ok("install", str(packages.get("capped")))
        for cap in (20, 10):
            policy_file.write_text(grant(cap))
            s.ok("start", "capped")
            row = s.plugin("capped")
            assert row["limits"]["cpu_percent"] == cap  # the sample asks for 50
            quota = [
                d for d in row["cgroups"] if os.path.exists(os.path.join(d, "cpu.cfs_quota_us"))
            ] or [d for d in row["cgroups"] if os.path.exists(os.path.join(d, "cpu.max"))]
            assert quota, row["cgroups"]
            d = quota[0]
            if os.path.exists(os.path.join(d, "cpu.cfs_quota_us")):
                q = int(Path(d, "cpu.cfs_quota_us").read_text())
                period = int(Path(d, "cpu.cfs_period_us").read_text())
            else:
                q_text, p_text = Path(d, "cpu.max").read_text().split()
                q, period = int(q_text), int(p_text)
            assert q * 100 == cap * period, (q, period)
            s.ok("stop", "capped")
        policy_file.write_text("[[grant]]\nsigner = 5\n")
        proc = s.cli("start", "capped")
        assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
        assert str(policy_file) in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        assert s.terminate() == 0, s.log_text()[-3000:]


def test_a_plugin_with_a_network_runs_under_the_service(
    fresh: Callable[..., Service], keys: Keys, tmp_path: Path
) -> None:
    """A plugin granted net.connect, started by the service: its plugin host gives it a veth
    (its address by its uid's place in the range: the first, in a fresh service), the
    plugin's connection comes from that address and is audited, and stopping the plugin
    removes the link."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))  # the plugin's host end appears later
    listener.listen(1)
    listener.settimeout(PROMPT_S)
    port = listener.getsockname()[1]
    target = f"10.213.0.1:{port}"
    g = Guest()
    g.net_connect("conn", "10.213.0.1", port, slot=0)
    g.fd_close("closed", slot=0)
    src = write_plugin(tmp_path / "src", "netted", g.wat(), {"net.connect": [target]})
    pkg = tmp_path / "netted.forgepkg"
    pkg.write_bytes(package.build_package(src, keys.key))
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        f'[[grant]]\nsigner = "{keys.fingerprint}"\nplugin = "netted"\nnet_connect = ["{target}"]\n'
    )
    s = fresh(policy=policy_file).start()
    before = set(netns.list_our_links())
    try:
        s.ok("install", str(pkg))
        s.ok("start", "netted")
        conn, peer = listener.accept()
        conn.close()
        assert peer[0] == "10.213.0.2"  # made inside the plugin's namespace, on its veth
        lines = [line["text"] for line in s.request("logs", name="netted", n=50)["lines"]]
        assert "closed=0" in lines, lines
        assert any(t.startswith("conn=") and int(t[5:]) >= 0 for t in lines), lines
        records = s.request("audit", name="netted", n=50)["records"]
        connects = [r for r in records if r.get("op") == "net_connect"]
        assert [r["decision"] for r in connects] == ["allow"], records
        links = sorted(set(netns.list_our_links()) - before)
        assert len(links) == 1, links
        s.ok("stop", "netted")
        assert wait_for(lambda: links[0] not in netns.list_our_links()), links
    finally:
        listener.close()
        assert s.terminate() == 0, s.log_text()[-3000:]


def test_a_signer_revoked_after_install_is_refused_at_the_next_start(
    fresh: Callable[..., Service], keys: Keys, packages: Packages, tmp_path: Path
) -> None:
    """Every start verifies against the trust store as it is now: what an earlier
    verification established (kept, so a start need not redo it) does not outlive a
    revocation, nor does the refusal outlive the signer's reinstatement."""
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    shutil.copyfile(keys.trust, trust_dir / "signer.pub")
    s = fresh(keys=Keys(keys.key, trust_dir, keys.fingerprint)).start()
    try:
        s.ok("install", str(packages.get("revokable")))
        s.ok("start", "revokable")
        s.ok("stop", "revokable")
        (trust_dir / signing.REVOKED_NAME).write_text(keys.fingerprint + "\n")
        proc = s.cli("start", "revokable")
        assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
        assert "is revoked" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert wait_for(lambda: s.plugin("revokable")["state"] == "failed")
        (trust_dir / signing.REVOKED_NAME).write_text("")
        s.ok("start", "revokable")
        s.ok("stop", "revokable")
    finally:
        assert s.terminate() == 0, s.log_text()[-3000:]


# ----------------------------------------------------------------------------- the control socket


def test_fifty_malformed_requests_then_the_service_still_answers(svc: Service) -> None:
    garbage: list[bytes] = [
        b"not json",
        b"{",
        b"[]",
        b"42",
        b'"op"',
        b"null",
        b"{}",
        b'{"op": 5}',
        b'{"op": "frobnicate"}',
        b'{"op": "list", "extra": 1}',
        b'{"op": "start"}',
        b'{"op": "start", "name": 7}',
        b'{"op": "start", "name": "../../etc"}',
        b'{"op": "start", "name": "UPPER"}',
        b'{"op": "start", "name": ""}',
        b'{"op": "start", "name": "' + b"a" * 500 + b'"}',
        b'{"op": "call", "name": "x", "input": "a", "input_b64": "YQ=="}',
        b'{"op": "call", "name": "x", "input_b64": "***"}',
        b'{"op": "call", "name": "x", "input": 5}',
        b'{"op": "logs", "name": "x", "n": 0}',
        b'{"op": "logs", "name": "x", "n": true}',
        b'{"op": "logs", "name": "x", "n": 99999999}',
        b'{"op": "audit", "name": "x", "n": -1}',
        b'{"op": "install"}',
        b'{"op": "install", "package_b64": "AAAA", "path": "/etc/passwd"}',
        b'{"op": "install", "package_b64": "not base64!"}',
        b'{"op": "install", "package_b64": "AAAA"}',
        b'{"op": "install", "package_b64": "AAAA", "allow_downgrade": "yes"}',
        b'{"op": "install", "package_b64": "AAAA", "max_restarts": 1.5}',
        b'{"op": "install", "package_b64": "AAAA", "restart": "always"}',
        b"\xff\xfe\x00garbage",
        b"\x00" * 100,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"op": "list", "op": "ping"}' + b"}",
        b'{"op": "ping"} trailing',
        b"{'op': 'ping'}",
        b'{"op": NaN}',
        b'{"op": "stop", "name": "ghost"}',
        b'{"op": "pause", "name": "ghost"}',
        b'{"op": "resume", "name": "ghost"}',
        b'{"op": "uninstall", "name": "ghost"}',
        b'{"op": "call", "name": "ghost", "input": "x"}',
        b'{"op": "logs", "name": "ghost"}',
        b'{"op": "audit", "name": "ghost"}',
        b'{"op": "start", "name": "ghost"}',
        b'{"op": "\\u0000"}',
        b'{"op": "list", "name": "x"}',
        b'{"op": ["list"]}',
        b'{"op": {"a": 1}}',
        b'{"op": "metrics", "n": 1}',
    ]
    assert len(garbage) == 50
    with control.Client(svc.socket, timeout=30.0) as c:
        for line in garbage:
            reply = c.send_raw(line.replace(b"\n", b" ") + b"\n")
            assert reply is not None, line[:60]
            assert reply["ok"] is False, (line[:60], reply)
            assert isinstance(reply["error"], str)
            assert reply["error"]
            assert "\n" not in reply["error"]
            assert reply["status"] in (1, 2)
        assert c.request("ping")["pid"] == svc.pid  # the same connection still works
    # And fresh connections with a garbage first line, closed at once.
    for line in garbage[:10]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(svc.socket))
            s.sendall(line + b"\n")
    with socket.socket(socket.AF_UNIX) as s:  # half a request, then hang up
        s.connect(str(svc.socket))
        s.sendall(b'{"op": "li')
    assert svc.request("ping")["pid"] == svc.pid
    assert isinstance(svc.request("list")["plugins"], list)


def test_an_oversized_request_gets_an_error_and_the_connection_closes(svc: Service) -> None:
    with control.Client(svc.socket, timeout=60.0) as c:
        reply = c.send_raw(b"x" * (control.MAX_REQUEST_BYTES + 10))
        assert reply is not None
        assert reply["ok"] is False
        assert "larger than" in reply["error"]
    assert svc.request("ping")["pid"] == svc.pid


UNPRIVILEGED_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_error": e.errno}))
    raise SystemExit(0)
try:
    s.sendall(b'{"op": "list"}\n')
except (BrokenPipeError, ConnectionResetError):
    pass  # an unauthorised peer is answered and closed at once: the reply is waiting
print(s.makefile("rb").readline().decode().strip() or "{}")
"""


def run_as(uid: int, gid: int, sock: Path) -> dict[str, Any]:
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    proc = subprocess.run(
        [python, "-I", "-c", UNPRIVILEGED_CLIENT, str(sock)],
        preexec_fn=drop,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_unauthorised_peers_are_refused(svc: Service) -> None:
    # The socket is 0600 root: another uid cannot even connect.
    assert (svc.socket.stat().st_mode & 0o777) == 0o600
    assert svc.socket.stat().st_uid == 0
    reply = run_as(65534, 65534, svc.socket)
    assert reply.get("connect_error") == 13, reply  # EACCES
    # If the socket's mode were loosened, SO_PEERCRED still refuses the peer.
    os.chmod(svc.socket, 0o666)
    try:
        reply = run_as(65534, 65534, svc.socket)
    finally:
        os.chmod(svc.socket, 0o600)
    assert reply["ok"] is False, reply
    assert "permission denied: uid 65534" in reply["error"], reply
    assert "not root" in reply["error"], reply
    assert "control: refused" in svc.log_text(), svc.log_text()[-2000:]
    assert svc.request("ping")["pid"] == svc.pid


def test_members_of_the_configured_group_are_served(fresh: Callable[..., Service]) -> None:
    svc = fresh(group="nogroup").start()
    st = svc.socket.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, 65534)
    member = run_as(65534, 65534, svc.socket)
    assert member["ok"] is True
    assert member["result"] == {"plugins": []}
    outsider = run_as(12345, 12345, svc.socket)
    assert outsider.get("connect_error") == 13
    os.chmod(svc.socket, 0o666)
    outsider = run_as(12345, 12345, svc.socket)
    assert outsider["ok"] is False
    assert "neither root nor a member of group 65534" in outsider["error"]
    assert svc.terminate() == 0


def test_root_is_served_when_every_connection_slot_is_taken(
    fresh: Callable[..., Service],
) -> None:
    """max_connections held by idle clients (a group member's script, say): root still gets
    one of the few connections kept for it, and is answered."""
    s = fresh(max_connections=2).start()
    idle = []
    try:
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(s.socket))
            idle.append(c)
        time.sleep(0.2)  # (accepted: both slots held)
        assert s.request("ping")["pid"] == s.pid
    finally:
        for c in idle:
            c.close()
        assert s.terminate() == 0, s.log_text()[-3000:]


def test_the_metrics_endpoint_bounds_its_clients(
    fresh: Callable[..., Service], tmp_path: Path
) -> None:
    """Anyone on the host may connect to the metrics port: idle connections get no thread
    each (at most METRICS_MAX_CLIENTS are served at once, each for a bounded time), and
    once they are gone the endpoint answers again."""
    from forgeone_isolate.service import METRICS_MAX_CLIENTS

    port = free_port()
    s = fresh(metrics_port=port).start()

    def threads() -> int:
        with open(f"/proc/{s.pid}/status", encoding="ascii") as f:
            return int(next(ln for ln in f if ln.startswith("Threads:")).split()[1])

    base = threads()
    idle = []
    try:
        for _ in range(40):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(c)
        time.sleep(0.5)
        assert threads() <= base + METRICS_MAX_CLIENTS, (base, threads())
        for c in idle:
            c.close()
        idle.clear()

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        assert wait_for(answers, 30.0)
    finally:
        for c in idle:
            c.close()
        assert s.terminate() == 0, s.log_text()[-3000:]


def test_no_service_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "forgeone_isolate", "list", "--socket", str(tmp_path / "none.sock")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == EXIT_PLUGIN_FAILED
    assert proc.stderr.count("\n") == 1
    assert "no service at" in proc.stderr


# ----------------------------------------------------------------------------- metrics


def test_metrics_over_http_and_the_cli(svc: Service, packages: Packages, metrics_port: int) -> None:
    svc.ok("install", str(packages.get("metered")))
    svc.ok("start", "metered")
    svc.ok("call", "metered", "--input", "count me")
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = r.read().decode()
    assert 'forgeone_plugin_running{plugin="metered"} 1' in body
    assert 'forgeone_plugin_pids_current{plugin="metered"}' in body
    assert "forgeone_service_plugins_running" in body
    cli_text = svc.ok("metrics")
    assert 'forgeone_plugin_running{plugin="metered"} 1' in cli_text
    svc.ok("stop", "metered")
    after = svc.ok("metrics")
    assert 'forgeone_plugin_launches_total{plugin="metered"' in after
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/secret", timeout=10)


# ----------------------------------------------------------------------------- service death


def test_kill9_of_the_service_leaves_no_plugin_and_restart_restores_states(
    fresh: Callable[..., Service], packages: Packages
) -> None:
    svc = fresh().start()
    for name in ("keeprun", "keeppause", "keepstop"):
        svc.ok("install", str(packages.get(name)))
        svc.ok("start", name)
    svc.ok("pause", "keeppause")
    svc.ok("stop", "keepstop")
    before = {n: svc.plugin(n) for n in ("keeprun", "keeppause")}
    assert freezer_state(before["keeppause"]["cgroups"]) == "FROZEN"

    def recorded() -> set[str]:  # the rows the service keeps for its cleanup after a crash
        db = sqlite3.connect(f"file:{svc.state / 'registry.sqlite3'}?mode=ro", uri=True)
        try:
            return {row[0] for row in db.execute("SELECT instance FROM instances")}
        finally:
            db.close()

    running = {info["instance"] for info in before.values()}
    assert wait_for(lambda: recorded() == running), (recorded(), running)
    tree = svc.descendants()
    assert len(tree) >= 1 + 2 * 2  # fork server + (host, PID 1) per running plugin
    for info in before.values():
        assert info["pid"] in tree
        assert info["host_pid"] in tree

    svc.kill9()
    assert wait_for(lambda: all(gone(pid) for pid in tree)), [
        (p, psutil.Process(p).name()) for p in tree if not gone(p)
    ]
    for info in before.values():  # even the frozen one is gone, and its cgroups with it
        assert wait_for(lambda info=info: all(not Path(d).exists() for d in info["cgroups"]))

    svc.start()
    assert wait_for(lambda: svc.plugin("keeprun")["state"] == "running")
    assert wait_for(lambda: svc.plugin("keeppause")["state"] == "paused")
    run, paused, stopped = (svc.plugin(n) for n in ("keeprun", "keeppause", "keepstop"))
    assert run["pid"] != before["keeprun"]["pid"]
    assert freezer_state(paused["cgroups"]) == "FROZEN"
    assert (stopped["state"], stopped["pid"]) == ("stopped", None)
    assert svc.ok("call", "keeprun", "--input", "back") == "BACK\n"
    assert svc.terminate() == 0


def test_the_fork_server_dying_stops_the_service_without_restarts(
    fresh: Callable[..., Service], packages: Packages
) -> None:
    """kill -9 of the fork server: its hosts end their plugins (pdeathsig), and the service
    stops with them, status 1. Those ends are the stop's, not failures: no restart is
    tried or audited (the restart policy is on-failure), nothing is left behind."""
    svc = fresh(restart={"policy": "on-failure"}).start()
    svc.ok("install", str(packages.get("fsdeath")))
    svc.ok("start", "fsdeath")
    info = svc.plugin("fsdeath")
    forkserver = [p for p in psutil.Process(svc.pid).children() if p.name() == "forgeone-forksv"]
    assert len(forkserver) == 1
    tree = svc.descendants()
    forkserver[0].kill()
    assert svc.proc is not None
    assert svc.proc.wait(30) == EXIT_PLUGIN_FAILED
    assert "the fork server has died" in svc.log_text()
    assert wait_for(lambda: all(gone(pid) for pid in tree))
    assert wait_for(lambda: all(not Path(d).exists() for d in info["cgroups"]))
    log_file = svc.state / "audit" / "fsdeath.jsonl"
    ops = [json.loads(line)["op"] for line in log_file.read_text().splitlines()]
    assert "restart" not in ops, ops
    assert audit.verify(log_file).ok


def test_sigterm_stops_plugins_gracefully_and_exits_0(
    fresh: Callable[..., Service], packages: Packages
) -> None:
    svc = fresh(stop_timeout_s=3.0).start()
    for name in ("termrun", "termpause"):
        svc.ok("install", str(packages.get(name)))
        svc.ok("start", name)
    svc.ok("pause", "termpause")
    infos = [svc.plugin(n) for n in ("termrun", "termpause")]
    tree = svc.descendants()
    started = time.monotonic()
    assert svc.terminate() == 0
    assert time.monotonic() - started < 3.0 + 10.0
    assert all(gone(pid) for pid in tree)
    for info in infos:
        assert all(not Path(d).exists() for d in info["cgroups"])
    log = svc.log_text()
    assert "SIGTERM received" in log
    assert "termrun: stopped (ok)" in log
    assert "termpause: stopped (ok)" in log  # thawed, then stop() ran
    assert not svc.socket.exists()
    for name in ("termrun", "termpause"):
        assert audit.verify(svc.state / "audit" / f"{name}.jsonl").ok
    # Desired states survive a clean stop too.
    svc.start()
    assert wait_for(lambda: svc.plugin("termpause")["state"] == "paused")
    assert wait_for(lambda: svc.plugin("termrun")["state"] == "running")
    assert svc.terminate() == 0


def test_a_second_service_on_the_same_state_dir_is_refused_and_kills_nothing(
    fresh: Callable[..., Service], packages: Packages
) -> None:
    """A second ``serve`` on a live service's state directory (another socket) stops at the
    directory's lock, before the crash cleanup that would kill the plugins its registry
    rows name; the first service's plugin runs on, its process the same."""
    first = fresh().start()
    try:
        first.ok("install", str(packages.get("statelock")))
        first.ok("start", "statelock")
        pid1 = first.plugin("statelock")["pid"]
        other = fresh()
        other.config.write_text(
            other.config.read_text().replace(str(other.state), str(first.state))
        )
        proc = other.serve_refused()
        assert proc.returncode == EXIT_PLUGIN_FAILED, proc.stderr
        assert f"state directory {first.state}: another service is using it" in proc.stderr
        assert not other.socket.exists()
        row = first.plugin("statelock")
        assert (row["state"], row["pid"]) == ("running", pid1)
        assert psutil.pid_exists(pid1)
        assert first.ok("call", "statelock", "--input", "still here") == "STILL HERE\n"
    finally:
        assert first.terminate() == 0, first.log_text()[-3000:]


def test_sigterm_during_a_burst_of_starts_leaves_nothing(
    fresh: Callable[..., Service], packages: Packages
) -> None:
    """SIGTERM while starts are in flight: the service exits 0 and no host, keeper, PID 1
    or cgroup of any of them is left, whether its start had been answered or not."""
    svc = fresh().start()
    names = [f"burst{i}" for i in range(8)]
    for name in names:
        svc.ok("install", str(packages.get(name)))
    seen: set[int] = set()
    threads = [
        threading.Thread(target=svc.cli, args=("start", name), daemon=True) for name in names
    ]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(svc.descendants()) > 3, 30.0)  # some launches under way
    seen.update(svc.descendants())
    assert svc.proc is not None
    svc.proc.send_signal(signal.SIGTERM)
    while svc.proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            seen.update(svc.descendants())
        time.sleep(0.005)
    assert svc.proc.returncode == 0, svc.log_text()[-3000:]
    for t in threads:
        t.join(60)
    assert wait_for(lambda: all(gone(pid) for pid in seen)), [p for p in seen if not gone(p)]
    left = [
        str(d)
        for name in names
        for d in Path("/sys/fs/cgroup").glob(f"**/forgeone/{name}-*")
        if d.is_dir()
    ]
    assert left == []


def test_a_second_service_on_the_same_socket_is_refused(
    fresh: Callable[..., Service], svc: Service
) -> None:
    other = fresh()
    other.config.write_text(other.config.read_text().replace(str(other.socket), str(svc.socket)))
    proc = other.serve_refused()
    assert proc.returncode == EXIT_PLUGIN_FAILED
    assert "another service is listening there" in proc.stderr
    assert svc.request("ping")["pid"] == svc.pid
