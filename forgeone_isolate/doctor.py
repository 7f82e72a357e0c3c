"""``doctor``: what this host lets forgeone-isolate do, and whether a launch can work.

Prints every probe of :mod:`forgeone_isolate.probes` (a table, or one JSON object with
``--json``), then which mechanism holds each resource limit: the plugin's cgroup, or, where
the cgroup controller is unavailable, the fallback (e.g. ``RLIMIT_AS`` and wasmtime
``StoreLimits`` for memory when the v1 memory hierarchy is not delegated to us).
"""

from __future__ import annotations

import json
from typing import TextIO

from forgeone_isolate import cgroup, probes
from forgeone_isolate.errors import SetupError


def _limits(host: cgroup.CgroupHost | None) -> dict[str, dict[str, str]]:
    """Which mechanism holds each limit on this host."""
    if host is None:
        missing = dict.fromkeys(cgroup.LIMITS, "cannot read the cgroup mounts")
        version = "none"
    else:
        missing = host.unavailable_limits()
        version = host.version
    out: dict[str, dict[str, str]] = {}
    for limit in cgroup.LIMITS:
        if limit in missing:
            out[limit] = {
                "held_by": probes.FALLBACKS[limit],
                "cgroup": "unavailable",
                "reason": missing[limit],
            }
        else:
            out[limit] = {"held_by": f"cgroup {version}", "cgroup": "used", "reason": ""}
    return out


def run_doctor(as_json: bool, out: TextIO) -> int:
    """Probe the host and report to ``out``.

    Returns 0 when an isolated launch can work here, else 1 (the reason is printed).
    """
    try:
        host: cgroup.CgroupHost | None = cgroup.detect()
    except SetupError:
        host = None
    found = probes.all_probes(host)
    possible, reason = probes.launch_possible(found)
    limits = _limits(host)
    if as_json:
        report = {
            "launch_possible": possible,
            "reason": reason,
            "probes": [{"name": p.name, "ok": p.ok, "detail": p.detail} for p in found],
            "limits": limits,
            "cgroup": host.describe() if host else {"version": "none"},
        }
        out.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return 0 if possible else 1

    width = max(len(p.name) for p in found)
    out.write(f"{'probe':<{width}}  {'status':<8}  detail\n")
    for p in found:
        if p.ok:
            status = "ok"
        elif p.name.startswith("limit.") or p.name not in probes.REQUIRED:
            status = "fallback" if p.name.startswith("limit.") else "absent"
        else:
            status = "MISSING"
        out.write(f"{p.name:<{width}}  {status:<8}  {p.detail}\n")
    out.write("\nresource limits:\n")
    for limit, info in limits.items():
        line = f"  {limit:<6} held by {info['held_by']}"
        if info["reason"]:
            line += f", because the cgroup cannot: {info['reason']}"
        out.write(line + "\n")
    out.write(f"\n{reason}\n")
    return 0 if possible else 1


__all__ = ["run_doctor"]
