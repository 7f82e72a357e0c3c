"""Shared test machinery: host-feature markers backed by ``probes``, and a cgroup leak check.

Markers (registered in pyproject.toml): ``requires_root``, ``requires_userns``,
``requires_seccomp``, ``requires_cgroup`` (any usable v1 or v2 controller),
``requires_cgroup2`` (a usable v2 hierarchy). A test whose feature is missing is skipped
with the probe's reason; with ``FORGEONE_MUST_ISOLATE=1`` (CI) it fails instead, so a
runner without the feature can never pass silently.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from forgeone_isolate import cgroup, probes

MUST_ISOLATE_ENV = "FORGEONE_MUST_ISOLATE"


@functools.cache
def _host() -> cgroup.CgroupHost:
    return cgroup.detect()


_MARKER_PROBES: dict[str, Callable[[], probes.Probe]] = {
    "requires_root": probes.probe_root,
    "requires_userns": probes.probe_userns,
    "requires_seccomp": probes.probe_seccomp,
    "requires_cgroup": lambda: probes.probe_cgroup(_host()),
    "requires_cgroup2": lambda: probes.probe_cgroup2(_host()),
}


@functools.cache
def _probe(marker: str) -> probes.Probe:
    return _MARKER_PROBES[marker]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or, under FORGEONE_MUST_ISOLATE=1, fail) a test whose host feature is missing."""
    must = os.environ.get(MUST_ISOLATE_ENV) == "1"
    for mark in item.iter_markers():
        if mark.name not in _MARKER_PROBES:
            continue
        probe = _probe(mark.name)
        if probe.ok:
            continue
        reason = f"{mark.name}: {probe.name} unavailable: {probe.detail}"
        if must:
            pytest.fail(f"{reason} ({MUST_ISOLATE_ENV}=1 forbids skipping)", pytrace=False)
        pytest.skip(reason)


_SUPERVISOR_RE = re.compile(r"-s(\d+)$")


def _ours(path: str) -> bool:
    """A plugin cgroup made by this test process or one of its descendants (or a
    supervisor that is gone): the ones this process answers for. Another session's live
    supervisor's cgroups are not ours."""
    if os.path.basename(path) == "forgeone":
        return False  # the shared parent: another supervisor's plugins may come and go under it
    m = _SUPERVISOR_RE.search(os.path.basename(path))
    if m is None:
        return True
    pid = int(m.group(1))
    if pid == os.getpid():
        return True
    try:
        proc = psutil.Process(pid)
        return any(parent.pid == os.getpid() for parent in proc.parents())
    except psutil.Error:
        return True  # its supervisor is gone: whoever it was, this is a leftover


def _plugin_dirs() -> set[str]:
    host = cgroup.detect()
    return {d for d in host.existing_plugin_dirs() if _ours(d)}


@pytest.fixture
def leak_check() -> Iterator[None]:
    """Fail the test if a forgeone cgroup directory it created is still there afterwards.

    Compares the ``forgeone/`` subtrees of every usable hierarchy before and after; other
    sessions may run plugins on this host at the same time, so a new directory gets a short
    grace period to vanish before it counts as a leak.
    """
    before = _plugin_dirs()
    yield
    deadline = time.monotonic() + 2.0
    leaked = _plugin_dirs() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = _plugin_dirs() - before
    assert not leaked, f"cgroup directories left behind: {sorted(leaked)}"


def time_scale() -> float:
    """How much slower this machine runs than the host the bounds were set on.

    The integration guest (qemu TCG emulation) sets FORGEONE_TIME_SCALE; tests multiply
    their generous upper bounds by it. Bounds only: no test asserts a speed.
    """
    try:
        return max(1.0, float(os.environ.get("FORGEONE_TIME_SCALE", "1")))
    except ValueError:
        return 1.0


_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record one measured figure (a rate, a share, a time); all are listed at the end of
    the run, so CI logs show what each limit test measured."""

    def record(text: str) -> None:
        _FIGURES.append((request.node.name, text))

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("figures measured")
        for name, text in _FIGURES:
            terminalreporter.write_line(f"{name}: {text}")
