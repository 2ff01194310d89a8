/*
 * NPU memory as the test doubles emulate it: dma-bufs (memfd files) with a CPU view that is
 * NOT coherent with the "device" view, so a missing or misdirected cache sync gives wrong
 * numbers, and a log of every rule the caller broke.
 *
 * A buffer (one per memfd inode, shared by every handle that refers to it) has three copies:
 *   - the CPU view: the mmap'ed pages the caller reads and writes;
 *   - `shadow`: what the NPU sees;
 *   - `clean`: the CPU view as of the last sync. A byte where CPU != clean was written by the
 *     CPU since (it is "dirty" in the CPU cache).
 * Sync TO_DEVICE writes dirty bytes to the shadow; FROM_DEVICE replaces the CPU view by the
 * shadow (a violation if it discards dirty bytes); the NPU reads inputs from and writes
 * outputs to the shadow only (a violation if an input or output has dirty bytes then).
 *
 * Handles: memory the runtime allocates (the creator; it owns a memfd) and imports of an fd
 * (rknn_create_mem_from_fd). Every handle belongs to one context and must be destroyed once,
 * with that context, imports before the creator, and all before the context; using one after
 * its destroy, with another context, or two threads driving one context at once are
 * violations too. The including file holds `lock` while calling any fm_ function.
 */
#ifndef FAKE_MEM_H
#define FAKE_MEM_H
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct fm_buffer {
    dev_t dev;
    ino_t ino;
    size_t cap;
    unsigned char *shadow, *clean;
    int handles; /* live handles on it */
    struct fm_buffer *next;
} fm_buffer;

typedef struct fm_mem {
    void *handle; /* the struct given to the caller */
    uint64_t ctx;
    int creator;
    int destroyed;
    int fd;       /* the creator's own memfd, else -1 */
    unsigned char *map;
    size_t map_len;
    unsigned char *cpu; /* CPU address of this handle's first byte */
    size_t offset, size;
    fm_buffer *buf;
    struct fm_mem *next;
} fm_mem;

static fm_buffer *fm_buffers;
static fm_mem *fm_mems;
static char fm_log[16384];
static long fm_count;

static void fm_violation(const char *format, ...) {
    char line[512];
    va_list args;
    va_start(args, format);
    vsnprintf(line, sizeof(line), format, args);
    va_end(args);
    fm_count++;
    size_t used = strlen(fm_log);
    if (used + strlen(line) + 2 < sizeof(fm_log)) {
        strcat(fm_log, line);
        strcat(fm_log, "\n");
    }
}

static long fm_violations(char *out, long size) {
    if (out && size > 0) snprintf(out, (size_t)size, "%s", fm_log);
    return fm_count;
}

static void fm_reset(void) {
    fm_log[0] = 0;
    fm_count = 0;
}

static fm_buffer *fm_buffer_for(int fd, size_t need) {
    struct stat st;
    if (fstat(fd, &st) != 0) return NULL;
    fm_buffer *b;
    for (b = fm_buffers; b; b = b->next)
        if (b->dev == st.st_dev && b->ino == st.st_ino) break;
    if (!b) {
        b = calloc(1, sizeof(*b));
        b->dev = st.st_dev;
        b->ino = st.st_ino;
        b->next = fm_buffers;
        fm_buffers = b;
    }
    if (need > b->cap) {
        b->shadow = realloc(b->shadow, need);
        b->clean = realloc(b->clean, need);
        memset(b->shadow + b->cap, 0, need - b->cap);
        memset(b->clean + b->cap, 0, need - b->cap);
        b->cap = need;
    }
    b->handles++;
    return b;
}

static void fm_buffer_drop(fm_buffer *b) {
    if (--b->handles > 0) return;
    fm_buffer **link = &fm_buffers;
    while (*link != b) link = &(*link)->next;
    *link = b->next; /* an inode may be reused by a later memfd: forget this one */
    free(b->shadow);
    free(b->clean);
    free(b);
}

static fm_mem *fm_add(uint64_t ctx, void *handle, int creator, int fd, unsigned char *map,
                      size_t map_len, unsigned char *cpu, size_t offset, size_t size,
                      fm_buffer *buf) {
    fm_mem *m = calloc(1, sizeof(*m));
    m->handle = handle;
    m->ctx = ctx;
    m->creator = creator;
    m->fd = fd;
    m->map = map;
    m->map_len = map_len;
    m->cpu = cpu;
    m->offset = offset;
    m->size = size;
    m->buf = buf;
    m->next = fm_mems;
    fm_mems = m;
    return m;
}

/* A new runtime-owned buffer of `size` bytes: fd, CPU mapping, zeroed views. */
static fm_mem *fm_create(uint64_t ctx, void *handle, size_t size) {
    if (size == 0) return NULL;
    int fd = memfd_create("fake-npu-mem", MFD_CLOEXEC);
    if (fd < 0) return NULL;
    if (ftruncate(fd, (off_t)size) != 0) {
        close(fd);
        return NULL;
    }
    unsigned char *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        close(fd);
        return NULL;
    }
    fm_buffer *b = fm_buffer_for(fd, size);
    return fm_add(ctx, handle, 1, fd, map, size, map, 0, size, b);
}

/* An import of the caller's dma-buf `fd`: data at `offset`, CPU view at virt + offset (the
 * double maps the fd itself when virt is NULL). */
static fm_mem *fm_import(uint64_t ctx, void *handle, int fd, void *virt, size_t size,
                         long long offset) {
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        fm_violation("import of fd %d: not an open file descriptor", fd);
        return NULL;
    }
    if (offset < 0 || size == 0 || (long long)st.st_size < offset + (long long)size) {
        fm_violation("import of fd %d: offset %lld + size %zu outside its %lld bytes", fd, offset,
                     size, (long long)st.st_size);
        return NULL;
    }
    unsigned char *map = NULL, *cpu;
    size_t map_len = 0;
    if (virt) {
        cpu = (unsigned char *)virt + offset;
    } else {
        map_len = (size_t)offset + size;
        map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) return NULL;
        cpu = map + offset;
    }
    fm_buffer *b = fm_buffer_for(fd, (size_t)st.st_size);
    return fm_add(ctx, handle, 0, -1, map, map_len, cpu, (size_t)offset, size, b);
}

static fm_mem *fm_lookup(void *handle) {
    for (fm_mem *m = fm_mems; m; m = m->next)
        if (m->handle == handle) return m;
    return NULL;
}

/* The live handle `handle` of context `ctx`, or NULL after logging why not. */
static fm_mem *fm_use(uint64_t ctx, void *handle, const char *what) {
    fm_mem *m = handle ? fm_lookup(handle) : NULL;
    if (!m) {
        fm_violation("%s: unknown memory handle %p", what, handle);
        return NULL;
    }
    if (m->destroyed) {
        fm_violation("%s: memory used after it was destroyed", what);
        return NULL;
    }
    if (m->ctx != ctx) {
        fm_violation("%s: memory of context %#llx used with context %#llx", what,
                     (unsigned long long)m->ctx, (unsigned long long)ctx);
        return NULL;
    }
    return m;
}

static int fm_dirty(const fm_mem *m, size_t from, size_t count) {
    const unsigned char *clean = m->buf->clean + m->offset + from;
    return memcmp(m->cpu + from, clean, count) != 0;
}

enum { FM_TO_DEVICE = 1, FM_FROM_DEVICE = 2, FM_BOTH = 3 };

__attribute__((unused)) static int fm_sync(fm_mem *m, int mode) {
    unsigned char *shadow = m->buf->shadow + m->offset, *clean = m->buf->clean + m->offset;
    if (mode != FM_TO_DEVICE && mode != FM_FROM_DEVICE && mode != FM_BOTH) return -1;
    if (mode & FM_TO_DEVICE) {
        for (size_t i = 0; i < m->size; i++)
            if (m->cpu[i] != clean[i]) shadow[i] = clean[i] = m->cpu[i];
    }
    if (mode == FM_FROM_DEVICE && fm_dirty(m, 0, m->size))
        fm_violation("mem_sync(FROM_DEVICE) discards CPU writes that were never synced");
    if (mode & FM_FROM_DEVICE) {
        memcpy(m->cpu, shadow, m->size);
        memcpy(clean, shadow, m->size);
    }
    return 0;
}

/* The NPU's view of `count` bytes of an input at `from`; dirty bytes are a violation. */
static const unsigned char *fm_device_read(fm_mem *m, size_t from, size_t count,
                                           const char *name) {
    if (fm_dirty(m, from, count))
        fm_violation("run: input '%s' has CPU writes not synced TO_DEVICE", name);
    return m->buf->shadow + m->offset + from;
}

static unsigned char *fm_device_write(fm_mem *m, size_t from, size_t count, const char *name) {
    if (fm_dirty(m, from, count))
        fm_violation("run: output '%s' has unsynced CPU writes the cache could write back over "
                     "the NPU's results",
                     name);
    return m->buf->shadow + m->offset + from;
}

/* Destroy a handle of `ctx`; returns 0, or -1 when the call itself was wrong. */
static int fm_destroy(uint64_t ctx, void *handle, long *live_counter) {
    fm_mem *m = handle ? fm_lookup(handle) : NULL;
    if (!m) {
        fm_violation("destroy_mem: unknown memory handle %p", handle);
        return -1;
    }
    if (m->destroyed) {
        fm_violation("destroy_mem: memory destroyed twice");
        return -1;
    }
    if (m->ctx != ctx)
        fm_violation("destroy_mem: memory of context %#llx destroyed with context %#llx",
                     (unsigned long long)m->ctx, (unsigned long long)ctx);
    if (m->creator)
        for (fm_mem *o = fm_mems; o; o = o->next)
            if (o != m && !o->destroyed && o->buf == m->buf) {
                fm_violation("destroy_mem: allocation destroyed while an import of it lives");
                break;
            }
    m->destroyed = 1;
    if (m->map) munmap(m->map, m->map_len);
    if (m->fd >= 0) close(m->fd);
    fm_buffer_drop(m->buf);
    m->buf = NULL;
    (*live_counter)--;
    return 0;
}

/* A context is going: log its live memories, then reclaim them (as a runtime frees what a
 * destroyed context still held), so one test's mistake does not leak into the next. */
static void fm_reclaim(uint64_t ctx, long *live_counter, const char *api) {
    int leaked = 0;
    for (fm_mem *m = fm_mems; m; m = m->next)
        if (!m->destroyed && m->ctx == ctx) leaked++;
    if (!leaked) return;
    fm_violation("%s: context destroyed with %d memories not destroyed", api, leaked);
    for (int pass = 0; pass < 2; pass++) /* imports first, then allocations */
        for (fm_mem *m = fm_mems; m; m = m->next)
            if (!m->destroyed && m->ctx == ctx && m->creator == pass) {
                m->destroyed = 1;
                if (m->map) munmap(m->map, m->map_len);
                if (m->fd >= 0) close(m->fd);
                fm_buffer_drop(m->buf);
                m->buf = NULL;
                (*live_counter)--;
            }
}

__attribute__((unused)) static int fm_live_of(uint64_t ctx) {
    int n = 0;
    for (fm_mem *m = fm_mems; m; m = m->next)
        if (!m->destroyed && m->ctx == ctx) n++;
    return n;
}

#endif
