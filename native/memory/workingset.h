/* A checkpoint's working set: the order in which its first clones faulted
 * ranges, recorded by the memory server (every request that is not a push or
 * a prefetch, pages already recorded left out) and saved next to the
 * checkpoint; a later fork's memtaps ask for it first, before their clones
 * fault (REAP's idea, for forks). File, all integers little-endian:
 *
 *   magic "SFMWS1\0\0" | u32 count | u32 0 | count x (u64 offset | u32 length)
 *
 * Every entry is a valid request of its RAM (protocol.h), checked on load: the
 * file travels from host to host.
 */
#ifndef SFMPI_MEMORY_WORKINGSET_H
#define SFMPI_MEMORY_WORKINGSET_H

#include <pthread.h>
#include <stdint.h>

#define WS_MAX 8192                    /* entries: 96 KiB at most */
#define WS_HEADER 16
#define WS_ENTRY 12

struct ws_entry {
    uint64_t offset;
    uint32_t length;
};

struct workingset {
    pthread_mutex_t lock;
    uint64_t ram_size;
    uint8_t *seen;            /* bit per page: recorded */
    struct ws_entry *e;
    uint32_t n;
};

int ws_init(struct workingset *w, uint64_t ram_size);   /* 0 or -ENOMEM */
void ws_free(struct workingset *w);
/* The runs of [offset, offset + length) not recorded yet, appended (until
 * WS_MAX); a run that continues the last entry extends it. */
void ws_record(struct workingset *w, uint64_t offset, uint32_t length);
/* Written to path through a temporary file: the count, or -errno. */
int ws_save(struct workingset *w, const char *path);
/* A saved set for a RAM of ram_size bytes: 0 with *out (free it) and *n, or
 * -errno (-EINVAL: not a working set of this RAM). */
int ws_load(const char *path, uint64_t ram_size, struct ws_entry **out, uint32_t *n);

#endif
