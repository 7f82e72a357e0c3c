"""Capabilities and privileges: lock the securebits, empty every capability set.

Child only. The order is the one the kernel needs (FACTS.md gotcha 5): securebits first
(NOROOT so uid 0 in the namespace regains nothing; NO_SETUID_FIXUP; all locked), then the
bounding set (needs CAP_SETPCAP, which we still have), ambient, then capset clearing
effective, permitted and inheritable; then no_new_privs.
"""

from __future__ import annotations

from forgeone_isolate.kernel import Kernel

# <linux/securebits.h>: bit numbers; each *_LOCKED bit freezes the one before it.
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
SECUREBITS_LOCKED = (
    SECBIT_NOROOT
    | SECBIT_NOROOT_LOCKED
    | SECBIT_NO_SETUID_FIXUP
    | SECBIT_NO_SETUID_FIXUP_LOCKED
    | SECBIT_KEEP_CAPS_LOCKED
    | SECBIT_NO_CAP_AMBIENT_RAISE
    | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)


def _read_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63  # drop every bit the 64-bit sets can hold


#: the highest capability number this kernel knows, read at import (before any fork:
#: the child has no /proc by the time it drops capabilities)
LAST_CAP = _read_last_cap()


def last_cap() -> int:
    """The highest capability number this kernel knows."""
    return LAST_CAP


def lock_and_drop_bounding(k: Kernel, last: int) -> None:
    """Child: securebits locked, then the bounding set emptied. What the process holds now
    (effective, permitted) is untouched: it can still unshare its cgroup namespace."""
    k.set_securebits(SECUREBITS_LOCKED)
    for cap in range(last + 1):
        k.capbset_drop(cap)


def clear_capability_sets(k: Kernel) -> None:
    """Child: ambient, then effective, permitted and inheritable emptied (after
    :func:`lock_and_drop_bounding`, so nothing can come back)."""
    k.clear_ambient_caps()
    k.capset_clear()


def apply_no_new_privs(k: Kernel) -> None:
    """Child: PR_SET_NO_NEW_PRIVS (required for an unprivileged seccomp filter)."""
    k.set_no_new_privs()
