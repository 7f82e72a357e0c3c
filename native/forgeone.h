/*
 * forgeone.h - the guest side of forgeone-isolate ABI v1, for C plugins built with
 * clang --target=wasm32-wasi -nostartfiles -Wl,--no-entry.
 *
 * Every function below is imported from wasm module "forgeone"; the host answers each
 * call through the broker, which checks it against the plugin's permissions and audits it.
 * Pointers and lengths are offsets into the plugin's exported `memory`.
 * Results: >= 0 success (a count, a handle), < 0 a negated Linux errno (FORGEONE_E*).
 *
 * A plugin exports `memory` (clang does this by default), optional lifecycle functions
 * init/start/stop/pause/resume/unload, each int32_t(void) (non-zero = failure), and for
 * request/response plugins alloc(int32_t len) -> ptr and handle(ptr, len) -> int32_t.
 *
 * Use no libc I/O (printf, fopen, ...): those pull in wasi_snapshot_preview1 imports,
 * which the packer rejects. Freestanding parts of libc (string.h) are fine.
 */
#ifndef FORGEONE_H
#define FORGEONE_H

#include <stdint.h>

#define FORGEONE_ABI_VERSION 1

/* Export a function under `name`: FORGEONE_EXPORT("start") int32_t start(void) {...} */
#define FORGEONE_EXPORT(name) __attribute__((export_name(name)))

#define FORGEONE_IMPORT(name) __attribute__((import_module("forgeone"), import_name(name)))

/* Error results (negated Linux errno values). */
#define FORGEONE_EPERM   (-1)  /* denied by policy */
#define FORGEONE_ENOENT  (-2)  /* no such file, key or config value */
#define FORGEONE_EIO     (-5)  /* I/O error on the host side */
#define FORGEONE_E2BIG   (-7)  /* value larger than the buffer or a host limit */
#define FORGEONE_EBADF   (-9)  /* not an open handle */
#define FORGEONE_EFAULT  (-14) /* pointer or length outside memory */
#define FORGEONE_EINVAL  (-22) /* bad argument */
#define FORGEONE_ENOSYS  (-38) /* unknown call */

/* Log levels for forgeone_log. */
#define FORGEONE_LOG_DEBUG 0
#define FORGEONE_LOG_INFO  1
#define FORGEONE_LOG_NOTICE 2
#define FORGEONE_LOG_WARN  3
#define FORGEONE_LOG_ERROR 4

/* log: write one log line of `len` bytes at `ptr` at `level` (FORGEONE_LOG_*). -> 0 or error. */
FORGEONE_IMPORT("log")
int32_t forgeone_log(int32_t level, const void *ptr, int32_t len);

/* clock_now: wall clock, nanoseconds since the Unix epoch. */
FORGEONE_IMPORT("clock_now")
int64_t forgeone_clock_now(void);

/* random_fill: fill `len` bytes at `ptr` with cryptographic random bytes. -> count or error. */
FORGEONE_IMPORT("random_fill")
int32_t forgeone_random_fill(void *ptr, int32_t len);

/* config_get: copy the operator's config value for key (kptr, klen) into (buf, buflen).
 * -> the value's length, or error (FORGEONE_EPERM if the key is not granted). */
FORGEONE_IMPORT("config_get")
int32_t forgeone_config_get(const void *kptr, int32_t klen, void *buf, int32_t buflen);

/* kv_get: read key (kptr, klen) from the plugin's own persistent store into (buf, buflen).
 * -> the value's length, or error (FORGEONE_ENOENT if absent, FORGEONE_EPERM without kv). */
FORGEONE_IMPORT("kv_get")
int32_t forgeone_kv_get(const void *kptr, int32_t klen, void *buf, int32_t buflen);

/* kv_set: store value (vptr, vlen) under key (kptr, klen). -> 0 or error. */
FORGEONE_IMPORT("kv_set")
int32_t forgeone_kv_set(const void *kptr, int32_t klen, const void *vptr, int32_t vlen);

/* fs_open flags. */
#define FORGEONE_O_READ   0
#define FORGEONE_O_WRITE  1
#define FORGEONE_O_CREATE 2 /* create + write */

/* fs_open: open the host path (pptr, plen) allowed by fs.read / fs.write.
 * -> a handle for fd_read / fd_write / fd_close, or error. */
FORGEONE_IMPORT("fs_open")
int32_t forgeone_fs_open(const void *pptr, int32_t plen, int32_t flags);

/* net_connect: TCP connection to host (hptr, hlen) and port allowed by net.connect.
 * -> a handle, or error. */
FORGEONE_IMPORT("net_connect")
int32_t forgeone_net_connect(const void *hptr, int32_t hlen, int32_t port);

/* fd_read: read up to `buflen` bytes from handle `h` into `buf`. -> count (0 = end) or error. */
FORGEONE_IMPORT("fd_read")
int32_t forgeone_fd_read(int32_t h, void *buf, int32_t buflen);

/* fd_write: write `len` bytes at `ptr` to handle `h`. -> count or error. */
FORGEONE_IMPORT("fd_write")
int32_t forgeone_fd_write(int32_t h, const void *ptr, int32_t len);

/* fd_close: close handle `h`. -> 0 or error. */
FORGEONE_IMPORT("fd_close")
int32_t forgeone_fd_close(int32_t h);

/* output: set (ptr, len) as the result of the current `handle` call. -> 0 or error. */
FORGEONE_IMPORT("output")
int32_t forgeone_output(const void *ptr, int32_t len);

/* ---- small helpers (no libc needed) ---- */

static inline int32_t forgeone_strlen(const char *s) {
    int32_t n = 0;
    while (s[n]) n++;
    return n;
}

/* Log a NUL-terminated string. */
static inline int32_t forgeone_log_str(int32_t level, const char *s) {
    return forgeone_log(level, s, forgeone_strlen(s));
}

/* Write `v` in decimal into `buf` (at least 20 bytes for an int64_t, 21 if negative).
 * -> the number of bytes written, no NUL. */
static inline int32_t forgeone_fmt_i64(char *buf, int64_t v) {
    char tmp[21];
    int32_t n = 0, len = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) buf[len++] = '-';
    while (n) buf[len++] = tmp[--n];
    return len;
}

#undef FORGEONE_IMPORT
#endif /* FORGEONE_H */
