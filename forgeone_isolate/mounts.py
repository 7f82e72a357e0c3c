"""Mount namespace: an empty, read-only tmpfs root with no host path visible.

Child only. Order: make every mount private (so nothing propagates back to the host),
mount a tmpfs on a scratch directory, pivot_root into it with the ``pivot_root(".", ".")``
idiom, detach the old root, then make the new root read-only.
"""

from __future__ import annotations

from forgeone_isolate._sys.libc import (
    MNT_DETACH,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)
from forgeone_isolate.kernel import Kernel

ROOT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC


def setup_empty_root(k: Kernel, scratch: str) -> None:
    """Child: replace the root with an empty read-only tmpfs. ``scratch`` is any existing
    directory of the host used only as the mount point before the pivot."""
    k.mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    k.mount("forgeone", scratch, "tmpfs", ROOT_FLAGS, "size=16k,nr_inodes=4,mode=0555")
    k.chdir(scratch)
    k.pivot_root(".", ".")
    k.umount2(".", MNT_DETACH)
    k.chdir("/")
    k.mount(None, "/", None, MS_REMOUNT | MS_RDONLY | ROOT_FLAGS, None)
