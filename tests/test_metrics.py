"""``metrics``: after real launches, the Prometheus text is valid and counts what happened.

A few launches into one state directory (a plugin that ends ok, twice; ``spin`` killed at
its timeout; ``memgrow`` stopped at its memory limit), then ``python -m forgeone_isolate
metrics --state-dir D`` must print text exposition (format 0.0.4) that a strict reader
accepts: every line is a HELP, a TYPE or a sample ``name{labels} value``; every sample's
metric has its TYPE (and HELP) before it; no series twice. Each plugin's counters equal
the launches done and how they ended; the spinning plugin used CPU time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guestgen import Guest, write_plugin
from test_limits import assert_no_leaks

from forgeone_isolate import package, signing

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "tests" / "plugins"

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE_RE = re.compile(
    rf"^(?P<name>{METRIC_NAME})"
    rf"(?:\{{(?P<labels>(?:{LABEL})(?:,{LABEL})*,?)?\}})?"
    r" (?P<value>\S+)(?: (?P<ts>-?\d+))?$"
)
HELP_RE = re.compile(rf"^# HELP (?P<name>{METRIC_NAME}) (?P<text>.*)$")
TYPE_RE = re.compile(
    rf"^# TYPE (?P<name>{METRIC_NAME}) (?P<type>counter|gauge|histogram|summary|untyped)$"
)
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Strictly parse Prometheus text exposition; return {(name, labels): value}.

    Fails the test on any line that is not a HELP, a TYPE, a sample or blank; on a sample
    whose metric has no TYPE and HELP before it; on a second TYPE or HELP for one metric; on a
    repeated series; on a counter that is negative or not named ``*_total``.
    """
    assert text.endswith("\n"), "exposition must end with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            if m := HELP_RE.match(line):
                assert m["name"] not in helps, f"line {n}: second HELP for {m['name']}"
                helps.add(m["name"])
            elif m := TYPE_RE.match(line):
                assert m["name"] not in types, f"line {n}: second TYPE for {m['name']}"
                assert not any(k[0] == m["name"] for k in samples), f"line {n}: TYPE after samples"
                types[m["name"]] = m["type"]
            else:
                assert not line.startswith(("# HELP", "# TYPE")), f"line {n}: malformed: {line!r}"
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"line {n}: not a sample: {line!r}"
        name = m["name"]
        assert name in types, f"line {n}: {name} has no TYPE before it"
        assert name in helps, f"line {n}: {name} has no HELP"
        labels = tuple(sorted(LABEL_RE.findall(m["labels"] or "")))
        assert len({k for k, _ in labels}) == len(labels), f"line {n}: a label twice"
        value = float(m["value"])  # ValueError fails the test: Go float syntax is a subset
        key = (name, labels)
        assert key not in samples, f"line {n}: series {key} twice"
        if types[name] == "counter":
            assert name.endswith("_total"), f"line {n}: counter {name} not named *_total"
            assert value >= 0, f"line {n}: counter value {value}"  # NaN fails too
        samples[key] = value
    return samples


def _launch(pkg: Path, trust: Path, state: Path, run_dir: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "forgeone_isolate", "launch", str(pkg), "--trust", str(trust)]
    argv += ["--state-dir", str(state), "--json"]
    env = dict(os.environ, FORGEONE_RUN_DIR=str(run_dir))
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, f"no report (exit {proc.returncode}); stderr: {proc.stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("# TYPE a_total counter\na_total 1\n", "no HELP"),
        ("# HELP a_total x\na_total 1\n", "no TYPE"),
        ('# HELP a_total x\n# TYPE a_total counter\na_total{p="x} 1\n', "not a sample"),
        ('# HELP a_total x\n# TYPE a_total counter\na_total{p="x"}\n', "not a sample"),
        ("# HELP a_total x\n# TYPE a_total counter\na_total one\n", "could not convert"),
        ("# HELP a x\n# TYPE a counter\na 1\n", "not named"),
        ("# HELP a_total x\n# TYPE a_total counter\na_total 1\na_total 2\n", "twice"),
        ("# HELP a_total x\n# TYPE a_total counter\na_total 1", "newline"),
    ],
)
def test_the_reader_is_strict(text: str, problem: str) -> None:
    with pytest.raises((AssertionError, ValueError), match=problem):
        parse_exposition(text)
    good = '# HELP a_total x\n# TYPE a_total counter\na_total{p="q\\"r",s="t"} 1.5\n'
    assert parse_exposition(good) == {("a_total", (("p", 'q\\"r'), ("s", "t"))): 1.5}


@pytest.mark.requires_root
@pytest.mark.requires_userns
@pytest.mark.requires_seccomp
@pytest.mark.requires_cgroup
def test_metrics_after_launches_is_valid_prometheus_text(tmp_path: Path) -> None:
    pair = signing.keygen(tmp_path / "keys")
    key = signing.load_private_key(pair.private_path)
    state, run_dir = tmp_path / "state", tmp_path / "run"

    def pack(name: str, wat: str, limits: dict[str, int]) -> Path:
        src = write_plugin(tmp_path / f"src-{name}", name, wat, {}, limits)
        out = tmp_path / f"{name}.forgepkg"
        out.write_bytes(package.build_package(src, key))
        return out

    g = Guest()
    g.call("hello", "(i32.const 1)")  # one brokered call (log) per launch
    fine = pack("fine", g.wat(), {})
    spin = pack("spin", (PLUGINS / "spin.wat").read_text(), {"timeout_s": 1})
    memgrow = pack("memgrow", (PLUGINS / "memgrow.wat").read_text(), {"memory_mb": 8})

    ends = []
    reports: list[dict[str, Any]] = []
    for pkg in (fine, fine, spin, memgrow):
        report = _launch(pkg, pair.public_path, state, run_dir)
        reports.append(report)
        ends.append((report["plugin"]["name"], report["status"], report["reason"].split(":")[0]))
    assert ends == [
        ("fine", "ok", ""),
        ("fine", "ok", ""),
        ("spin", "killed", "timeout"),
        ("memgrow", "killed", "memory"),
    ]

    proc = subprocess.run(
        [sys.executable, "-m", "forgeone_isolate", "metrics", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    samples = parse_exposition(proc.stdout)

    def value(metric: str, plugin: str) -> float:
        labels = (("plugin", plugin), ("signer", pair.fingerprint))
        return samples[(f"forgeone_plugin_{metric}", labels)]

    expected = {
        "fine": {"launches": 2, "ok": 2, "errors": 0, "kills_timeout": 0, "kills_memory": 0},
        "spin": {"launches": 1, "ok": 0, "errors": 0, "kills_timeout": 1, "kills_memory": 0},
        "memgrow": {"launches": 1, "ok": 0, "errors": 0, "kills_timeout": 0, "kills_memory": 1},
    }
    for plugin, counters in expected.items():
        got = {name: value(f"{name}_total", plugin) for name in counters}
        assert got == counters, (plugin, got)
        assert value("kills_seccomp_total", plugin) == 0
        assert value("kills_other_total", plugin) == 0
        assert value("calls_denied_total", plugin) == 0
    assert value("calls_allowed_total", "fine") == 2
    # spin ran flat out for about its 1 s timeout (cpu_percent 100 by default).
    assert 0.1 < value("cpu_seconds_total", "spin") < 2.0
    assert value("cpu_seconds_total", "fine") >= 0
    plugins = {dict(labels)["plugin"] for _, labels in samples}
    assert plugins == {"fine", "spin", "memgrow"}
    assert_no_leaks(reports)
