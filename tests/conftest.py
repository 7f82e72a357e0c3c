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
import time
from collections.abc import Callable, Iterator

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


def _plugin_dirs() -> set[str]:
    host = cgroup.detect()
    return set(host.existing_plugin_dirs())


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
