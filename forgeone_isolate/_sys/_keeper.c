/*
 * The keeper: the first child of a launch, in C.
 *
 * fork_keeper() forks the keeper, which leaves the host's namespaces, waits for the parent
 * to write its uid/gid maps, makes PID 1 of the new PID namespace as the parent's child
 * (CLONE_PARENT: the parent reaps it), reports its pid and exits. PID 1 returns from
 * fork_keeper() with 0 and goes on in Python
 * (child._plugin_main); the parent gets the keeper's pid. The keeper itself never returns to
 * Python: it runs these few system calls and nothing else.
 *
 * Why C: a keeper written in Python executes interpreter code that writes to ~240 pages
 * inherited from the parent (reference counts, frames, the allocator), each write a
 * copy-on-write fault (~3.5 us on these machines), and the private copies stay for the
 * plugin's whole life (1.6 MiB per plugin). This keeper touches a few pages of stack.
 *
 * PID 1 is a clone of the keeper that shares its memory (CLONE_VM, see keeper_tail): a
 * fork would copy the page tables of the interpreter the keeper was forked with (~1 ms),
 * and the keeper would then hold the pages both later write. So the keeper, once PID 1
 * exists, writes nothing PID 1 reads (raw system calls on a stack of its own), and is
 * confined at least as tightly as PID 1 (no capability, no_new_privs, its own filter).
 *
 * The setup channel's messages are the ones markers.py documents, written here as the
 * same JSON (json.dumps of {"m": MARKER, ...}): UNSHARED, STEP_FAILED {step, errno,
 * message}, PID1 {pid}; it accepts exactly {"m": "MAPPED"} in reply.
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
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <ucontext.h>
#if defined(__has_include)
#if __has_include(<sys/rseq.h>)
#include <sys/rseq.h> /* glibc >= 2.35: its rseq area (__rseq_offset, __rseq_size) */
#define FO_HAVE_RSEQ 1
#endif
#endif
#include <unistd.h>

#define EXIT_SETUP_FAILED 120
#define EXIT_PARENT_GONE 121
#define EXIT_PROTOCOL 122
#define MAX_STEPS 8

/* Step timings (ms) of the keeper, read by PID 1 (which shares its memory): keeper_steps(). */
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

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Close every descriptor but 0-2 and keep[0..n): the keeper, alive for the plugin's whole
 * life, and PID 1 hold nothing of the parent's (audit log, leases, sockets...). */
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

/* After PID 1 exists the keeper shares its memory (see keeper()), so from then on it makes
 * no call that writes anywhere PID 1 could read: no libc wrapper (errno is in the thread
 * block they share), no stdio, no steps[]. These are the system calls it makes then, raw. */
#if defined(__x86_64__)
#define FO_AUDIT_ARCH 0xc000003eU /* AUDIT_ARCH_X86_64 */
/* nr(a, b, c, d), the fifth and sixth arguments 0 (prctl checks its unused ones) */
static long raw4(long nr, long a, long b, long c, long d) {
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = 0;
    register long r9 __asm__("r9") = 0;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
#define FO_AUDIT_ARCH 0xc00000b7U /* AUDIT_ARCH_AARCH64 */
static long raw4(long nr, long a, long b, long c, long d) {
    register long x8 __asm__("x8") = nr;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = 0;
    register long x5 __asm__("x5") = 0;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory");
    return x0;
}
#else
#error "the keeper is written for x86_64 and aarch64 (its raw system calls and its filter)"
#endif

static void raw_say(int fd, const char *text, size_t n) {
    while (raw4(SYS_write, fd, (long)text, (long)n, 0) == -EINTR) {
    }
}

static void say(int fd, const char *text) { raw_say(fd, text, strlen(text)); }

/* The step and the errno only: the parent words the message (os.strerror), so nothing
 * here depends on the locale or takes gettext's locks after the fork. */
static void fail(int fd, const char *step, int err) {
    char buf[128];
    snprintf(buf, sizeof buf, "{\"m\": \"STEP_FAILED\", \"step\": \"%s\", \"errno\": %d}", step, err);
    say(fd, buf);
    _exit(EXIT_SETUP_FAILED);
}

/* A JSON marker with one integer field, formatted on the keeper's own stack. */
static void raw_say_int(int fd, const char *head, long value) {
    char buf[128];
    size_t n = 0;
    while (head[n] != '\0' && n < sizeof buf - 32) { /* (heads are ours: short) */
        buf[n] = head[n];
        n++;
    }
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
    raw_say(fd, buf, n);
}

/* The keeper's own seccomp filter, loaded once PID 1 exists: it may write to its setup
 * channel and exit; anything else kills it. It shares PID 1's memory, so
 * a plugin that got code execution there could steer the keeper: this leaves it less than
 * PID 1's own filter allows, and no capability (see keeper_tail). */
#define FO_BPF_LD_W_ABS 0x20
#define FO_BPF_JEQ_K 0x15
#define FO_BPF_RET_K 0x06
#define FO_SECCOMP_RET_KILL_PROCESS 0x80000000U
#define FO_SECCOMP_RET_ALLOW 0x7fff0000U
struct fo_sock_filter {
    uint16_t code;
    uint8_t jt, jf;
    uint32_t k;
};
struct fo_sock_fprog {
    unsigned short len;
    struct fo_sock_filter *filter;
};
#define FO_KEEPER_FILTER_LEN 13
static void keeper_filter_for(struct fo_sock_filter *f, int ctl) {
    /* (a jump's jt/jf count the instructions it skips) */
    struct fo_sock_filter prog[FO_KEEPER_FILTER_LEN] = {
        /* 0 */ {FO_BPF_LD_W_ABS, 0, 0, 4}, /* seccomp_data.arch */
        /* 1 */ {FO_BPF_JEQ_K, 1, 0, FO_AUDIT_ARCH},
        /* 2 */ {FO_BPF_RET_K, 0, 0, FO_SECCOMP_RET_KILL_PROCESS},
        /* 3 */ {FO_BPF_LD_W_ABS, 0, 0, 0}, /* seccomp_data.nr (an x32 number never matches) */
        /* 4 */ {FO_BPF_JEQ_K, 2, 0, SYS_write},      /* -> 7 */
        /* 5 */ {FO_BPF_JEQ_K, 5, 0, SYS_exit_group}, /* -> 11 */
        /* 6 */ {FO_BPF_RET_K, 0, 0, FO_SECCOMP_RET_KILL_PROCESS},
        /* 7 */ {FO_BPF_LD_W_ABS, 0, 0, 16}, /* write: args[0], its low half (little-endian) */
        /* 8 */ {FO_BPF_JEQ_K, 0, 3, (uint32_t)ctl},  /* -> 9, else 12 */
        /* 9 */ {FO_BPF_LD_W_ABS, 0, 0, 20},          /* and its high half: all 64 bits */
        /* 10 */ {FO_BPF_JEQ_K, 0, 1, 0},             /* -> 11, else 12 */
        /* 11 */ {FO_BPF_RET_K, 0, 0, FO_SECCOMP_RET_ALLOW},
        /* 12 */ {FO_BPF_RET_K, 0, 0, FO_SECCOMP_RET_KILL_PROCESS},
    };
    memcpy(f, prog, sizeof prog);
}

#define FO_CAPABILITY_VERSION_3 0x20080522
struct fo_cap_header {
    uint32_t version;
    int pid;
};
struct fo_cap_data {
    uint32_t effective, permitted, inheritable;
};

/* PID 1 is a clone of the keeper that shares its memory (CLONE_VM): no copy of the
 * interpreter's page tables for it, and nothing for the keeper to give back afterwards.
 * PID 1 resumes in keeper() on the stack the keeper was forked with (pid1_ctx); the
 * keeper goes on, on a stack of its own (keeper_stack), in keeper_tail. */
static ucontext_t pid1_ctx, keeper_ctx;
static char keeper_stack[64 * 1024] __attribute__((aligned(16)));
static char pid1_boot_stack[16 * 1024] __attribute__((aligned(16)));
static struct {
    int ctl, brk, n_extra;
    int extra[4];
} tail;

/* glibc registers every thread's rseq area (restartable sequences) with the kernel; it
 * lies in the thread block the keeper and PID 1 share. On the way back to user mode the
 * kernel reads it for the task that registered it, so a plugin with code execution in
 * PID 1 could redirect the keeper through it. The registration moves to PID 1: the keeper
 * drops it before the clone (a clone sharing memory starts without one), PID 1 takes it. */
static long rseq_len;
static void rseq_drop(void) {
#ifdef FO_HAVE_RSEQ
    if (__rseq_size == 0)
        return; /* glibc did not register (or was told not to) */
    long area = (long)((char *)__builtin_thread_pointer() + __rseq_offset);
    long lens[2] = {(long)__rseq_size, 32}; /* (what glibc registered: its area's size) */
    for (int i = 0; i < 2; i++) {
        if (raw4(SYS_rseq, area, lens[i], 1 /* RSEQ_FLAG_UNREGISTER */, RSEQ_SIG) == 0) {
            rseq_len = lens[i];
            return;
        }
    }
#endif
}

static void rseq_take(void) {
#ifdef FO_HAVE_RSEQ
    if (rseq_len != 0) /* (if this fails, glibc's idea of the CPU goes stale: nothing else) */
        raw4(SYS_rseq, (long)((char *)__builtin_thread_pointer() + __rseq_offset), rseq_len, 0,
             RSEQ_SIG);
#endif
}

static int pid1_boot(void *unused) {
    raw4(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0); /* at once: dies with its parent */
    rseq_take();
    setcontext(&pid1_ctx); /* returns only if it failed */
    return EXIT_SETUP_FAILED;
}

/* The keeper could not confine itself: PID 1 goes with it, the parent hears why. */
static void confine_failed(int ctl, long pid1, long err) {
    raw4(SYS_kill, pid1, SIGKILL, 0, 0);
    raw_say_int(ctl, "{\"m\": \"STEP_FAILED\", \"step\": \"keeper-confine\", \"errno\": ", -err);
    raw4(SYS_exit_group, EXIT_SETUP_FAILED, 0, 0, 0);
    __builtin_unreachable();
}

static void keeper_tail(void) {
    int ctl = tail.ctl;
    struct fo_sock_filter filter[FO_KEEPER_FILTER_LEN];
    keeper_filter_for(filter, ctl);
    struct fo_sock_fprog prog = {FO_KEEPER_FILTER_LEN, filter};
    struct fo_cap_header head = {FO_CAPABILITY_VERSION_3, 0};
    struct fo_cap_data none[2];
    memset(none, 0, sizeof none);
    rseq_drop();
    /* CLONE_PARENT: PID 1 is the supervisor's child, not ours; the supervisor reaps it and
     * has its wait status from the kernel, not through this process, whose memory PID 1
     * shares (a plugin that took PID 1 over could rewrite what the keeper would say). */
    long pid1 = clone(pid1_boot, pid1_boot_stack + sizeof pid1_boot_stack,
                      CLONE_VM | CLONE_PARENT | SIGCHLD, NULL);
    if (pid1 < 0)
        fail(ctl, "fork-pid1", errno); /* (PID 1 does not exist: nobody shares errno yet) */
    /* Confined before the PID1 marker, so before PID 1 is PLACED and long before any plugin
     * byte runs: the bounding set first (that takes CAP_SETPCAP), to the first number the
     * kernel does not know; then every capability set, no_new_privs, the descriptors that
     * are not the keeper's to keep, and the filter. */
    long r;
    for (long cap = 0; cap < 64; cap++) {
        r = raw4(SYS_prctl, PR_CAPBSET_DROP, cap, 0, 0);
        if (r == -EINVAL)
            break;
        if (r != 0)
            confine_failed(ctl, pid1, r);
    }
    if ((r = raw4(SYS_capset, (long)&head, (long)none, 0, 0)) != 0 ||
        (r = raw4(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0)) != 0)
        confine_failed(ctl, pid1, r);
    raw4(SYS_close, tail.brk, 0, 0, 0); /* only PID 1 holds the broker end: EOF there = gone */
    for (int i = 0; i < tail.n_extra; i++)
        raw4(SYS_close, tail.extra[i], 0, 0, 0);
    if ((r = raw4(SYS_prctl, PR_SET_SECCOMP, 2 /* SECCOMP_MODE_FILTER */, (long)&prog, 0)) != 0)
        confine_failed(ctl, pid1, r);
    raw_say_int(ctl, "{\"m\": \"PID1\", \"pid\": ", pid1);
    /* Done: PID 1 is the supervisor's to watch. Gone at once, so that nothing of ours runs
     * in the memory PID 1 shares once plugin code may (after FILTERED, long after this). */
    raw4(SYS_exit_group, 0, 0, 0, 0);
    __builtin_unreachable();
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

    /* No signal reaches the keeper's inherited handlers from here on (they are the
     * parent's, and would run in memory PID 1 shares); the supervisor ends it with
     * SIGKILL, pdeathsig too. PID 1 gets its signal mask back from pid1_ctx. */
    t = now_ms();
    tail.ctl = ctl;
    tail.brk = brk;
    tail.n_extra = n_extra;
    for (int i = 0; i < n_extra; i++)
        tail.extra[i] = extra[i];
    volatile int resumed = 0; /* in memory: PID 1 reads what the keeper wrote below */
    if (getcontext(&pid1_ctx) != 0)
        fail(ctl, "fork-pid1", errno);
    if (resumed) { /* PID 1, back on this stack */
        record("keeper-fork-pid1", t);
        return 0;
    }
    resumed = 1;
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    if (getcontext(&keeper_ctx) != 0)
        fail(ctl, "fork-pid1", errno);
    keeper_ctx.uc_stack.ss_sp = keeper_stack;
    keeper_ctx.uc_stack.ss_size = sizeof keeper_stack;
    keeper_ctx.uc_link = NULL;
    makecontext(&keeper_ctx, keeper_tail, 0);
    setcontext(&keeper_ctx); /* never returns but on failure */
    fail(ctl, "fork-pid1", errno);
    return -1;
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

static PyObject *keeper_filter(PyObject *self, PyObject *args) {
    int ctl;
    if (!PyArg_ParseTuple(args, "i", &ctl))
        return NULL;
    struct fo_sock_filter f[FO_KEEPER_FILTER_LEN];
    keeper_filter_for(f, ctl);
    return PyBytes_FromStringAndSize((const char *)f, sizeof f);
}

static PyMethodDef methods[] = {
    {"fork_keeper", fork_keeper, METH_VARARGS,
     "fork_keeper(ctl_fd, broker_fd, parent_pid, ns_flags, for_pid1, python_fork,"
     " cgroup_fd) -> (pid, placed)\n\nFork the keeper (see the module source), which keeps only"
     " fds 0-2, the two channels and for_pid1 (closed once PID 1 is forked). The parent gets"
     " the keeper's pid; PID 1 of the new PID namespace gets 0. placed: the keeper was born in"
     " the cgroup v2 directory cgroup_fd (-1: none). Raises OSError if the first fork fails."},
    {"keeper_filter", keeper_filter, METH_VARARGS,
     "keeper_filter(ctl_fd) -> bytes: the BPF program (struct sock_filter[]) the keeper loads"
     " on itself once PID 1 exists (for the tests, which load it in a child of their own)."},
    {"keeper_steps", keeper_steps, METH_NOARGS,
     "keeper_steps() -> {step: ms}: in PID 1, what the keeper's steps took."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_keeper", "The keeper process of a launch, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__keeper(void) { return PyModule_Create(&module); }
