"""The service configuration file: defaults, every key, and one-line refusals naming FILE:LINE."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forgeone_isolate import cli
from forgeone_isolate.config import (
    ConfigError,
    RestartDefaults,
    ServiceConfig,
    load_config,
    parse_config,
)
from forgeone_isolate.errors import EXIT_BAD_INPUT, PolicyError

REPO = Path(__file__).resolve().parent.parent
WHERE = Path("/etc/forgeone/config.toml")


def parse(text: str) -> ServiceConfig:
    return parse_config(text.encode(), WHERE)


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_empty_file_is_all_defaults() -> None:
    cfg = parse("")
    default = ServiceConfig()
    assert cfg.state_dir == default.state_dir == Path("/var/lib/forgeone")
    assert cfg.control_socket == Path("/run/forgeone/control.sock")
    assert cfg.policy is None
    assert cfg.control_group is None
    assert cfg.metrics_listen is None
    assert cfg.restart == RestartDefaults()
    assert cfg.address_pool == ipaddress.IPv4Network("10.213.0.0/16")
    assert cfg.source == WHERE


def test_every_key() -> None:
    cfg = parse(
        """
state_dir = "/srv/forgeone/state"
trust = "/etc/forgeone/trust.d"
policy = "/etc/forgeone/policy.toml"
log_level = "debug"
stop_timeout_s = 2
max_plugins = 10
cgroup_delegated = true

[control]
socket = "/run/fo/ctl.sock"
group = "root"
max_connections = 8

[uids]
first = 2000000
count = 1000

[network]
address_pool = "10.99.0.0/24"

[metrics]
listen = "127.0.0.1:9464"

[restart]
policy = "no"
max_restarts = 3
backoff_base_s = 1
backoff_cap_s = 8.5
"""
    )
    assert cfg.state_dir == Path("/srv/forgeone/state")
    assert cfg.trust == Path("/etc/forgeone/trust.d")
    assert cfg.policy == Path("/etc/forgeone/policy.toml")
    assert cfg.log_level == "debug"
    assert cfg.stop_timeout_s == 2.0
    assert cfg.max_plugins == 10
    assert cfg.cgroup_delegated is True
    assert cfg.control_socket == Path("/run/fo/ctl.sock")
    assert cfg.control_group == "root"
    assert cfg.control_gid == 0
    assert cfg.max_connections == 8
    assert (cfg.uid_first, cfg.uid_count) == (2000000, 1000)
    assert cfg.address_pool == ipaddress.IPv4Network("10.99.0.0/24")
    assert cfg.metrics_listen == ("127.0.0.1", 9464)
    assert cfg.restart == RestartDefaults("no", 3, 1.0, 8.5)
    assert cfg.as_dict()["metrics"]["listen"] == "127.0.0.1:9464"


def test_ipv6_loopback_metrics() -> None:
    assert parse('[metrics]\nlisten = "[::1]:9100"\n').metrics_listen == ("::1", 9100)


def test_backoff_doubles_and_caps() -> None:
    r = RestartDefaults(backoff_base_s=0.5, backoff_cap_s=30.0)
    assert [r.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert r.delay(20) == 30.0


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        ("\n\nfrobnicate = 1\n", 3, "frobnicate", "unknown key"),
        ("[control]\nsocket = '/x'\nsokcet = '/y'\n", 3, "control.sokcet", "unknown key"),
        ("[extra]\na = 1\n", 1, "extra", "unknown key"),
        ("log_level = 'loud'\n", 1, "log_level", "must be one of"),
        ("state_dir = 'relative/dir'\n", 1, "state_dir", "absolute path"),
        ("state_dir = 5\n", 1, "state_dir", "must be a string"),
        ("\n[uids]\nfirst = 0\n", 3, "uids.first", "must be in"),
        ("[uids]\nfirst = 4294967000\ncount = 65536\n", 3, "uids.count", "largest uid"),
        ("[uids]\ncount = true\n", 2, "uids.count", "must be an integer"),
        ("stop_timeout_s = 'soon'\n", 1, "stop_timeout_s", "must be a number"),
        ("cgroup_delegated = 'yes'\n", 1, "cgroup_delegated", "true or false"),
        ("[metrics]\nlisten = '0.0.0.0:9464'\n", 2, "metrics.listen", "not a loopback"),
        ("[metrics]\nlisten = '192.168.1.5:9464'\n", 2, "metrics.listen", "not a loopback"),
        ("[metrics]\nlisten = 'localhost:9464'\n", 2, "metrics.listen", "ADDRESS:PORT"),
        ("[metrics]\nlisten = '127.0.0.1:70000'\n", 2, "metrics.listen", "outside"),
        ("[network]\naddress_pool = '10.0.0.1/8'\n", 2, "network.address_pool", "not an IPv4"),
        ("[network]\naddress_pool = '10.0.0.0/31'\n", 2, "network.address_pool", "too small"),
        # 64 links for up to 1024 plugins: two networked plugins could share addresses
        ("[network]\naddress_pool = '10.9.0.0/24'\n", 2, "network.address_pool", "fewer than"),
        ("[control]\ngroup = 'no-such-group-xyz'\n", 2, "control.group", "no such group"),
        ("[restart]\npolicy = 'always'\n", 2, "restart.policy", "must be one of"),
        (
            "[restart]\nbackoff_base_s = 10\nbackoff_cap_s = 5\n",
            3,
            "restart.backoff_cap_s",
            "at least backoff_base_s",
        ),
        ("control = 3\n", 1, "control", "must be a table"),
        # float() of it overflows: compared as an integer, and not echoed whole
        ("stop_timeout_s = " + "9" * 400, 1, "stop_timeout_s", "not 999999999999…(400 digits)"),
        # \d matched Arabic-Indic digits and int() read them: port 80
        ("[metrics]\nlisten = '127.0.0.1:\u0668\u0660'\n", 2, "metrics.listen", "ADDRESS:PORT"),
    ],
)
def test_bad_value_names_file_line_and_key(text: str, line: int, key: str, problem: str) -> None:
    message = refusal(text)
    assert message.startswith(f"config {WHERE}:{line}: {key}: "), message
    assert problem in message


def test_syntax_error_names_line() -> None:
    message = refusal("a = 1\nb = = 2\n")
    assert message.startswith(f"config {WHERE}:2: TOML syntax"), message


def test_only_newline_ends_a_line() -> None:
    # U+2028 in a comment is no line break for TOML; str.splitlines() made '"\N" = 1' a key
    assert parse('# x\u2028"\\N" = 1\n') == ServiceConfig(source=WHERE)
    assert refusal("# a\u2029b\x85c\nlog_level = 'loud'\n").startswith(f"config {WHERE}:2: ")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (".".join(["a"] * 16_000) + " = 1", "a key of more than 8 dotted parts"),
        ("[" + ".".join(["a"] * 16_000) + "]", "a key of more than 8 dotted parts"),
        ("x = " + "[" * 500 + "]" * 500, "arrays or inline tables nested deeper than 32"),
        ("max_plugins = " + "9" * 5000, "a key or value of more than 4096 characters"),
    ],
)
def test_hostile_toml_is_refused_before_tomllib(text: str, problem: str) -> None:
    assert refusal(f"log_level = 'info'\n{text}\n") == f"config {WHERE}:2: {problem}"


def test_serve_check_refuses_hostile_toml_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text('# x\u2028"\\N" = 1\nstop_timeout_s = ' + "9" * 400 + "\n")
    assert cli.main(["serve", "--config", str(path), "--check"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"config {path}:2: stop_timeout_s: must be in [0.1, 600.0]" in err


def test_not_utf8() -> None:
    with pytest.raises(ConfigError, match=":2: not UTF-8"):
        parse_config(b"a = 1\n\xff\n", WHERE)


def test_config_error_is_a_policy_error_exit_2() -> None:
    assert issubclass(ConfigError, PolicyError)
    assert ConfigError("x").exit_status == EXIT_BAD_INPUT


def test_load_refuses_unsafe_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text("log_level = 'info'\n")
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match="writable by every user"):
        load_config(path)
    os.chmod(path, 0o644)
    assert load_config(path).source == path
    path.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_serve_check_prints_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\n[metrics]\nlisten = "127.0.0.1:9"\n')
    assert cli.main(["serve", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert f'"state_dir": "{tmp_path}/state"' in out
    assert '"listen": "127.0.0.1:9"' in out


def test_serve_refuses_a_bad_config_with_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('log_level = "info"\n\n[metrics]\nlisten = "0.0.0.0:9464"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "forgeone_isolate", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{path}:4: metrics.listen:" in lines[0]
