/*
 * The keeper: the first child of a launch, in C.
 *
 * fork_keeper() forks the keeper, which leaves the host's namespaces, waits for the parent
 * to write its uid/gid maps, forks PID 1 of the new PID namespace, then waits for it and
 * reports its wait status. PID 1 returns from fork_keeper() with 0 and goes on in Python
 * (child.pid1_main); the parent gets the keeper's pid. The keeper itself never returns to
 * Python: it runs these few system calls and nothing else.
 *
 * Why C: a keeper written in Python executes interpreter code that writes to ~240 pages
 * inherited from the parent (reference counts, frames, the allocator), each write a
 * copy-on-write fault (~3.5 us on these machines), and the private copies stay for the
 * plugin's whole life (1.6 MiB per plugin). This keeper touches a few pages of stack.
 *
 * The setup channel's messages are the ones markers.py documents, written here as the
 * same JSON (json.dumps of {"m": MARKER, ...}): UNSHARED, STEP_FAILED {step, errno,
 * message}, PID1 {pid}, EXITED {status}; it accepts exactly {"m": "MAPPED"} in reply.
 * Exit statuses are markers.EXIT_*.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_SETUP_FAILED 120
#define EXIT_PARENT_GONE 121
#define EXIT_PROTOCOL 122
#define MAX_STEPS 8

/* Step timings (ms) of the keeper, copied into PID 1 by its fork: keeper_steps(). */
static struct {
    const char *name;
    double ms;
} steps[MAX_STEPS];
static int n_steps;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static void record(const char *name, double started) {
    if (n_steps < MAX_STEPS) {
        steps[n_steps].name = name;
        steps[n_steps].ms = now_ms() - started;
        n_steps++;
    }
}

static void say(int fd, const char *text) {
    ssize_t r;
    do {
        r = write(fd, text, strlen(text));
    } while (r < 0 && errno == EINTR);
}

/* The step and the errno only: the parent words the message (os.strerror), so nothing
 * here depends on the locale or takes gettext's locks after the fork. */
static void fail(int fd, const char *step, int err) {
    char buf[128];
    snprintf(buf, sizeof buf, "{\"m\": \"STEP_FAILED\", \"step\": \"%s\", \"errno\": %d}", step, err);
    say(fd, buf);
    _exit(EXIT_SETUP_FAILED);
}

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Close every descriptor but 0-2 and keep[0..n): the keeper, unconfined for the plugin's
 * whole life, and PID 1 hold nothing of the parent's (audit log, leases, sockets...). */
static void close_all_but(int *keep, int n) {
    qsort(keep, n, sizeof *keep, cmp_int);
    unsigned int from = 3;
    for (int i = 0; i <= n; i++) {
        unsigned int to = i < n ? (unsigned int)keep[i] : ~0U;
        if (i < n && keep[i] < 3)
            continue;
        if (to > from) {
            unsigned int last = i < n ? to - 1 : ~0U;
#ifdef SYS_close_range
            if (syscall(SYS_close_range, from, last, 0) != 0)
#endif
            {
                unsigned int cap = last == ~0U ? 65536 : last; /* no close_range (< 5.9) */
                for (unsigned int fd = from; fd <= cap; fd++)
                    close((int)fd);
            }
        }
        if (i < n)
            from = (unsigned int)keep[i] + 1;
    }
}

static void die_with_parent(pid_t parent) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        _exit(EXIT_PARENT_GONE);
    if (getppid() != parent) /* the parent died before the line above: nobody to serve */
        _exit(EXIT_PARENT_GONE);
}

/* clone3(2)'s arguments (<linux/sched.h>, declared here: that header clashes with <sched.h>) */
struct fo_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};
#define FO_CLONE_INTO_CGROUP 0x200000000ULL

/* fork(2), or with a cgroup v2 directory fd clone3(CLONE_INTO_CGROUP): the child is born in
 * the plugin's cgroup, with no attach (which takes the kernel's global threadgroup lock
 * for writing). *placed says which happened: a kernel without clone3 or CLONE_INTO_CGROUP
 * (before 5.7) gets the plain fork, and the parent attaches the keeper as usual. Only for
 * a caller the kernel counts one thread in: the raw clone skips glibc's fork bookkeeping
 * (its locks, which another thread could hold), so fork_children passes -1 otherwise. */
static pid_t fork_into(int cgroup_fd, int *placed) {
    *placed = 0;
#ifdef SYS_clone3
    if (cgroup_fd >= 0) {
        struct fo_clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = FO_CLONE_INTO_CGROUP;
        args.exit_signal = SIGCHLD;
        args.cgroup = (uint64_t)cgroup_fd;
        long pid = syscall(SYS_clone3, &args, sizeof args);
        if (pid >= 0) {
            *placed = 1;
            return (pid_t)pid;
        }
        if (errno != ENOSYS && errno != EINVAL && errno != E2BIG)
            return -1;
    }
#endif
    return fork();
}

/* What the keeper gives back once PID 1 is forked. Until then it is a copy of the parent
 * (a CPython process); afterwards it only waits, and every page of the interpreter that
 * the parent and PID 1 have both written since would stay in it as its own copy (1.3-1.5
 * MiB per plugin). So while the parent maps its ids (its /proc is still the host's), it lists the
 * writable private mappings it will not need: all but its stack, its thread block (TLS,
 * errno, the stack guard) and the mappings of libc, the dynamic loader and this module
 * (which is linked with -z now: no lazy binding, which would need the loader's heap). */
#define MAX_DROPS 4096
static struct {
    uintptr_t lo, hi;
} drops[MAX_DROPS];
static int n_drops;

static int keep_mapping(uintptr_t lo, uintptr_t hi, const char *perms, const char *path,
                        int follows_kept_lib) {
    uintptr_t tp = (uintptr_t)__builtin_thread_pointer();
    char here;
    uintptr_t sp = (uintptr_t)&here;
    if (perms[1] != 'w' || perms[3] != 'p')
        return 1; /* read-only or shared: nothing of ours */
    if ((tp >= lo && tp < hi) || (sp >= lo && sp < hi))
        return 1;
    if (path[0] == '[') /* [stack], [vdso], [vvar], [vsyscall] stay; [heap] goes */
        return strcmp(path, "[heap]") != 0;
    if (strstr(path, "/libc.so") || strstr(path, "/ld-linux") || strstr(path, "_keeper"))
        return 1;
    return path[0] == '\0' && follows_kept_lib; /* a library's .bss beyond its file */
}

static void plan_drops(void) {
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return; /* nothing given back: only memory is lost */
    char buf[16384];
    size_t have = 0;
    uintptr_t prev_hi = 0;
    int prev_kept_lib = 0, prev_dropped = 0;
    for (;;) {
        ssize_t got = read(fd, buf + have, sizeof buf - 1 - have);
        if (got <= 0)
            break;
        have += (size_t)got;
        buf[have] = '\0';
        char *line = buf, *nl;
        while ((nl = memchr(line, '\n', have - (size_t)(line - buf))) != NULL) {
            *nl = '\0';
            unsigned long lo, hi;
            char perms[8] = "", path[512] = "";
            if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %511[^\n]", &lo, &hi, perms, path) >= 3) {
                char *pth = path;
                while (*pth == ' ')
                    pth++;
                int kept = keep_mapping(lo, hi, perms, pth, lo == prev_hi && prev_kept_lib);
                int lib = pth[0] == '/' && kept;
                if (!kept && prev_dropped && n_drops > 0) {
                    drops[n_drops - 1].hi = hi; /* one munmap over both (and the gap) */
                } else if (!kept && n_drops < MAX_DROPS) {
                    drops[n_drops].lo = lo;
                    drops[n_drops].hi = hi;
                    n_drops++;
                }
                prev_dropped = !kept;
                prev_hi = hi;
                prev_kept_lib = lib || (pth[0] == '\0' && kept && prev_kept_lib);
            }
            line = nl + 1;
        }
        have -= (size_t)(line - buf);
        memmove(buf, line, have);
    }
    close(fd);
}

static void give_back(void) {
    for (int i = 0; i < n_drops; i++)
        munmap((void *)drops[i].lo, drops[i].hi - drops[i].lo);
}

/* A JSON marker with one integer field, without stdio (its locale state may be gone). */
static void say_int(int fd, const char *head, long value) {
    char buf[96];
    size_t n = strlen(head);
    memcpy(buf, head, n);
    char digits[24];
    int d = 0;
    unsigned long v = value < 0 ? (unsigned long)(-value) : (unsigned long)value;
    do {
        digits[d++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (value < 0)
        buf[n++] = '-';
    while (d)
        buf[n++] = digits[--d];
    buf[n++] = '}';
    buf[n] = '\0';
    say(fd, buf);
}

/* The keeper's whole life. Returns only in PID 1 (with 0). */
static int keeper(int ctl, int brk, pid_t parent, int flags, const int *extra, int n_extra) {
    double t = now_ms();
    die_with_parent(parent);
    record("keeper-pdeathsig", t);

    /* The credential calls are raw system calls: glibc's wrappers would broadcast them to
     * every thread it believes the process has (its list, copied from a parent that may
     * once have had threads, names tasks that are not ours: a wait that never ends). The
     * keeper has one thread, which is exactly what the system calls change. */
    t = now_ms();
    if (syscall(SYS_setgroups, 0, NULL) != 0) /* before unshare: refused in the new namespace */
        fail(ctl, "setgroups", errno);
    record("keeper-setgroups", t);

    t = now_ms();
    if (unshare(flags) != 0)
        fail(ctl, "unshare", errno);
    record("keeper-unshare", t);
    say(ctl, "{\"m\": \"UNSHARED\"}");
    plan_drops(); /* while the parent writes our maps (our /proc is still the host's) */

    char reply[64];
    ssize_t n;
    do {
        n = read(ctl, reply, sizeof reply - 1);
    } while (n < 0 && errno == EINTR);
    static const char mapped[] = "{\"m\": \"MAPPED\"}";
    if (n != (ssize_t)(sizeof mapped - 1) || memcmp(reply, mapped, sizeof mapped - 1) != 0)
        _exit(EXIT_PROTOCOL);

    t = now_ms();
    if (syscall(SYS_setresgid, 0, 0, 0) != 0)
        fail(ctl, "setresgid", errno);
    if (syscall(SYS_setresuid, 0, 0, 0) != 0)
        fail(ctl, "setresuid", errno);
    die_with_parent(parent); /* a credential change cleared it */
    record("keeper-setresuid", t);

    t = now_ms();
    pid_t pid1 = fork();
    if (pid1 < 0)
        fail(ctl, "fork-pid1", errno);
    if (pid1 == 0) {
        record("keeper-fork-pid1", t);
        return 0;
    }
    close(brk); /* only PID 1 holds the broker end: EOF there means it is gone */
    for (int i = 0; i < n_extra; i++)
        close(extra[i]);
    /* No signal reaches the keeper's inherited handlers any more (they are the parent's,
     * in memory given back next); the supervisor ends it with SIGKILL, pdeathsig too. */
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    give_back();
    say_int(ctl, "{\"m\": \"PID1\", \"pid\": ", pid1);
    int status = 0;
    while (waitpid(pid1, &status, 0) < 0) {
        if (errno != EINTR)
            syscall(SYS_exit_group, EXIT_PROTOCOL);
    }
    say_int(ctl, "{\"m\": \"EXITED\", \"status\": ", status);
    syscall(SYS_exit_group, 0);
    _exit(0);
}

static PyObject *fork_keeper(PyObject *self, PyObject *args) {
    int ctl, brk, parent, flags, python_fork, cgroup_fd;
    PyObject *for_pid1;
    if (!PyArg_ParseTuple(args, "iiiiOpi", &ctl, &brk, &parent, &flags, &for_pid1, &python_fork,
                          &cgroup_fd))
        return NULL;
    if (!PyTuple_Check(for_pid1) || PyTuple_GET_SIZE(for_pid1) > 4) {
        PyErr_SetString(PyExc_TypeError, "for_pid1: a tuple of at most 4 fds");
        return NULL;
    }
    int extra[4], keep[6];
    int n_extra = (int)PyTuple_GET_SIZE(for_pid1);
    for (int i = 0; i < n_extra; i++) {
        extra[i] = (int)PyLong_AsLong(PyTuple_GET_ITEM(for_pid1, i));
        if (extra[i] < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "for_pid1: descriptors are >= 0");
            return NULL;
        }
        keep[2 + i] = extra[i];
    }
    keep[0] = ctl;
    keep[1] = brk;
    /* With other threads alive, the interpreter's own fork protocol (locks taken before,
     * re-made in PID 1); alone, none of it: no lock can be held by a thread that is not
     * there, and the GIL, held across fork(), stays with the one thread PID 1 has. */
    if (python_fork)
        PyOS_BeforeFork();
    int placed = 0;
    pid_t pid = python_fork ? fork() : fork_into(cgroup_fd, &placed);
    if (pid == 0) {
        close_all_but(keep, 2 + n_extra); /* the cgroup fd, the parent's ends: all gone */
        n_steps = 0;
        keeper(ctl, brk, (pid_t)parent, flags, extra, n_extra); /* returns in PID 1 only */
        if (python_fork)
            PyOS_AfterFork_Child();
        return Py_BuildValue("(iO)", 0, placed ? Py_True : Py_False);
    }
    int err = errno;
    if (python_fork)
        PyOS_AfterFork_Parent();
    if (pid < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(iO)", (int)pid, placed ? Py_True : Py_False);
}

static PyObject *keeper_steps(PyObject *self, PyObject *unused) {
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (int i = 0; i < n_steps; i++) {
        PyObject *v = PyFloat_FromDouble(steps[i].ms);
        if (v == NULL || PyDict_SetItemString(d, steps[i].name, v) != 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyMethodDef methods[] = {
    {"fork_keeper", fork_keeper, METH_VARARGS,
     "fork_keeper(ctl_fd, broker_fd, parent_pid, ns_flags, for_pid1, python_fork,"
     " cgroup_fd) -> (pid, placed)\n\nFork the keeper (see the module source), which keeps only"
     " fds 0-2, the two channels and for_pid1 (closed once PID 1 is forked). The parent gets"
     " the keeper's pid; PID 1 of the new PID namespace gets 0. placed: the keeper was born in"
     " the cgroup v2 directory cgroup_fd (-1: none). Raises OSError if the first fork fails."},
    {"keeper_steps", keeper_steps, METH_NOARGS,
     "keeper_steps() -> {step: ms}: in PID 1, what the keeper's steps took."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_keeper", "The keeper process of a launch, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__keeper(void) { return PyModule_Create(&module); }
