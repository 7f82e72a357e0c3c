"""The two child processes of a launch (see markers.py for their channel with the parent).

The keeper (first fork, in C: ``_sys/_keeper.c``, started by :func:`fork_children`) leaves
the host's namespaces, waits for the parent to map its ids, makes PID 1 of the new PID
namespace (a clone sharing its memory, the parent's own child: CLONE_PARENT), reports its
pid and exits; the parent reaps both.
``sandbox_sequence`` (in PID 1): every remaining layer, in order, each step named so a
failure reports ``(step, errno, message)``; halfway, it waits to be placed in its cgroup
(READY/PLACED) and roots a cgroup namespace there; seccomp is last because once it is
loaded nothing else could be set up. Only then the payload runs: wasmtime for a real
launch, a probe for the death tests.

PID 1 ends with ``os._exit``: no atexit handler, no flush, nothing that opens a file.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

# guest is imported here, before any fork: after pivot_root no module file can be read.
from forgeone_isolate import caps, fds, guest, markers, mounts, ns, rlimits, seccomp_filter
from forgeone_isolate import plan as plan_mod
from forgeone_isolate._sys import _keeper
from forgeone_isolate._sys import libc as libc_mod
from forgeone_isolate._sys.libc import CLONE_NEWCGROUP
from forgeone_isolate.kernel import Kernel, RealKernel
from forgeone_isolate.plan import SandboxPlan

# One malloc arena for every thread of any process that forks sandboxes. glibc frees memory
# of a secondary arena through shrink_heap, which opens /proc/sys/vm/overcommit_memory the
# first time: in a child forked from a thread that used such an arena, that open would come
# after the seccomp filter and kill it. With a single (main) arena that path never runs.
libc_mod.set_malloc_arena_max(1)


class StepFailed(Exception):
    """A named step of the child sequence failed."""

    def __init__(self, step: str, err: int, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.errno = err
        self.message = message


#: how long each step of this process took, in ms (sent to the parent with FILTERED)
STEP_MS: dict[str, float] = {}


@contextmanager
def step(name: str) -> Iterator[None]:
    """Name the step that a failure inside belongs to, and time it."""
    started = time.perf_counter()
    try:
        yield
        STEP_MS[name] = round(STEP_MS.get(name, 0.0) + (time.perf_counter() - started) * 1000, 3)
    except StepFailed:
        raise
    except OSError as e:
        raise StepFailed(name, e.errno or errno_mod.EIO, e.strerror or str(e)) from None
    except Exception as e:
        raise StepFailed(name, errno_mod.EINVAL, f"{type(e).__name__}: {e}") from None


@dataclass
class ChildChannels:
    """The descriptors the children inherit (numbers in the child)."""

    control: socket.socket
    broker: socket.socket
    devnull: int


def fork_children(
    plan: SandboxPlan,
    chans: ChildChannels,
    payload_factory: Callable[[], Callable[[], int]],
    cgroup_fd: int = -1,
) -> tuple[int, bool]:
    """Fork the keeper (in C: ``_sys/_keeper.c``), which unshares, is mapped, clones PID 1
    as our child and exits. Returns the keeper's pid and whether it was born in the cgroup v2
    directory ``cgroup_fd`` (-1: none; then the parent attaches it); in PID 1, runs the
    sandbox and never returns.

    The keeper keeps only the channels and /dev/null of every descriptor this process
    has. With other threads alive (Python's or native ones) the interpreter's fork protocol
    runs, as ``os.fork``'s, and the keeper is attached by the parent; alone, the fork is
    lean (and on cgroup v2 a clone into the cgroup).

    Raises: OSError when the first fork fails.
    """
    flags = ns.flags_for(n for n in plan.namespaces if n != "cgroup")
    threaded = threading.active_count() > 1 or libc_mod.task_count() != 1
    pid, placed = _keeper.fork_keeper(
        chans.control.fileno(),
        chans.broker.fileno(),
        os.getpid(),
        flags,
        (chans.devnull,),
        threaded,
        -1 if threaded else cgroup_fd,  # the raw clone3 is for one thread only (_keeper.c)
    )
    if pid == 0:  # PID 1 of the new PID namespace
        if not threaded:
            _default_python_handlers()
        STEP_MS.clear()
        STEP_MS.update({k: round(v, 3) for k, v in _keeper.keeper_steps().items()})
        _plugin_main(RealKernel(), plan, chans, payload_factory)
    return pid, placed


def _default_python_handlers() -> None:
    """PID 1 of a lean fork: the parent's Python signal handlers are not ours (and a signal
    the parent had caught but not yet handled would otherwise run its handler here)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        if callable(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_DFL)


def _report(ctl: socket.socket, e: StepFailed) -> None:
    with contextlib.suppress(OSError):
        markers.send(ctl, markers.STEP_FAILED, step=e.step, errno=e.errno, message=e.message)


def _plugin_main(
    k: Kernel,
    plan: SandboxPlan,
    chans: ChildChannels,
    payload_factory: Callable[[], Callable[[], int]],
) -> NoReturn:
    try:
        payload = sandbox_sequence(k, plan, chans, payload_factory)
    except StepFailed as e:
        _report(chans.control, e)
        os._exit(markers.EXIT_SETUP_FAILED)
    except BaseException as e:
        _report(chans.control, StepFailed("internal", errno_mod.EIO, f"{type(e).__name__}: {e}"))
        os._exit(markers.EXIT_SETUP_FAILED)
    try:
        status = payload()
    except BaseException:
        status = markers.EXIT_PAYLOAD_CRASHED
    os._exit(status)


def sandbox_sequence(
    k: Kernel,
    plan: SandboxPlan,
    chans: ChildChannels,
    payload_factory: Callable[[], Callable[[], int]],
) -> Callable[[], int]:
    """PID 1, in order, before any plugin byte runs. Returns the payload to run.

    Raises: StepFailed naming the step.
    """
    with step("pdeathsig"):
        k.set_pdeathsig(signal.SIGKILL)  # die with the supervisor, our parent (CLONE_PARENT)
    with step("mounts"):
        mounts.setup_empty_root(k, plan.scratch_mount)  # needs CAP_SYS_ADMIN: before caps
    with step("hostname"):
        k.sethostname(plan.hostname)
    with step("network"):
        k.set_interface_up("lo")  # loopback only: a new net namespace has nothing else
    with step("fds"):
        fds.setup_fds(k, chans.devnull, chans.broker.fileno(), chans.control.fileno())
        if isinstance(k, RealKernel):
            chans.control.detach()
            chans.control = socket.socket(fileno=fds.CONTROL_FD)
    control = chans.control
    with step("prepare"):
        # Everything that allocates big happens before the doors close: the payload
        # (wasmtime engine, module, store, linker, broker socket) and the filter program.
        payload = payload_factory()
        program = seccomp_filter.filter_for(
            plan.seccomp_allow, plan.seccomp_min_fd, plan_mod.NOFILE - 1
        )  # built by the parent before the fork (see launch.run_plan): here, a lookup
    with step("capabilities"):  # the bounding set before the wait: nothing held changes yet
        caps.lock_and_drop_bounding(k, caps.last_cap())
    # Wait to be placed in the plugin's cgroup: the parent attached it while all of the
    # above ran (a first attach to a new cgroup can take milliseconds).
    markers.send(control, markers.READY)
    reply = markers.recv(control)
    if reply is None or reply.get("m") != markers.PLACED:
        os._exit(markers.EXIT_PROTOCOL)
    vm_size = reply.get("vm_size")  # read by the parent in /proc: we have none any more
    if not isinstance(vm_size, int) or isinstance(vm_size, bool) or vm_size <= 0:
        os._exit(markers.EXIT_PROTOCOL)
    if "cgroup" in plan.namespaces:
        with step("unshare-cgroup"):
            k.unshare(CLONE_NEWCGROUP)  # now placed: the namespace is rooted at our cgroup
    with step("rlimits"):
        limits = list(plan.rlimits)
        address_space = vm_size + plan.as_headroom + plan.memory_bytes
        limits.append(("as", address_space, address_space))
        rlimits.apply_rlimits(k, limits)
    with step("capabilities"):
        caps.clear_capability_sets(k)
    with step("no_new_privs"):
        caps.apply_no_new_privs(k)
    with step("seccomp"):
        k.load_seccomp(program)  # last: after it, nothing can be set up any more
    markers.send(control, markers.FILTERED, steps=STEP_MS)
    if isinstance(payload, guest.PreparedGuest):
        # Everything is in place: make the instance while the parent reads /proc (a start
        # function may run; a lifecycle export runs only once the parent has observed).
        payload.instantiate()
    reply = markers.recv(control)
    if reply is None or reply.get("m") != markers.OBSERVED:
        os._exit(markers.EXIT_PROTOCOL)
    control.detach()
    os.close(fds.CONTROL_FD)
    return payload


def make_guest_payload(serialized: bytes, plan: SandboxPlan) -> Callable[[], Callable[[], int]]:
    """The real payload: wasmtime, prepared before the filter, run after it."""

    # Prepared here, in the parent before the fork: nothing of the guest runs yet.
    prepared = guest.prepare(serialized, plan.memory_bytes, plan.lifecycle, fds.BROKER_FD)

    def factory() -> Callable[[], int]:
        prepared.channel.bind()
        return prepared

    return factory
