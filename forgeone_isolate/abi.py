"""ABI v1: what a guest may import from module ``forgeone`` and what it may export.

This is the single source of the guest-facing contract (ARCHITECTURE.md, "ABI v1"). The
pack-time validator, the child's shims and the broker all read it from here.
"""

from __future__ import annotations

import errno
from typing import Final, Literal

ABI_VERSION: Final = 1
IMPORT_MODULE: Final = "forgeone"

ValType = Literal["i32", "i64"]

#: import name -> (parameter types, result types)
IMPORTS: Final[dict[str, tuple[tuple[ValType, ...], tuple[ValType, ...]]]] = {
    "log": (("i32", "i32", "i32"), ("i32",)),
    "clock_now": ((), ("i64",)),
    "random_fill": (("i32", "i32"), ("i32",)),
    "config_get": (("i32", "i32", "i32", "i32"), ("i32",)),
    "kv_get": (("i32", "i32", "i32", "i32"), ("i32",)),
    "kv_set": (("i32", "i32", "i32", "i32"), ("i32",)),
    "fs_open": (("i32", "i32", "i32"), ("i32",)),
    "net_connect": (("i32", "i32", "i32"), ("i32",)),
    "fd_read": (("i32", "i32", "i32"), ("i32",)),
    "fd_write": (("i32", "i32", "i32"), ("i32",)),
    "fd_close": (("i32",), ("i32",)),
    "output": (("i32", "i32"), ("i32",)),
}

#: lifecycle exports, each optional, each () -> i32, called in this order by `launch`.
LIFECYCLE: Final = ("init", "start", "stop", "pause", "resume", "unload")

#: function exports with a fixed signature when present.
EXPORT_FUNCS: Final[dict[str, tuple[tuple[ValType, ...], tuple[ValType, ...]]]] = {
    **{name: ((), ("i32",)) for name in LIFECYCLE},
    "alloc": (("i32",), ("i32",)),
    "handle": (("i32", "i32"), ("i32",)),
}

#: the guest must export its linear memory under this name.
MEMORY_EXPORT: Final = "memory"

# Results: >= 0 success, < 0 a negated Linux errno.
EPERM: Final = -errno.EPERM
ENOENT: Final = -errno.ENOENT
EIO: Final = -errno.EIO
E2BIG: Final = -errno.E2BIG
EBADF: Final = -errno.EBADF
EFAULT: Final = -errno.EFAULT
EINVAL: Final = -errno.EINVAL
ENOSYS: Final = -errno.ENOSYS

LOG_LEVELS: Final = ("debug", "info", "notice", "warning", "error")  # 0 debug .. 4 error
