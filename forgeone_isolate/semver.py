"""Semantic versions (semver.org 2.0.0) and the version ranges manifests use for dependencies.

Ranges: ``*``; an exact ``1.2.3`` or ``=1.2.3``; ``^1.2.3`` (same major, or same minor
below 1.0, or same patch below 0.1); ``~1.2.3`` (same minor); comparators ``>``, ``>=``,
``<``, ``<=`` joined by spaces (all must hold; spaces only, not tabs or newlines);
alternatives joined by ``||``. A pre-release of the next version is not the same major
(minor): ``^1.2.3`` is ``>=1.2.3 <2.0.0-0``, so ``2.0.0-rc.1`` is outside it, and
``~1.2.3`` is ``>=1.2.3 <1.3.0-0``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

_NUM = r"0|[1-9][0-9]{0,8}"  # not \d: it matches non-ASCII digits, which int() accepts
_IDENT = r"[0-9A-Za-z-]+"
SEMVER_RE = re.compile(
    rf"^(?P<major>{_NUM})\.(?P<minor>{_NUM})\.(?P<patch>{_NUM})"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?"
    rf"(?:\+(?P<build>{_IDENT}(?:\.{_IDENT})*))?\Z"
)
MAX_VERSION_LEN = 128


class SemverError(ValueError):
    """Raised when a version or a range does not parse."""


@total_ordering
@dataclass(frozen=True)
class Version:
    """A parsed semantic version; ordering follows semver precedence (build ignored)."""

    major: int
    minor: int
    patch: int
    pre: tuple[str, ...] = ()
    build: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``text``. Raises: SemverError."""
        if not isinstance(text, str) or len(text) > MAX_VERSION_LEN:
            raise SemverError(f"not a semantic version: {text!r}")
        m = SEMVER_RE.match(text)
        if m is None:
            raise SemverError(f"not a semantic version: {text!r}")
        pre = tuple(m.group("pre").split(".")) if m.group("pre") else ()
        for ident in pre:
            if ident.isdigit() and len(ident) > 1 and ident.startswith("0"):
                raise SemverError(f"not a semantic version (leading zero): {text!r}")
        return cls(
            int(m.group("major")),
            int(m.group("minor")),
            int(m.group("patch")),
            pre,
            m.group("build") or "",
        )

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.pre)
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, pre_key)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        s = f"{self.major}.{self.minor}.{self.patch}"
        if self.pre:
            s += "-" + ".".join(self.pre)
        if self.build:
            s += "+" + self.build
        return s


_COMPARATOR_RE = re.compile(r"^(>=|<=|>|<|=|\^|~)?(.+)\Z")  # \Z: $ passes a final "\n"


@dataclass(frozen=True)
class Range:
    """A version range: a disjunction of conjunctions of (operator, version)."""

    text: str
    alternatives: tuple[tuple[tuple[str, Version], ...], ...]

    @classmethod
    def parse(cls, text: str) -> Range:
        """Parse ``text``. Raises: SemverError."""
        if not isinstance(text, str) or not text.strip() or len(text) > 256:
            raise SemverError(f"not a version range: {text!r}")
        alts: list[tuple[tuple[str, Version], ...]] = []
        for alt in text.split("||"):
            parts = [p for p in alt.split(" ") if p]  # not split(): \n, \v, U+3000 ...
            if not parts:
                raise SemverError(f"not a version range: {text!r}")
            conj: list[tuple[str, Version]] = []
            for part in parts:
                if part == "*":
                    conj.append((">=", Version(0, 0, 0)))
                    continue
                m = _COMPARATOR_RE.match(part)
                if m is None:
                    raise SemverError(f"not a version range: {text!r}")
                op = m.group(1) or "="
                conj.extend(_expand(op, Version.parse(m.group(2))))
            alts.append(tuple(conj))
        return cls(text, tuple(alts))

    def satisfied_by(self, version: Version) -> bool:
        """True when ``version`` lies in the range."""
        return any(all(_holds(op, version, v) for op, v in conj) for conj in self.alternatives)


#: the lowest pre-release: ``< X.0.0-0`` keeps out every pre-release of X.0.0 as well
_LOWEST_PRE = ("0",)


def _expand(op: str, v: Version) -> list[tuple[str, Version]]:
    if op == "^":
        if v.major > 0:
            upper = Version(v.major + 1, 0, 0, _LOWEST_PRE)
        elif v.minor > 0:
            upper = Version(0, v.minor + 1, 0, _LOWEST_PRE)
        else:
            upper = Version(0, 0, v.patch + 1, _LOWEST_PRE)
        return [(">=", v), ("<", upper)]
    if op == "~":
        return [(">=", v), ("<", Version(v.major, v.minor + 1, 0, _LOWEST_PRE))]
    return [(op, v)]


def _holds(op: str, a: Version, b: Version) -> bool:
    if op == "=":
        return a == b
    if op == ">=":
        return a >= b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a < b
