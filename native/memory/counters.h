/* Counters of the memory server and of memtap, in a small file each daemon
 * maps shared: hostd reads them at any time, even after the daemon died (the
 * last figures are what explain why). Layout (native byte order, read by
 * sfmpi/native/counters.py through _native.counter_layout()):
 *
 *   header   8 bytes "SFMCNT1\0" | u32 slots | u32 fields | u32 hist | u32 pid
 *   slot[i]  char id[72] | u64 field[MC_FIELDS] | u64 latency_hist[MC_HIST]
 *
 * memtap has one slot (its checkpoint); the server has slot 0 for its totals
 * and one per checkpoint it serves. Latency bucket b counts requests that took
 * [2^b, 2^(b+1)) microseconds (bucket 0 also takes < 1 us).
 */
#ifndef SFMPI_MEMORY_COUNTERS_H
#define SFMPI_MEMORY_COUNTERS_H

#include <stdint.h>

#define MC_MAGIC "SFMCNT1\0"
#define MC_ID_LEN 72
#define MC_HIST 24
#define MC_SERVER_SLOTS 64

/* One list for both daemons: each fills its own, the rest stay 0. */
#define MC_FIELD_LIST(X)                                                              \
    X(reads)              /* memtap: FUSE reads answered */                          \
    X(read_bytes)         /* memtap: bytes the kernel got */                         \
    X(cache_hit_bytes)    /* memtap: served from its extent cache */                 \
    X(zero_bytes)         /* memtap: synthesised, never fetched */                   \
    X(zero_ranges)        /* memtap: runs of zero pages synthesised */               \
    X(fetches)            /* memtap: requests to the server */                       \
    X(fetch_bytes)        /* memtap: bytes fetched */                                \
    X(fetch_errors)       /* memtap: requests that failed (server down, garbage) */  \
    X(refused_writes)     /* memtap: writes, truncations, fallocates refused */      \
    X(reconnects)         /* memtap: connections opened again after a failure */     \
    X(connections)        /* server: connections accepted */                         \
    X(refused)            /* server: hellos refused (token, id, version, busy) */    \
    X(requests)           /* server: ranges served */                                \
    X(bytes_sent)         /* server: payload bytes sent */                           \
    X(bad_requests)       /* server: requests refused (range, alignment, length) */  \
    X(io_errors)          /* server: reads of its file that failed */                \
    X(zero_pages_asked)   /* server: zero pages inside served ranges (should stay 0) */ \
    X(mc_sent_datagrams)  /* server: datagrams sent to multicast groups */          \
    X(mc_sent_bytes)      /* server: payload bytes sent to groups */                 \
    X(mc_distinct_bytes)  /* server: bytes of pages sent to the group a first time */ \
    X(mc_suppressed)      /* server: ranges not sent again (lockstep) */             \
    X(mc_reports)         /* server: receivers' rate reports */                      \
    X(mc_paced_us)        /* server: time multicast waited for the pacer */          \
    X(repair_requests)    /* both: unicast requests for pages a multicast missed */  \
    X(repair_bytes)       /* both: their bytes */                                    \
    X(mc_received)        /* memtap: valid datagrams received */                     \
    X(mc_invalid)         /* memtap: datagrams refused (forged, foreign, malformed) */ \
    X(mc_duplicates)      /* memtap: fragments it had already */                     \
    X(mc_lost)            /* memtap: datagrams lost (sequence gaps) */               \
    X(mc_ranges)          /* memtap: ranges completed from the group */              \
    X(mc_stored_bytes)    /* memtap: bytes pushed into the page cache */             \
    X(mc_waits)           /* memtap: fetches the group answered */                   \
    X(push_bytes)         /* memtap: bytes the background push asked for */          \
    X(push_done)          /* memtap: 1 once every non-zero page is here */           \
    X(prefetch_bytes)     /* memtap: bytes of the working set asked ahead */         \
    X(prefetch_hit_bytes) /* memtap: faulted bytes that the prefetch brought */     \
    X(demand_fetches)     /* memtap: requests made for faults */                     \
    X(latency_sum_us)     /* both: sum over the histogram */

#define MC_ENUM(name) MC_##name,
enum mc_field { MC_FIELD_LIST(MC_ENUM) MC_FIELDS };
#undef MC_ENUM

struct mc_slot {
    char id[MC_ID_LEN];
    uint64_t field[MC_FIELDS];
    uint64_t hist[MC_HIST];
};

struct mc_header {
    char magic[8];
    uint32_t slots, fields, hist, pid;
};

struct mc_file {
    struct mc_header *head;
    struct mc_slot *slot;     /* head's slots follow it */
    uint32_t slots;
};

/* Create (truncate) and map a counters file of `slots` slots: 0 or -errno. */
int mc_open(const char *path, uint32_t slots, struct mc_file *out);
void mc_close(struct mc_file *f);

static inline void mc_add(struct mc_slot *s, enum mc_field f, uint64_t v) {
    if (s)
        __atomic_fetch_add(&s->field[f], v, __ATOMIC_RELAXED);
}

static inline uint64_t mc_get(const struct mc_slot *s, enum mc_field f) {
    return s ? __atomic_load_n(&s->field[f], __ATOMIC_RELAXED) : 0;
}

void mc_latency(struct mc_slot *s, uint64_t us);
extern const char *const mc_field_names[MC_FIELDS];

#endif
