"""Per-plugin metrics: accumulated in SQLite in the state directory, exposed as Prometheus
text (``python -m forgeone_isolate metrics``).

Every launch adds its figures (CPU time from the cgroup's own accounting, io and network
bytes, brokered calls allowed/denied, how it ended) to its plugin's row; the service adds the
live gauges (memory current/peak, pids) of running plugins.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

COUNTERS: Final[dict[str, str]] = {
    "launches": "Launches of the plugin.",
    "ok": "Launches that ended ok.",
    "errors": "Launches that ended with a plugin error (trap, non-zero export).",
    "kills_timeout": "Plugins killed at their deadline.",
    "kills_memory": "Plugins stopped at their memory limit.",
    "kills_seccomp": "Plugins killed by the seccomp filter.",
    "kills_other": "Plugins killed for another cause (abuse, signal, supervisor stop).",
    "calls_allowed": "Brokered calls allowed.",
    "calls_denied": "Brokered calls denied.",
    "cpu_seconds": "CPU time used, from the plugin cgroup's accounting.",
    "io_read_bytes": "Bytes read from block devices.",
    "io_write_bytes": "Bytes written to block devices.",
    "net_rx_bytes": "Bytes the plugin sent over its network link.",
    "net_tx_bytes": "Bytes the plugin received over its network link.",
}
GAUGES: Final[dict[str, str]] = {
    "memory_peak_bytes": "Peak memory of the last launch (where the cgroup reports it).",
}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS plugin_metrics (signer TEXT NOT NULL, plugin TEXT NOT NULL, "
    + ", ".join(f"{name} REAL NOT NULL DEFAULT 0" for name in [*COUNTERS, *GAUGES])
    + ", PRIMARY KEY (signer, plugin))"
)


def kill_cause(status: str, reason: str) -> str | None:
    """The counter a launch's end belongs to."""
    if status == "ok":
        return "ok"
    if status == "error":
        return "errors"
    if reason.startswith("timeout"):
        return "kills_timeout"
    if reason.startswith("memory"):
        return "kills_memory"
    if reason.startswith("seccomp"):
        return "kills_seccomp"
    return "kills_other"


def launch_figures(
    status: str,
    reason: str,
    broker: Mapping[str, Any],
    metrics: Mapping[str, Any],
    network: Mapping[str, Any],
) -> dict[str, float]:
    """The counter increments of one launch report."""
    out: dict[str, float] = {"launches": 1}
    cause = kill_cause(status, reason)
    if cause is not None:
        out[cause] = 1
    out["calls_allowed"] = float(broker.get("allowed", 0))
    out["calls_denied"] = float(broker.get("denied", 0))
    out["cpu_seconds"] = float(metrics.get("cpu_usage_ns", 0)) / 1e9
    out["io_read_bytes"] = float(metrics.get("io_read_bytes", 0))
    out["io_write_bytes"] = float(metrics.get("io_write_bytes", 0))
    out["net_rx_bytes"] = float(network.get("rx_bytes", 0))
    out["net_tx_bytes"] = float(network.get("tx_bytes", 0))
    return out


class MetricsStore:
    """The accumulated per-plugin counters."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def add(
        self, signer: str, plugin: str, figures: Mapping[str, float], peak_memory: int | None = None
    ) -> None:
        """Add one launch's figures to the plugin's row."""
        names = [n for n in figures if n in COUNTERS]
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO plugin_metrics(signer, plugin) VALUES(?, ?)",
                (signer, plugin),
            )
            if names:
                sets = ", ".join(f"{n} = {n} + ?" for n in names)
                self._db.execute(
                    f"UPDATE plugin_metrics SET {sets} WHERE signer=? AND plugin=?",  # noqa: S608 - names are from COUNTERS
                    [figures[n] for n in names] + [signer, plugin],
                )
            if peak_memory is not None:
                self._db.execute(
                    "UPDATE plugin_metrics SET memory_peak_bytes=? WHERE signer=? AND plugin=?",
                    (peak_memory, signer, plugin),
                )

    def rows(self) -> list[dict[str, Any]]:
        """Every plugin's row."""
        cur = self._db.execute("SELECT * FROM plugin_metrics ORDER BY plugin, signer")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


LIVE_GAUGES: Final[dict[str, str]] = {
    "memory_current_bytes": "Memory the running plugin's cgroup holds now.",
    "pids_current": "Processes in the running plugin's cgroup.",
    "running": "1 while the plugin runs.",
}


def _family(
    lines: list[str], metric: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]
) -> None:
    lines.append(f"# HELP {metric} {help_text}")
    lines.append(f"# TYPE {metric} {kind}")
    lines.extend(f"{metric}{{{labels}}} {_number(value)}" for labels, value in samples)


def exposition(rows: Iterable[Mapping[str, Any]], live: Iterable[Mapping[str, Any]] = ()) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    rows = list(rows)
    live = list(live)
    lines: list[str] = []

    def per_plugin(name: str) -> list[tuple[str, float]]:
        return [
            (f'plugin="{_label(r["plugin"])}",signer="{_label(r["signer"])}"', float(r[name]))
            for r in rows
        ]

    for name, help_text in COUNTERS.items():
        _family(lines, f"forgeone_plugin_{name}_total", "counter", help_text, per_plugin(name))
    for name, help_text in GAUGES.items():
        _family(lines, f"forgeone_plugin_{name}", "gauge", help_text, per_plugin(name))
    if live:
        for gauge, help_text in LIVE_GAUGES.items():
            samples = [
                (f'plugin="{_label(str(item["plugin"]))}"', float(item.get(gauge, 0)))
                for item in live
            ]
            _family(lines, f"forgeone_plugin_{gauge}", "gauge", help_text, samples)
    return "\n".join(lines) + "\n"


def record_launch(
    state_dir: Path,
    signer: str,
    plugin: str,
    status: str,
    reason: str,
    broker: Mapping[str, Any],
    metrics: Mapping[str, Any],
    network: Mapping[str, Any],
) -> None:
    """Add one launch's figures to ``state_dir/metrics.sqlite3``."""
    store = MetricsStore(state_dir / "metrics.sqlite3")
    try:
        peak = metrics.get("memory_peak")
        store.add(
            signer,
            plugin,
            launch_figures(status, reason, broker, metrics, network),
            peak_memory=int(peak) if isinstance(peak, int) else None,
        )
    finally:
        store.close()
