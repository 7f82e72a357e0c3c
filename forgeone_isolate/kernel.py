"""The one seam between the sandbox steps and the kernel.

Mechanism modules call a :class:`Kernel`; the child's sequence is given one. The real
implementation performs the syscalls; :class:`RecordingKernel` only records them, so unit
tests assert the exact ordered sequence without root.
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any, Protocol

import prctl

from forgeone_isolate._sys import libc


class Kernel(Protocol):
    """Every kernel call the child sequence makes."""

    def unshare(self, flags: int) -> None: ...
    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None: ...
    def umount2(self, target: str, flags: int) -> None: ...
    def pivot_root(self, new_root: str, put_old: str) -> None: ...
    def chdir(self, path: str) -> None: ...
    def sethostname(self, name: str) -> None: ...
    def set_interface_up(self, name: str) -> None: ...
    def dup2(self, fd: int, fd2: int) -> None: ...
    def close_range(self, first: int) -> None: ...
    def setrlimit(self, which: int, soft: int, hard: int) -> None: ...
    def set_securebits(self, bits: int) -> None: ...
    def capbset_drop(self, cap: int) -> None: ...
    def clear_ambient_caps(self) -> None: ...
    def capset_clear(self) -> None: ...
    def set_no_new_privs(self) -> None: ...
    def set_pdeathsig(self, sig: int) -> None: ...
    def load_seccomp(self, program: Any) -> None: ...


class RealKernel:
    """Performs the calls. Errors surface as OSError with errno set."""

    def unshare(self, flags: int) -> None:
        libc.unshare(flags)

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        libc.mount(source, target, fstype, flags, data)

    def umount2(self, target: str, flags: int) -> None:
        libc.umount2(target, flags)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        libc.pivot_root(new_root, put_old)

    def chdir(self, path: str) -> None:
        os.chdir(path)

    def sethostname(self, name: str) -> None:
        libc.sethostname(name)

    def set_interface_up(self, name: str) -> None:
        libc.set_interface_up(name)

    def dup2(self, fd: int, fd2: int) -> None:
        os.dup2(fd, fd2, inheritable=False)

    def close_range(self, first: int) -> None:
        libc.close_range(first)

    def setrlimit(self, which: int, soft: int, hard: int) -> None:
        resource.setrlimit(which, (soft, hard))

    def set_securebits(self, bits: int) -> None:
        libc.set_securebits(bits)  # python-prctl refuses the ambient-raise bits

    def capbset_drop(self, cap: int) -> None:
        prctl.capbset_drop(cap)

    def clear_ambient_caps(self) -> None:
        libc.clear_ambient_caps()

    def capset_clear(self) -> None:
        libc.capset_clear()

    def set_no_new_privs(self) -> None:
        prctl.set_no_new_privs(1)

    def set_pdeathsig(self, sig: int) -> None:
        prctl.set_pdeathsig(sig)

    def load_seccomp(self, program: Any) -> None:
        program.load()


class RecordingKernel:
    """Records every call as ``(name, args)``; performs nothing. For unit tests."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._fail = fail or {}

    def _rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self._fail:
            err = self._fail[name]
            raise OSError(err, os.strerror(err))

    def names(self) -> list[str]:
        """The call names in order."""
        return [c[0] for c in self.calls]

    def unshare(self, flags: int) -> None:
        self._rec("unshare", flags)

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        self._rec("mount", source, target, fstype, flags, data)

    def umount2(self, target: str, flags: int) -> None:
        self._rec("umount2", target, flags)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        self._rec("pivot_root", new_root, put_old)

    def chdir(self, path: str) -> None:
        self._rec("chdir", path)

    def sethostname(self, name: str) -> None:
        self._rec("sethostname", name)

    def set_interface_up(self, name: str) -> None:
        self._rec("set_interface_up", name)

    def dup2(self, fd: int, fd2: int) -> None:
        self._rec("dup2", fd, fd2)

    def close_range(self, first: int) -> None:
        self._rec("close_range", first)

    def setrlimit(self, which: int, soft: int, hard: int) -> None:
        self._rec("setrlimit", which, soft, hard)

    def set_securebits(self, bits: int) -> None:
        self._rec("set_securebits", bits)

    def capbset_drop(self, cap: int) -> None:
        self._rec("capbset_drop", cap)

    def clear_ambient_caps(self) -> None:
        self._rec("clear_ambient_caps")

    def capset_clear(self) -> None:
        self._rec("capset_clear")

    def set_no_new_privs(self) -> None:
        self._rec("set_no_new_privs")

    def set_pdeathsig(self, sig: int) -> None:
        self._rec("set_pdeathsig", signal.Signals(sig).name)

    def load_seccomp(self, program: Any) -> None:
        self._rec("load_seccomp")
