"""Plumbing of the guest suite: the figures the tests measure are printed at the end."""

from __future__ import annotations

from collections.abc import Callable

import pytest

_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record one measured figure; all of them are listed in the run's summary."""

    def record(text: str) -> None:
        _FIGURES.append((request.node.name, text))
        print(f"[figure] {request.node.name}: {text}")

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("figures measured in the guest")
        for name, text in _FIGURES:
            terminalreporter.write_line(f"{name}: {text}")
