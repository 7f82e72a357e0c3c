"""The plan as the service sends it to a plugin host: every field survives the trip, and
anything else is refused naming the field (no root needed)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from typing import Any

import pytest
from helpers import make_plan

from forgeone_isolate import policy
from forgeone_isolate.errors import WireError
from forgeone_isolate.plan import plan_from_wire, plan_to_wire


def rich_plan() -> Any:
    """A plan with something in every field: grants, networks, config, caps, io device."""
    eff = policy.Effective(
        fs_read=("/srv/in",),
        fs_write=("/srv/out",),
        net_connect=frozenset({("example.org", 443), ("10.1.2.3", 8080)}),
        net_allow_networks=(
            ipaddress.ip_network("10.1.0.0/16"),
            ipaddress.ip_network("2001:db8::/32"),
        ),
        kv=True,
        kv_quota_bytes=12345,
        config={"region": "eu", "token": "s3cret"},
        rate_per_s=2.5,
        burst=7,
        limit_caps={"memory_mb": 32},
    )
    return dataclasses.replace(
        make_plan(name="wire"),
        effective=eff,
        io_device=(8, 16),
        network="veth",
        requested={"kv": True, "net.connect": ["example.org:443"]},
    )


@pytest.mark.parametrize("plan", [make_plan(name="plain"), rich_plan()])
def test_a_plan_survives_the_trip_whole(plan: Any) -> None:
    wire = json.loads(json.dumps(plan_to_wire(plan)))  # as it travels: JSON
    assert plan_from_wire(wire) == plan


BENT: list[tuple[str, Any, str]] = [
    ("plugin", 5, "plan.plugin: not a string"),
    ("host_uid", "1", "plan.host_uid: not an integer"),
    ("pids", True, "plan.pids: not an integer"),
    ("namespaces", "user", "plan.namespaces: not a list of strings"),
    ("seccomp_allow", ["read", 1], "plan.seccomp_allow: not a list of strings"),
    ("io_device", [8], "plan.io_device: not [major, minor] or null"),
    ("rlimits", [["nofile", 16]], "plan.rlimits: not a list of [name, soft, hard]"),
    ("requested", [], "plan.requested: not a table"),
    ("effective", None, "effective: not a table"),
]


@pytest.mark.parametrize(("key", "value", "message"), BENT)
def test_a_bent_plan_is_refused_naming_the_field(key: str, value: Any, message: str) -> None:
    wire = {**plan_to_wire(rich_plan()), key: value}
    with pytest.raises(WireError, match=f"^{message}$".replace("[", r"\[").replace("]", r"\]")):
        plan_from_wire(wire)


EFFECTIVE_BENT: list[tuple[str, Any, str]] = [
    ("fs_read", "/srv", "effective.fs_read: not a list of strings"),
    ("net_connect", [["h", "443"]], r"effective.net_connect: not a list of \[host, port\]"),
    ("net_connect", [["h", 1, 2]], r"effective.net_connect: not a list of \[host, port\]"),
    ("net_allow_networks", ["10.0.0.1/8"], "effective.net_allow_networks: .*host bits set"),
    ("kv", 1, "effective.kv: not a boolean"),
    ("kv_quota_bytes", 1.5, "effective.kv_quota_bytes: not an integer"),
    ("rate_per_s", "fast", "effective.rate_per_s: not a number"),
    ("config", {"k": 1}, "effective.config: not a table of str"),
    ("limit_caps", {"memory_mb": True}, "effective.limit_caps: not a table of int"),
]


@pytest.mark.parametrize(("key", "value", "message"), EFFECTIVE_BENT)
def test_bent_permissions_are_refused_naming_the_field(key: str, value: Any, message: str) -> None:
    wire = plan_to_wire(rich_plan())
    wire["effective"] = {**wire["effective"], key: value}
    with pytest.raises(WireError, match=message):
        plan_from_wire(wire)


def test_not_a_table_at_all() -> None:
    for junk in (None, [], "plan", 3):
        with pytest.raises(WireError, match="plan: not a table"):
            plan_from_wire(junk)
