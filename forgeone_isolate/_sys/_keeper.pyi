"""Types of the C extension in _keeper.c (the keeper process of a launch)."""

def fork_keeper(
    ctl_fd: int,
    broker_fd: int,
    parent_pid: int,
    ns_flags: int,
    for_pid1: tuple[int, ...],
    python_fork: bool,
    cgroup_fd: int,
    /,
) -> tuple[int, bool]: ...
def keeper_steps() -> dict[str, float]: ...
def keeper_filter(ctl_fd: int, /) -> bytes: ...
