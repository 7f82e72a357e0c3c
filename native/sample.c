/*
 * sample.c - the C sample plugin for forgeone-isolate (ABI v1).
 *
 * Lifecycle: init returns 0; start logs a greeting and the host clock; stop logs.
 * Request/response: alloc(len) hands out guest memory for the input, handle(ptr, len)
 * echoes it back uppercased through `output`.
 * Imports only from module "forgeone": no libc I/O, so no WASI imports.
 */
#include "forgeone.h"

FORGEONE_EXPORT("init")
int32_t init(void) {
    return 0;
}

FORGEONE_EXPORT("start")
int32_t start(void) {
    static const char prefix[] = "hello from the C sample plugin, clock_now=";
    char line[sizeof prefix + 24];
    int32_t n = 0;
    for (const char *p = prefix; *p; p++) line[n++] = *p;
    n += forgeone_fmt_i64(line + n, forgeone_clock_now());
    return forgeone_log(FORGEONE_LOG_INFO, line, n) < 0 ? 1 : 0;
}

FORGEONE_EXPORT("stop")
int32_t stop(void) {
    forgeone_log_str(FORGEONE_LOG_INFO, "C sample plugin stopping");
    return 0;
}

/* A bump allocator above the linker's __heap_base, growing memory as needed.
 * It is reset after every handle call: each request gets fresh space. */
extern unsigned char __heap_base;
static uintptr_t heap_top;

#define PAGE 65536u

FORGEONE_EXPORT("alloc")
int32_t alloc(int32_t len) {
    if (len < 0) return 0;
    if (!heap_top) heap_top = (uintptr_t)&__heap_base;
    uintptr_t ptr = (heap_top + 7u) & ~(uintptr_t)7u;
    uintptr_t end = ptr + (uint32_t)len;
    if (end < ptr) return 0;
    uintptr_t have = __builtin_wasm_memory_size(0) * PAGE;
    if (end > have) {
        uintptr_t pages = (end - have + PAGE - 1) / PAGE;
        if (__builtin_wasm_memory_grow(0, pages) == (uintptr_t)-1) return 0;
    }
    heap_top = end;
    return (int32_t)ptr;
}

FORGEONE_EXPORT("handle")
int32_t handle(int32_t ptr, int32_t len) {
    char *buf = (char *)(uintptr_t)ptr;
    for (int32_t i = 0; i < len; i++)
        if (buf[i] >= 'a' && buf[i] <= 'z') buf[i] = (char)(buf[i] - 'a' + 'A');
    int32_t rc = forgeone_output(buf, len);
    heap_top = 0; /* request done: its memory is free again */
    return rc < 0 ? 1 : 0;
}
