"""forgeone_isolate.policy: the policy file, effective permissions, the broker's decisions."""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgeone_isolate import policy
from forgeone_isolate.errors import EXIT_BAD_INPUT, PolicyError
from forgeone_isolate.manifest import Limits, Permissions
from forgeone_isolate.policy import (
    Defaults,
    Effective,
    Grant,
    Policy,
    RateLimiter,
    cap_limits,
    check_config,
    check_fs,
    check_kv,
    check_net,
    check_resolved,
    effective,
)

SIGNER = "ab" * 32
OTHER = "cd" * 32

#: a grant whose header is line 2; a snippet appended to it starts at line 5
HEAD = f'# operator policy\n[[grant]]\nsigner = "{SIGNER}"\nplugin = "hello"\n'


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "policy.toml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def load(tmp_path: Path, text: str | bytes) -> Policy:
    return Policy.load(write(tmp_path, text))


def error(tmp_path: Path, text: str | bytes) -> tuple[int, str, str]:
    """(line, key path, problem) of the PolicyError loading ``text`` raises."""
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    message = str(info.value)
    assert "\n" not in message
    m = re.match(rf"^policy {re.escape(str(path))}:(\d+): ([^:]+): (.*)\Z", message)
    assert m is not None, message
    return int(m.group(1)), m.group(2), m.group(3)


# --- loading: valid files ----------------------------------------------------------------

FULL = f"""\
[defaults]
rate_per_s = 50
burst = 60
kv_quota_bytes = 4096

[[grant]]
signer = "{SIGNER.upper()}"
plugin = "hello"
fs_read = ["/srv/data", "/"]
fs_write = ["/srv/out"]
net_connect = ["127.0.0.1:8080", "API.Example.com:443", "[0:0::1]:9000"]
net_allow_networks = ["10.0.0.0/8", "2001:db8::/32"]
kv = true
kv_quota_bytes = 65536
config = {{ greeting = "hi", "dotted.key" = "v" }}
rate_per_s = 2.5
burst = 200

[grant.limits]
memory_mb = 32
timeout_s = 5

[[grant]]
signer = "{SIGNER}"
plugin = "*"
"""


def test_full_policy_parses(tmp_path: Path) -> None:
    pol = load(tmp_path, FULL)
    assert pol.defaults == Defaults(rate_per_s=50.0, burst=60, kv_quota_bytes=4096)
    g, star = pol.grants
    assert g.signer == SIGNER  # fingerprints compare in lowercase
    assert g.fs_read == ("/srv/data", "/")
    assert g.fs_write == ("/srv/out",)
    assert g.net_connect == {("127.0.0.1", 8080), ("api.example.com", 443), ("::1", 9000)}
    assert g.net_allow_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert g.kv is True
    assert g.kv_quota_bytes == 65536
    assert g.config == {"greeting": "hi", "dotted.key": "v"}
    assert g.rate_per_s == 2.5
    assert g.burst == 200
    assert g.limits == {"memory_mb": 32, "timeout_s": 5}
    assert g.line == 6
    assert star.plugin == "*"
    assert star.line == 23
    assert star.rate_per_s is None
    assert star.kv_quota_bytes is None


def test_empty_file_grants_nothing(tmp_path: Path) -> None:
    pol = load(tmp_path, "# nothing granted\n")
    assert pol.grants == ()
    assert pol.defaults == Defaults()
    assert pol.grant_for(SIGNER, "hello") is None


def test_deny_all() -> None:
    pol = Policy.deny_all()
    assert pol.grants == ()
    assert pol.grant_for(SIGNER, "hello") is None
    eff = pol.effective_for(SIGNER, "hello", Permissions(fs_read=("/srv",), kv=True))
    assert eff.fs_read == ()
    assert not eff.kv


def test_grant_for_exact_beats_wildcard(tmp_path: Path) -> None:
    text = f"""\
[[grant]]
signer = "{SIGNER}"
plugin = "*"
kv = true

[[grant]]
signer = "{SIGNER}"
plugin = "hello"

[[grant]]
signer = "{OTHER}"
plugin = "other"
"""
    pol = load(tmp_path, text)
    exact = pol.grant_for(SIGNER, "hello")
    assert exact is not None
    assert exact.plugin == "hello"
    assert not exact.kv
    star = pol.grant_for(SIGNER, "anything")
    assert star is not None
    assert star.plugin == "*"
    assert star.kv
    assert pol.grant_for(SIGNER.upper(), "anything") is star
    assert pol.grant_for(OTHER, "hello") is None
    assert pol.grant_for(OTHER, "other") is not None
    assert pol.grant_for("ef" * 32, "hello") is None


# --- loading: every error names the line and the key ------------------------------------

BAD_GRANT_KEYS = [
    ('fs_read = "/srv"', "grant[1].fs_read", "must be an array of strings"),
    ('fs_read = ["srv"]', "grant[1].fs_read", "not absolute"),
    ('fs_read = ["/srv/../etc"]', "grant[1].fs_read", "'..'"),
    ('fs_read = ["/srv/"]', "grant[1].fs_read", "ends with '/'"),
    ('fs_read = ["/srv//x"]', "grant[1].fs_read", "'//'"),
    ('fs_read = ["/srv/./x"]', "grant[1].fs_read", "'.' component"),
    ('fs_read = ["/srv\\u0000x"]', "grant[1].fs_read", "NUL"),
    ("fs_read = [1]", "grant[1].fs_read", "found an integer"),
    ('fs_read = ["/a", "/a"]', "grant[1].fs_read", "listed twice"),
    ('fs_write = ["out"]', "grant[1].fs_write", "not absolute"),
    ("fs_write = {}", "grant[1].fs_write", "must be an array"),
    ('net_connect = ["localhost"]', "grant[1].net_connect", "not host:port"),
    ('net_connect = ["127.0.0.1:0"]', "grant[1].net_connect", "out of range"),
    ('net_connect = ["127.0.0.1:65536"]', "grant[1].net_connect", "out of range"),
    ('net_connect = ["[::g]:80"]', "grant[1].net_connect", "not host:port"),
    ('net_connect = ["[1::2::3]:80"]', "grant[1].net_connect", "bad IPv6"),
    ('net_connect = ["bad_host!:80"]', "grant[1].net_connect", "bad host name"),
    ('net_connect = ["127.1:80"]', "grant[1].net_connect", "numeric host"),
    ('net_connect = ["api.example.com:443"]', "grant[1].net_connect", "net_allow_networks"),
    ('net_allow_networks = ["10.0.0.1/8"]', "grant[1].net_allow_networks", "not a network"),
    ('net_allow_networks = ["anywhere"]', "grant[1].net_allow_networks", "not a network"),
    ("net_allow_networks = true", "grant[1].net_allow_networks", "must be an array"),
    ('kv = "yes"', "grant[1].kv", "true or false"),
    ("kv = 1", "grant[1].kv", "true or false"),
    ("kv_quota_bytes = -1", "grant[1].kv_quota_bytes", "outside 0..1073741824"),
    ("kv_quota_bytes = 1073741825", "grant[1].kv_quota_bytes", "outside"),
    ("kv_quota_bytes = 1.5", "grant[1].kv_quota_bytes", "must be an integer"),
    ("kv_quota_bytes = true", "grant[1].kv_quota_bytes", "must be an integer, not a boolean"),
    ('config = "greeting"', "grant[1].config", "must be a table"),
    ("config = { greeting = 1 }", "grant[1].config.greeting", "must be a string"),
    ('config = { "bad key" = "x" }', "grant[1].config.'bad key'", "bad config key"),
    (f'config = {{ big = "{"x" * 4097}" }}', "grant[1].config.big", "longer than 4096 bytes"),
    ("rate_per_s = 0", "grant[1].rate_per_s", "outside (0, 100000]"),
    ("rate_per_s = 100001", "grant[1].rate_per_s", "outside"),
    ("rate_per_s = inf", "grant[1].rate_per_s", "outside"),
    ("rate_per_s = nan", "grant[1].rate_per_s", "outside"),
    ('rate_per_s = "fast"', "grant[1].rate_per_s", "must be a number"),
    ("burst = 0", "grant[1].burst", "outside 1..1000000"),
    ("burst = 2.0", "grant[1].burst", "must be an integer"),
    ("limits = 5", "grant[1].limits", "must be a table"),
    ("limits.memory_mb = 0", "grant[1].limits.memory_mb", "outside 1..4096"),
    ("limits = { disk_mb = 1 }", "grant[1].limits.disk_mb", "unknown key"),
    ('colour = "red"', "grant[1].colour", "unknown key (expected one of: signer, plugin"),
]


@pytest.mark.parametrize(("snippet", "key", "problem"), BAD_GRANT_KEYS)
def test_bad_grant_key_names_line_and_key(
    tmp_path: Path, snippet: str, key: str, problem: str
) -> None:
    # a second grant follows: the error names the first one, at its own line
    text = HEAD + snippet + "\n" + f'\n[[grant]]\nsigner = "{OTHER}"\nplugin = "x"\n'
    line, got_key, got_problem = error(tmp_path, text)
    assert (line, got_key) == (5, key)
    assert problem in got_problem


BAD_LIMITS = [
    ("memory_mb = 0", "memory_mb", "outside 1..4096"),
    ("memory_mb = 4097", "memory_mb", "outside 1..4096"),
    ('cpu_percent = "50"', "cpu_percent", "must be an integer, not a string"),
    ("pids = 1025", "pids", "outside 1..1024"),
    ("io_bps = 1", "io_bps", "outside"),
    ("net_bps = 1", "net_bps", "outside"),
    ("timeout_s = 0", "timeout_s", "outside 1..86400"),
    ("disk_mb = 10", "disk_mb", "unknown key (expected one of: memory_mb"),
]


@pytest.mark.parametrize(("snippet", "key", "problem"), BAD_LIMITS)
def test_bad_limit_in_sub_table(tmp_path: Path, snippet: str, key: str, problem: str) -> None:
    filler = "memory_mb = 8" if snippet.startswith("pids") else "pids = 1"
    text = HEAD + f"kv = true\n\n[grant.limits]\n{filler}\n{snippet}\n"
    line, got_key, got_problem = error(tmp_path, text)
    assert (line, got_key) == (9, f"grant[1].limits.{key}")
    assert problem in got_problem


BAD_DEFAULTS = [
    ("rate_per_s = -1", "defaults.rate_per_s", "outside"),
    ('burst = "x"', "defaults.burst", "must be an integer"),
    ("kv_quota_bytes = 99999999999", "defaults.kv_quota_bytes", "outside"),
    (
        "kv = true",
        "defaults.kv",
        "unknown key (expected one of: rate_per_s, burst, kv_quota_bytes)",
    ),
    # float() of it overflows: compared as an integer, and not echoed whole
    ("rate_per_s = " + "9" * 400, "defaults.rate_per_s", "999999999999…(400 digits) is outside"),
]


@pytest.mark.parametrize(("snippet", "key", "problem"), BAD_DEFAULTS)
def test_bad_defaults(tmp_path: Path, snippet: str, key: str, problem: str) -> None:
    filler = "burst = 10" if snippet.startswith("kv_quota") else "kv_quota_bytes = 10"
    text = f"\n[defaults]\n{filler}\n{snippet}\n" + HEAD
    line, got_key, got_problem = error(tmp_path, text)
    assert (line, got_key) == (4, key)
    assert problem in got_problem


def test_signer_and_plugin(tmp_path: Path) -> None:
    assert error(tmp_path, '[[grant]]\nsigner = "abc"\nplugin = "x"\n')[:2] == (
        2,
        "grant[1].signer",
    )
    assert error(tmp_path, '[[grant]]\nplugin = "x"\nsigner = 7\n')[:2] == (3, "grant[1].signer")
    line, key, problem = error(tmp_path, f'[[grant]]\nsigner = "{SIGNER}"\nplugin = "Hello!"\n')
    assert (line, key) == (3, "grant[1].plugin")
    assert "neither '*' nor a plugin name" in problem


def test_missing_required_key_names_the_grant_header(tmp_path: Path) -> None:
    text = HEAD + '\n[[grant]]\n# no signer\nplugin = "x"\n'
    assert error(tmp_path, text) == (6, "grant[2]", "missing required key 'signer'")
    text = HEAD + f'\n[[grant]]\nsigner = "{SIGNER}"\n'
    assert error(tmp_path, text) == (6, "grant[2]", "missing required key 'plugin'")


def test_second_grant_error_counts_headers(tmp_path: Path) -> None:
    text = (
        HEAD
        + 'fs_read = ["/srv"]\n\n[grant.limits]\nmemory_mb = 8\n\n'
        + f'[[grant]]\nsigner = "{OTHER}"\nplugin = "b"\nfs_read = ["/srv/"]\n'
    )
    assert error(tmp_path, text)[:2] == (13, "grant[2].fs_read")


def test_duplicate_grant(tmp_path: Path) -> None:
    text = HEAD + f'\n[[grant]]\nsigner = "{SIGNER.upper()}"\nplugin = "hello"\n'
    line, key, problem = error(tmp_path, text)
    assert (line, key) == (8, "grant[2].plugin")
    assert "a second grant" in problem
    assert "first is at line 2" in problem
    # the same signer with "*" and an exact name is not a duplicate
    load(tmp_path, HEAD + f'\n[[grant]]\nsigner = "{SIGNER}"\nplugin = "*"\n')


def test_unknown_top_level_key_and_table(tmp_path: Path) -> None:
    assert error(tmp_path, HEAD + "\n\n[extras]\nx = 1\n")[:2] == (7, "extras")
    line, key, problem = error(tmp_path, "# c\nversion = 2\n" + HEAD)
    assert (line, key) == (2, "version")
    assert "unknown key (expected one of: defaults, grant)" in problem
    assert error(tmp_path, "grant = 5\n")[:3] == (
        1,
        "grant",
        "must be an array of tables: write each as [[grant]]",
    )
    assert error(tmp_path, "[grant]\nkv = true\n")[:2] == (1, "grant")
    assert error(tmp_path, "defaults = 3\n")[:3] == (1, "defaults", "must be a table")


def test_syntax_error_line(tmp_path: Path) -> None:
    line, key, problem = error(tmp_path, HEAD + "kv = tru\n")
    assert (line, key) == (5, "TOML syntax")
    assert "Invalid value" in problem
    assert "column" in problem
    assert error(tmp_path, HEAD + "fs_read = [\n") == (
        5,
        "TOML syntax",
        "Invalid value (at end of file)",
    )
    assert error(tmp_path, HEAD + 'fs_read = [\n"/a"\nkv = true\n')[:2] == (7, "TOML syntax")
    assert error(tmp_path, HEAD + "kv = true\nkv = false\n")[:2] == (6, "TOML syntax")


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, b'[[grant]]\nsigner = "x"\nplugin = "\xff"\n')
    with pytest.raises(PolicyError, match=r":3: not UTF-8"):
        Policy.load(path)


def test_multi_line_array_names_the_element_line(tmp_path: Path) -> None:
    text = HEAD + 'fs_read = [\n  "/srv/a",\n  "/srv/b/",  # trailing slash\n]\nkv = true\n'
    assert error(tmp_path, text)[:2] == (7, "grant[1].fs_read")
    text = HEAD + 'fs_read = [\n  "/srv/a",\n  "/srv/b",\n  "/srv/a",\n]\n'
    assert error(tmp_path, text)[:2] == (8, "grant[1].fs_read")


def test_line_finder_ignores_strings_and_comments(tmp_path: Path) -> None:
    body = HEAD.removeprefix("# operator policy\n")
    text = "# burst = 5\n" + body + 'config = { note = """\nburst = 0\n""" }\nburst = 0\n'
    assert error(tmp_path, text)[:2] == (8, "grant[1].burst")
    text = (
        "# burst = 5\n"
        + body
        + "fs_read = [ # burst = 0\n  '/srv/a', # kv = 1\n]\n"
        + "# burst = 0\n"
        + "burst = 0\n"
    )
    assert error(tmp_path, text)[:2] == (9, "grant[1].burst")


def test_only_newline_ends_a_line(tmp_path: Path) -> None:
    # TOML allows U+2028 (and U+0085, U+2029) in a comment; str.splitlines() broke the line
    # there, took '"\N" = 1' for a key and crashed decoding its escape
    assert load(tmp_path, '# note\u2028"\\N" = 1\n' + HEAD).grants[0].plugin == "hello"
    assert error(tmp_path, "# a\x85b\u2029c\n[defaults]\nburst = 0\n")[:2] == (3, "defaults.burst")
    # a key whose escape does not decode is indexed under its spelling, not a crash
    assert policy.index_key_lines('"\\N" = 1\n') == {("\\N",): 1}


HOSTILE_TOML = [
    # tomllib's cost grows with the square of a key's parts: 16000 took 5 s and 1 GB
    (".".join(["a"] * 16_000) + " = 1", "a key of more than 8 dotted parts"),
    (".".join(["a"] * 9) + " = 1", "a key of more than 8 dotted parts"),
    ("a . \"b\" . 'c'.d.e.f.g.h.i = 1", "a key of more than 8 dotted parts"),
    ("[" + ".".join(["a"] * 16_000) + "]", "a key of more than 8 dotted parts"),
    ("[[" + ".".join(["a"] * 16_000) + "]]", "a key of more than 8 dotted parts"),
    ("x = [{ " + ".".join(["a"] * 16_000) + " = 1 }]", "a key of more than 8 dotted parts"),
    # RecursionError in tomllib
    ("x = " + "[" * 500 + "]" * 500, "arrays or inline tables nested deeper than 32"),
    ("x = " + "{a=" * 3000 + "1" + "}" * 3000, "arrays or inline tables nested deeper than 32"),
    # ValueError: more digits than int() converts
    ("burst = " + "9" * 5000, "a key or value of more than 4096 characters"),
]


@pytest.mark.parametrize(("text", "problem"), HOSTILE_TOML)
def test_hostile_toml_is_refused_before_tomllib(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, f"# operator policy\n[defaults]\n{text}\n")
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert str(info.value) == f"policy {path}:3: {problem}"
    assert info.value.exit_status == EXIT_BAD_INPUT


def test_the_hostile_toml_check_skips_strings_and_comments(tmp_path: Path) -> None:
    dots = ".".join(["a"] * 20)
    deep = "[" * 40 + "{" * 40
    text = (
        f"# {dots} = 1 {deep}\n"
        + HEAD
        + f'config = {{ a = "{dots} = {deep}", b = \'{deep}\', c = """\n{dots} = 1\n""" }}\n'
        + "[grant.limits]\npids = 2\n"
    )
    assert load(tmp_path, text).grants[0].config["a"] == f"{dots} = {deep}"
    # eight parts are no hazard: the loader names the unknown key as before
    assert error(tmp_path, ".".join(["a"] * 8) + " = 1\n")[:2] == (1, "a")


def test_index_key_lines() -> None:
    src = f'[defaults]\nburst = 1\n[[grant]]\nsigner = "{SIGNER}"\n[grant.limits]\npids = 2\n[[grant]]\n"plugin" = "x"\nlimits . pids = 3\n'
    index = policy.index_key_lines(src)
    assert index[("defaults", "burst")] == 2
    assert index[("grant", 0)] == 3
    assert index[("grant", 0, "signer")] == 4
    assert index[("grant", 0, "limits", "pids")] == 6
    assert index[("grant", 1)] == 7
    assert index[("grant", 1, "plugin")] == 8
    assert index[("grant", 1, "limits", "pids")] == 9


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^policy .*absent\.toml: cannot open: No such file"):
        Policy.load(tmp_path / "absent.toml")
    with pytest.raises(PolicyError, match="not a regular file"):
        Policy.load(tmp_path)
    loose = write(tmp_path, HEAD)
    loose.chmod(0o666)
    with pytest.raises(PolicyError, match=r"writable by every user"):
        Policy.load(loose)
    loose.chmod(0o644)
    assert Policy.load(loose).grants[0].plugin == "hello"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):
        Policy.load(fifo)
    big = HEAD + "#" * (1024 * 1024) + "\n"
    with pytest.raises(PolicyError, match=r"larger than 1048576 bytes"):
        load(tmp_path, big)
    assert PolicyError("x").exit_status == EXIT_BAD_INPUT


# --- effective permissions -----------------------------------------------------------------


def make_grant(**kw: object) -> Grant:
    return Grant(signer=SIGNER, plugin="hello", **kw)  # type: ignore[arg-type]


def test_no_grant_grants_nothing() -> None:
    asked = Permissions(("/srv",), ("/out",), (("127.0.0.1", 80),), True, ("a",))
    eff = effective(asked, None, Defaults(rate_per_s=7, burst=9, kv_quota_bytes=11))
    assert eff == Effective(kv_quota_bytes=11, rate_per_s=7, burst=9)
    assert not check_kv(eff).allowed


def test_fs_intersection_is_component_wise() -> None:
    grant = make_grant(fs_read=("/srv/data",), fs_write=("/srv/out",))
    asked = Permissions(
        fs_read=("/srv/data", "/srv/data/sub", "/srv/data2", "/srv", "/srv/out"),
        fs_write=("/srv/out/x", "/srv/data", "/srv/outside"),
    )
    eff = effective(asked, grant, Defaults())
    assert eff.fs_read == ("/srv/data", "/srv/data/sub")
    assert eff.fs_write == ("/srv/out/x",)


def test_fs_root_grant_covers_everything() -> None:
    eff = effective(Permissions(fs_read=("/", "/etc")), make_grant(fs_read=("/",)), Defaults())
    assert eff.fs_read == ("/", "/etc")


def test_net_intersection_normalises_hosts() -> None:
    grant = make_grant(
        net_connect=frozenset({("api.example.com", 443), ("::1", 9000), ("10.0.0.1", 80)}),
        net_allow_networks=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    asked = Permissions(
        net_connect=(
            ("API.Example.COM", 443),
            ("0:0:0:0:0:0:0:1", 9000),
            ("10.0.0.1", 81),
            ("10.000.0.1", 80),
            ("evil.example.com", 443),
        )
    )
    eff = effective(asked, grant, Defaults())
    assert eff.net_connect == {("api.example.com", 443), ("::1", 9000)}
    assert eff.net_allow_networks == grant.net_allow_networks
    # nothing to connect to: the networks are not carried
    assert effective(Permissions(), grant, Defaults()).net_allow_networks == ()


def test_config_kv_rates_and_quota() -> None:
    grant = make_grant(config={"a": "policy-a", "b": "policy-b"}, kv=True, rate_per_s=3.0)
    asked = Permissions(kv=True, config=("a", "c"))
    eff = effective(asked, grant, Defaults(rate_per_s=100, burst=5, kv_quota_bytes=77))
    assert eff.config == {"a": "policy-a"}
    assert eff.kv
    assert eff.kv_quota_bytes == 77
    assert (eff.rate_per_s, eff.burst) == (3.0, 5)
    assert not effective(Permissions(kv=False), grant, Defaults()).kv
    assert not effective(Permissions(kv=True), make_grant(kv=False), Defaults()).kv
    eff = effective(asked, make_grant(kv=True, kv_quota_bytes=5, burst=2), Defaults())
    assert (eff.kv_quota_bytes, eff.burst) == (5, 2)


def test_cap_limits() -> None:
    eff = effective(Permissions(), make_grant(limits={"memory_mb": 32, "pids": 8}), Defaults())
    capped = cap_limits(Limits(memory_mb=64, pids=4, timeout_s=9), eff)
    assert capped == Limits(memory_mb=32, pids=4, timeout_s=9)
    assert cap_limits(Limits(), Effective()) == Limits()


def test_effective_as_dict_hides_config_values() -> None:
    eff = effective(
        Permissions(config=("k",), net_connect=(("::1", 1),)),
        make_grant(config={"k": "secret"}, net_connect=frozenset({("::1", 1)})),
        Defaults(),
    )
    d = policy.effective_as_dict(eff)
    assert d["config"] == ["k"]
    assert "secret" not in repr(d)
    assert d["net.connect"] == ["[::1]:1"]


# --- decisions ---------------------------------------------------------------------------------

FS = Effective(fs_read=("/srv/data", "/srv/data/deep", "/"), fs_write=("/srv/out",))
FS_NO_SLASH = Effective(fs_read=("/srv/data",), fs_write=("/srv/out",))


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/srv/data/../etc/passwd", "'..'"),
        ("/srv/data/..", "'..'"),
        ("/srv/data/", "ends with '/'"),
        ("/srv/data/x/", "ends with '/'"),
        ("/srv/data//x", "'//'"),
        ("//srv/data/x", "'//'"),
        ("/srv/data/./x", "'.' component"),
        ("/srv/data/.", "'.' component"),
        ("srv/data/x", "not absolute"),
        ("", "not absolute"),
        ("/srv/data/x\x00y", "NUL"),
        ("/srv/data/" + "a" * 4096, "longer than 4096"),
        ("/srv/data2/x", "not under a granted read root"),
        ("/srv/dat", "not under a granted read root"),
        ("/srv", "not under a granted read root"),
        ("/", "not under a granted read root"),
        ("/srv/out/x", "not under a granted read root"),
    ],
)
def test_check_fs_denies(path: str, reason: str) -> None:
    decision, root, rel = check_fs(FS_NO_SLASH, path, write=False)
    assert not decision.allowed
    assert reason in decision.reason
    assert (root, rel) == (None, None)


def test_check_fs_allows_with_root_and_relative() -> None:
    d, root, rel = check_fs(FS_NO_SLASH, "/srv/data/a/b.txt", write=False)
    assert d.allowed
    assert (root, rel) == ("/srv/data", "a/b.txt")
    d, root, rel = check_fs(FS_NO_SLASH, "/srv/data", write=False)
    assert d.allowed
    assert (root, rel) == ("/srv/data", ".")
    d, root, rel = check_fs(FS_NO_SLASH, "/srv/data/..x", write=False)  # a name, not '..'
    assert d.allowed
    assert rel == "..x"
    # the most specific root wins; "/" as a root works
    assert check_fs(FS, "/srv/data/deep/f", write=False)[1:] == ("/srv/data/deep", "f")
    assert check_fs(FS, "/etc/hosts", write=False)[1:] == ("/", "etc/hosts")
    assert check_fs(FS, "/", write=False)[1:] == ("/", ".")


def test_check_fs_write_needs_a_write_root() -> None:
    assert check_fs(FS_NO_SLASH, "/srv/out/r.txt", write=True)[0].allowed
    d = check_fs(FS_NO_SLASH, "/srv/data/a", write=True)[0]
    assert not d.allowed
    assert "not under a granted write root" in d.reason
    assert not check_fs(FS_NO_SLASH, "/srv/out2", write=True)[0].allowed
    assert not check_fs(Effective(), "/srv/data", write=False)[0].allowed


@given(
    st.text(alphabet="/.ab\x00", max_size=24),
    st.booleans(),
)
def test_check_fs_never_escapes_a_root(path: str, write: bool) -> None:
    eff = Effective(fs_read=("/a", "/a/b"), fs_write=("/b",))
    d, root, rel = check_fs(eff, path, write)
    if not d.allowed:
        assert root is None
        assert rel is None
        return
    assert root is not None
    assert rel is not None
    assert rel
    assert root in (eff.fs_write if write else eff.fs_read)
    assert posixpath.normpath(path) == path
    joined = root if rel == "." else f"{root}/{rel}"
    assert joined == path
    assert ".." not in rel.split("/")


NET = Effective(
    net_connect=frozenset({("api.example.com", 443), ("::1", 9000), ("127.0.0.1", 8080)}),
    net_allow_networks=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")),
)


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("api.example.com", 443, True),
        ("API.EXAMPLE.com", 443, True),
        ("api.example.com", 80, False),
        ("api.example.co", 443, False),
        ("::1", 9000, True),
        ("0:0:0:0:0:0:0:1", 9000, True),
        ("[::1]", 9000, True),
        ("[0::1]", 9000, True),
        ("::2", 9000, False),
        ("127.0.0.1", 8080, True),
        ("127.1", 8080, False),
        ("127.000.0.1", 8080, False),
        ("2130706433", 8080, False),
        ("api.example.com.", 443, False),
        ("", 443, False),
        ("bad host", 443, False),
        ("api.example.com", 0, False),
        ("api.example.com", 70000, False),
        ("\u212aexample.com", 443, False),  # the Kelvin sign lowers to 'k'
    ],
)
def test_check_net(host: str, port: int, allowed: bool) -> None:
    assert check_net(NET, host, port).allowed is allowed
    assert not check_net(Effective(), host, port).allowed


def test_check_resolved_ip_literal_must_equal() -> None:
    assert check_resolved(NET, "127.0.0.1", ["127.0.0.1"]).allowed
    assert check_resolved(NET, "::1", ["0::1"]).allowed
    d = check_resolved(NET, "127.0.0.1", ["127.0.0.1", "10.0.0.2"])
    assert not d.allowed
    assert "10.0.0.2" in d.reason


def test_check_resolved_name_must_stay_in_networks() -> None:
    assert check_resolved(NET, "api.example.com", ["10.1.2.3", "fd00::5"]).allowed
    assert check_resolved(NET, "API.example.com", ["10.1.2.3"]).allowed
    d = check_resolved(NET, "api.example.com", ["10.1.2.3", "169.254.169.254"])
    assert not d.allowed
    assert "169.254.169.254" in d.reason
    assert "outside" in d.reason
    d = check_resolved(NET, "api.example.com", ["::ffff:10.0.0.1"])
    assert not d.allowed
    assert "::ffff:a00:1" in d.reason
    assert not check_resolved(NET, "api.example.com", []).allowed
    assert not check_resolved(NET, "api.example.com", ["not-an-ip"]).allowed
    assert not check_resolved(NET, "evil.example.com", ["10.0.0.1"]).allowed
    assert not check_resolved(Effective(), "api.example.com", ["10.0.0.1"]).allowed


def test_check_config_and_kv() -> None:
    eff = Effective(config={"greeting": "hi"}, kv=True)
    assert check_config(eff, "greeting").allowed
    d = check_config(eff, "password")
    assert not d.allowed
    assert "password" in d.reason
    assert check_kv(eff).allowed
    assert not check_kv(Effective()).allowed


# --- rate limiting ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_burst_then_refill() -> None:
    clock = FakeClock()
    rl = RateLimiter(rate=10, burst=3, clock=clock)
    assert [rl.allow() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.05  # half a token
    assert not rl.allow()
    clock.now += 0.05  # 0.05 + 0.05 is a little under 0.1 in floating point: still a token
    assert rl.allow()
    assert not rl.allow()
    clock.now += 3600  # refill stops at the burst
    assert [rl.allow() for _ in range(4)] == [True, True, True, False]


def test_rate_limiter_clock_backwards_refills_nothing() -> None:
    clock = FakeClock()
    rl = RateLimiter(rate=1, burst=1, clock=clock)
    assert rl.allow()
    clock.now -= 100
    assert not rl.allow()
    clock.now += 100.5  # back to where it was, plus half a second: still half a token
    assert not rl.allow()
    clock.now += 0.5
    assert rl.allow()


def test_rate_limiter_rejects_bad_parameters() -> None:
    for rate, burst in ((0, 1), (-1, 1), (float("nan"), 1), (1, 0)):
        with pytest.raises(ValueError):
            RateLimiter(rate, burst)
