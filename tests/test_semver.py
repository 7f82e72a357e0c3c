"""Semantic versions (semver.org 2.0.0) and dependency ranges."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeone_isolate.semver import Range, SemverError, Version

#: the precedence example of semver.org, item 11, lowest first
SEMVER_ORG_ORDER = [
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
]


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("0.0.0", (0, 0, 0, (), "")),
        ("1.2.3", (1, 2, 3, (), "")),
        ("10.20.30", (10, 20, 30, (), "")),
        ("1.0.0-alpha", (1, 0, 0, ("alpha",), "")),
        ("1.0.0-alpha.1", (1, 0, 0, ("alpha", "1"), "")),
        ("1.0.0-0.3.7", (1, 0, 0, ("0", "3", "7"), "")),
        ("1.0.0-x.7.z.92", (1, 0, 0, ("x", "7", "z", "92"), "")),
        ("1.0.0-x-y-z.--", (1, 0, 0, ("x-y-z", "--"), "")),
        ("1.0.0+20130313144700", (1, 0, 0, (), "20130313144700")),
        ("1.0.0-beta+exp.sha.5114f85", (1, 0, 0, ("beta",), "exp.sha.5114f85")),
        ("1.0.0+21AF26D3----117B344092BD", (1, 0, 0, (), "21AF26D3----117B344092BD")),
        ("999999999.0.0", (999999999, 0, 0, (), "")),
    ],
)
def test_parse(text: str, fields: tuple[Any, ...]) -> None:
    v = Version.parse(text)
    assert (v.major, v.minor, v.patch, v.pre, v.build) == fields
    assert str(v) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "1.2",
        "1.2.3.4",
        "v1.2.3",
        " 1.2.3",
        "1.2.3 ",
        "1.2.3\n",
        "01.2.3",
        "1.02.3",
        "1.2.03",
        "-1.2.3",
        "1.2.3-",
        "1.2.3+",
        "1.2.3-01",
        "1.2.3-alpha..1",
        "1.2.3-alpha_1",
        "1.2.3+build..1",
        "1.2.3-é",
        "1\u0661.0.0",  # an Arabic-Indic digit: int() would read it
        "1234567890.0.0",  # more than nine digits
        "1.0.0-" + "a" * 130,
    ],
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(SemverError, match="not a semantic version"):
        Version.parse(text)


@pytest.mark.parametrize("value", [None, 1, 1.0, b"1.0.0", ["1.0.0"]])
def test_parse_refuses_non_strings(value: Any) -> None:
    with pytest.raises(SemverError):
        Version.parse(value)


def test_semver_org_precedence_example() -> None:
    versions = [Version.parse(t) for t in SEMVER_ORG_ORDER]
    assert sorted(reversed(versions)) == versions
    for (i, a), (j, b) in itertools.product(enumerate(versions), repeat=2):
        assert (a < b) == (i < j)
        assert (a == b) == (i == j)
        assert (a >= b) == (i >= j)


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("1.0.0", "2.0.0"),
        ("2.0.0", "2.1.0"),
        ("2.1.0", "2.1.1"),
        ("1.9.0", "1.10.0"),
        ("1.0.0-2", "1.0.0-10"),  # numeric identifiers compare numerically
        ("1.0.0-10", "1.0.0-a"),  # numeric ones sort before alphanumeric ones
        ("1.0.0-B", "1.0.0-a"),  # ASCII order
        ("1.0.0-rc.1", "1.0.0"),
        ("0.9.9", "1.0.0-alpha"),
    ],
)
def test_precedence(low: str, high: str) -> None:
    assert Version.parse(low) < Version.parse(high)
    assert Version.parse(high) > Version.parse(low)


def test_build_metadata_is_ignored_for_precedence_and_hash() -> None:
    a, b = Version.parse("1.0.0+a"), Version.parse("1.0.0+b")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, Version(1, 0, 0)}) == 1
    assert str(a) != str(b)


def test_comparison_with_other_types() -> None:
    assert Version(1, 0, 0) != "1.0.0"
    with pytest.raises(TypeError):
        _ = Version(1, 0, 0) < "1.0.0"  # type: ignore[operator]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([*SEMVER_ORG_ORDER, "0.1.0", "2.0.0-rc.1+b", "1.0.0+x"])))
def test_ordering_is_total_and_consistent(texts: list[str]) -> None:
    versions = [Version.parse(t) for t in texts]
    ordered = sorted(versions)
    assert all(a <= b for a, b in itertools.pairwise(ordered))


# --------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("spec", "inside", "outside"),
    [
        ("*", ["0.0.0", "1.2.3", "99.0.0"], []),
        ("1.2.3", ["1.2.3", "1.2.3+build"], ["1.2.4", "1.2.2", "1.2.3-rc.1"]),
        ("=1.2.3", ["1.2.3"], ["1.2.4"]),
        # a pre-release of the next major (minor, patch) is not the same major
        ("^1.2.3", ["1.2.3", "1.2.9", "1.9.0"], ["1.2.2", "2.0.0", "0.9.0", "2.0.0-rc.1"]),
        ("^1.2.3", ["1.9.9"], ["2.0.0-0", "2.0.0-alpha"]),
        ("^0.2.3", ["0.2.3", "0.2.9"], ["0.3.0", "0.2.2", "1.0.0", "0.3.0-rc.1"]),
        ("^0.0.3", ["0.0.3"], ["0.0.4", "0.0.2", "0.1.0", "0.0.4-beta"]),
        ("~1.2.3", ["1.2.3", "1.2.99"], ["1.3.0", "1.2.2", "1.3.0-alpha"]),
        ("~0.0.1", ["0.0.1", "0.0.5"], ["0.1.0"]),
        (">1.0.0", ["1.0.1", "2.0.0"], ["1.0.0", "0.9.0"]),
        (">=1.0.0", ["1.0.0", "1.0.1"], ["0.9.9", "1.0.0-rc.1"]),
        ("<2.0.0", ["1.9.9", "2.0.0-rc.1"], ["2.0.0"]),
        ("<=2.0.0", ["2.0.0"], ["2.0.1"]),
        (">=1.2.0 <1.3.0", ["1.2.0", "1.2.7"], ["1.3.0", "1.1.9"]),
        ("^1.0.0 || ^3.0.0", ["1.5.0", "3.1.0"], ["2.0.0", "4.0.0"]),
        ("1.0.0||2.0.0", ["1.0.0", "2.0.0"], ["1.5.0"]),
        ("<1.0.0 || >=2.0.0 <2.1.0 || 5.0.0", ["0.5.0", "2.0.5", "5.0.0"], ["1.0.0", "2.1.0"]),
    ],
)
def test_ranges(spec: str, inside: list[str], outside: list[str]) -> None:
    r = Range.parse(spec)
    assert r.text == spec
    for v in inside:
        assert r.satisfied_by(Version.parse(v)), f"{v} should satisfy {spec}"
    for v in outside:
        assert not r.satisfied_by(Version.parse(v)), f"{v} should not satisfy {spec}"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "||",
        "1.0.0 ||",
        "|| 1.0.0",
        ">=",
        "^",
        "~",
        ">= 1.0.0",
        "~>1.0.0",
        "=>1.0.0",
        "1.x",
        "1.0",
        "latest",
        "^v1.0.0",
        "1.0.0 - 2.0.0",
        "*" * 300,
    ],
)
def test_range_refuses(spec: str) -> None:
    with pytest.raises(SemverError):
        Range.parse(spec)


@pytest.mark.parametrize("sep", ["\n", "\t", "\r", "\v", "\x1c", "\u3000", "\u2028", "\x85"])
@pytest.mark.parametrize("spec", ["1.0.0{}", "^1.0.0{}>=1.0.0", ">=1.0.0{}<2.0.0"])
def test_range_separates_comparators_with_spaces_only(spec: str, sep: str) -> None:
    # str.split() took all of these for spaces ("1.0.0\n" was 1.0.0)
    with pytest.raises(SemverError, match=r"^not a (version range|semantic version): ") as info:
        Range.parse(spec.format(sep))
    assert repr(sep)[1:-1] in str(info.value)


def test_range_spaces_may_repeat() -> None:
    assert Range.parse(" >=1.0.0   <2.0.0 ").satisfied_by(Version(1, 5, 0))


@pytest.mark.parametrize("value", [None, 1, ["^1.0.0"]])
def test_range_refuses_non_strings(value: Any) -> None:
    with pytest.raises(SemverError):
        Range.parse(value)
