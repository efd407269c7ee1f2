/* memtap (memtap.h), on libfuse3's low-level API: the file's reads must be
 * answered by offset and length with no path lookups, and the low-level API
 * lets a later change push ranges into the page cache (notify_store). */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 34
#include "memtap.h"
#include "counters.h"
#include "fetch.h"
#include "mcrecv.h"
#include "pagemap.h"
#include "protocol.h"
#include "workingset.h"

#include <errno.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define RAM_INO 2
#define RAM_NAME "ram"
#define ATTR_TIMEOUT 86400.0     /* nothing about the file ever changes */
#define STORE_QUEUE 4096

struct memtap {
    struct pagemap map;
    struct fetcher fetch;
    struct mc_file counters;
    struct mc_slot *c;
    uint8_t *cache;              /* anonymous, MAP_NORESERVE: costs only what was fetched */
    uint8_t *present;            /* bit per page: in the cache */
    uint8_t *prefetched;         /* bit per page: asked for by the prefetch */
    uint32_t read_ahead;         /* bytes */
    struct fuse_session *se;
    /* multicast (NULL rx: unicast only) */
    struct mcrecv *rx;
    int unicast_only;            /* the group brought nothing: multicast given up (atomic) */
    uint32_t wait_ms;
    pthread_mutex_t wait_lock;
    pthread_cond_t arrived;      /* pages became present */
    /* what the receiver completed, for the storer to put into the page cache */
    pthread_mutex_t store_lock;
    pthread_cond_t store_cond;
    struct { uint64_t offset, length; } store_q[STORE_QUEUE];
    uint32_t store_head, store_tail;
    int stopping;                /* under store_lock; read atomically by the background thread */
    pthread_t storer, background;
    int storer_on, background_on;
    struct ws_entry *ws;
    uint32_t ws_n;
    int push;
};

static int page_present(struct memtap *m, uint64_t page) {
    return (__atomic_load_n(&m->present[page >> 3], __ATOMIC_ACQUIRE) >> (page & 7)) & 1;
}

static void mark_present(struct memtap *m, uint64_t first, uint64_t count) {
    for (uint64_t p = first; p < first + count; p++)
        __atomic_fetch_or(&m->present[p >> 3], (uint8_t)(1u << (p & 7)), __ATOMIC_RELEASE);
}

static void ram_attr(struct memtap *m, fuse_ino_t ino, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    if (ino == RAM_INO) {
        /* QEMU opens its mem-path read-write even for a private mapping. */
        st->st_mode = S_IFREG | 0600;
        st->st_nlink = 1;
        st->st_size = (off_t)m->map.size;
        st->st_blocks = (blkcnt_t)(m->map.size / 512);
    } else {
        st->st_mode = S_IFDIR | 0500;
        st->st_nlink = 2;
    }
}

static void op_init(void *data, struct fuse_conn_info *conn) {
    struct memtap *m = data;
    /* The mount option max_read and this must agree, or libfuse aborts. */
    conn->max_read = MP_MAX_REQUEST;
    /* The kernel takes the smaller of this and the bdi's read_ahead_kb (128 KiB
     * unless raised, see raise_read_ahead): together they set what one fault reads. */
    conn->max_readahead = m->read_ahead;
    conn->max_write = MP_MAX_REQUEST;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    struct memtap *m = fuse_req_userdata(req);
    if (parent != FUSE_ROOT_ID || strcmp(name, RAM_NAME) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct fuse_entry_param e = {.ino = RAM_INO, .attr_timeout = ATTR_TIMEOUT, .entry_timeout = ATTR_TIMEOUT};
    ram_attr(m, RAM_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    struct stat st;
    if (ino != FUSE_ROOT_ID && ino != RAM_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    ram_attr(fuse_req_userdata(req), ino, &st);
    fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void refuse(fuse_req_t req) {
    struct memtap *m = fuse_req_userdata(req);
    mc_add(m->c, MC_refused_writes, 1);
    fuse_reply_err(req, EROFS);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
    (void)attr;
    if (to_set & (FUSE_SET_ATTR_SIZE | FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        refuse(req);
        return;
    }
    op_getattr(req, ino, fi);     /* times: nothing to keep */
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    if (ino != RAM_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if (fi->flags & O_TRUNC) {
        refuse(req);
        return;
    }
    fi->keep_cache = 1;           /* else every open drops the page cache the clones share */
    fi->direct_io = 0;            /* else a private mapping still works but loses the cache */
    fuse_reply_open(req, fi);
}

static int all_present(struct memtap *m, uint64_t p, uint64_t q) {
    for (; p < q; p++)
        if (!page_present(m, p))
            return 0;
    return 1;
}

/* The receiver's pages are whole: wake the faults waiting for them, and queue
 * them for the page cache. Not stored here: a page the kernel is reading
 * through us is locked until that read is answered, and the read may be
 * waiting for exactly this wake-up. */
static void multicast_done(void *arg, uint64_t offset, uint64_t length) {
    struct memtap *m = arg;
    mark_present(m, offset / MP_PAGE, length / MP_PAGE);
    pthread_mutex_lock(&m->wait_lock);
    pthread_cond_broadcast(&m->arrived);
    pthread_mutex_unlock(&m->wait_lock);
    pthread_mutex_lock(&m->store_lock);
    if (m->store_tail - m->store_head < STORE_QUEUE) {
        m->store_q[m->store_tail++ % STORE_QUEUE].offset = offset;
        m->store_q[(m->store_tail - 1) % STORE_QUEUE].length = length;
        pthread_cond_signal(&m->store_cond);
    }
    pthread_mutex_unlock(&m->store_lock);
}

static void multicast_report(void *arg, uint64_t bytes_per_s) {
    struct memtap *m = arg;
    fetcher_report(&m->fetch, bytes_per_s);
}

/* Ranges that came by multicast into the kernel's page cache of the file: the
 * clones of this host then find them there and never fault to memtap. */
static void *storer_main(void *arg) {
    struct memtap *m = arg;
    pthread_mutex_lock(&m->store_lock);
    for (;;) {
        while (m->store_head == m->store_tail && !m->stopping)
            pthread_cond_wait(&m->store_cond, &m->store_lock);
        if (m->stopping)
            break;
        uint64_t offset = m->store_q[m->store_head % STORE_QUEUE].offset;
        uint64_t length = m->store_q[m->store_head % STORE_QUEUE].length;
        m->store_head++;
        pthread_mutex_unlock(&m->store_lock);
        struct fuse_bufvec buf = FUSE_BUFVEC_INIT(length);
        buf.buf[0].mem = m->cache + offset;
        if (fuse_lowlevel_notify_store(m->se, RAM_INO, (off_t)offset, &buf, 0) == 0)
            mc_add(m->c, MC_mc_stored_bytes, length);
        pthread_mutex_lock(&m->store_lock);
    }
    pthread_mutex_unlock(&m->store_lock);
    return NULL;
}

static void wait_present(struct memtap *m, uint64_t p, uint64_t q) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += m->wait_ms / 1000;
    deadline.tv_nsec += (long)(m->wait_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L)
        deadline.tv_sec++, deadline.tv_nsec -= 1000000000L;
    pthread_mutex_lock(&m->wait_lock);
    while (!all_present(m, p, q) && pthread_cond_timedwait(&m->arrived, &m->wait_lock, &deadline) == 0)
        ;
    pthread_mutex_unlock(&m->wait_lock);
}

/* Pages [p, q) (non-zero, not here, at most MP_MAX_REQUEST) into the cache.
 * By the group: wait for the multicast, then ask by unicast for the pages it
 * did not bring. */
#define SILENT_WAITS 8

static int by_group(struct memtap *m) {
    return m->rx && !__atomic_load_n(&m->unicast_only, __ATOMIC_RELAXED);
}

/* A network that carries no multicast (or a firewall that drops it) would
 * make every fault wait out mcast_wait_ms: after SILENT_WAITS waits with
 * not one datagram received, memtap asks by unicast only. */
static void check_group_heard(struct memtap *m) {
    if (mc_get(m->c, MC_mc_waits) >= SILENT_WAITS && mc_get(m->c, MC_mc_received) == 0 &&
        !__atomic_exchange_n(&m->unicast_only, 1, __ATOMIC_RELAXED))
        fprintf(stderr, "memtap: no multicast datagram arrived in %d waits: unicast only from now on\n",
                SILENT_WAITS);
}

static int fetch_run(struct memtap *m, uint64_t p, uint64_t q, uint32_t flags) {
    uint8_t *dst = m->cache + p * MP_PAGE;
    int rc = fetcher_ask(&m->fetch, p * MP_PAGE, (uint32_t)((q - p) * MP_PAGE), dst,
                         flags | (by_group(m) ? MP_FLAG_MULTICAST : 0));
    if (rc < 0)
        return -1;
    if (rc == 0) {
        mark_present(m, p, q - p);
        return 0;
    }
    mc_add(m->c, MC_mc_waits, 1);
    wait_present(m, p, q);
    check_group_heard(m);
    while (p < q) {
        if (page_present(m, p)) {
            p++;
            continue;
        }
        uint64_t r = p;
        while (r < q && !page_present(m, r))
            r++;
        if (fetcher_ask(&m->fetch, p * MP_PAGE, (uint32_t)((r - p) * MP_PAGE), m->cache + p * MP_PAGE,
                        (flags & MP_FLAG_BACKGROUND) | MP_FLAG_REPAIR) != 0)
            return -1;
        mc_add(m->c, MC_repair_requests, 1);
        mc_add(m->c, MC_repair_bytes, (r - p) * MP_PAGE);
        mark_present(m, p, r - p);
        p = r;
    }
    return 0;
}

static int prefetched(struct memtap *m, uint64_t page) {
    return m->prefetched && ((__atomic_load_n(&m->prefetched[page >> 3], __ATOMIC_RELAXED) >> (page & 7)) & 1);
}

/* Pages [first, first + count) into the cache: runs of non-zero pages not
 * there yet are fetched, at most MP_MAX_REQUEST each. */
static int fill(struct memtap *m, uint64_t first, uint64_t count, uint32_t flags) {
    uint64_t p = first, end = first + count;
    while (p < end) {
        if (!pagemap_test(&m->map, p)) {
            uint64_t q = p;
            while (q < end && !pagemap_test(&m->map, q))
                q++;
            if (!flags) {
                mc_add(m->c, MC_zero_ranges, 1);
                mc_add(m->c, MC_zero_bytes, (q - p) * MP_PAGE);  /* the cache's untouched pages read as zero */
            }
            p = q;
            continue;
        }
        if (page_present(m, p)) {
            if (!flags) {
                mc_add(m->c, MC_cache_hit_bytes, MP_PAGE);
                if (prefetched(m, p))
                    mc_add(m->c, MC_prefetch_hit_bytes, MP_PAGE);
            }
            p++;
            continue;
        }
        uint64_t q = p;
        while (q < end && q - p < MP_MAX_REQUEST / MP_PAGE && pagemap_test(&m->map, q) && !page_present(m, q))
            q++;
        if (!flags)
            mc_add(m->c, MC_demand_fetches, 1);
        if (fetch_run(m, p, q, flags) < 0)
            return -1;
        p = q;
    }
    return 0;
}

static int stopping(struct memtap *m) { return __atomic_load_n(&m->stopping, __ATOMIC_RELAXED); }

/* The recorded working set first (prefetch), then with push every page left;
 * a failure ends it quietly (the faults still fetch what they need). */
static void *background_main(void *arg) {
    struct memtap *m = arg;
    for (uint32_t i = 0; i < m->ws_n && !stopping(m); i++) {
        uint64_t p = m->ws[i].offset / MP_PAGE, n = m->ws[i].length / MP_PAGE;
        for (uint64_t k = p; k < p + n; k++)
            __atomic_fetch_or(&m->prefetched[k >> 3], (uint8_t)(1u << (k & 7)), __ATOMIC_RELAXED);
        if (fill(m, p, n, MP_FLAG_BACKGROUND) < 0)
            return NULL;
        mc_add(m->c, MC_prefetch_bytes, m->ws[i].length);
    }
    if (!m->push)
        return NULL;
    for (uint64_t p = 0; p < m->map.pages && !stopping(m); p += MP_MAX_REQUEST / MP_PAGE) {
        uint64_t n = m->map.pages - p < MP_MAX_REQUEST / MP_PAGE ? m->map.pages - p : MP_MAX_REQUEST / MP_PAGE;
        uint64_t missing = 0;
        for (uint64_t k = p; k < p + n; k++)
            missing += pagemap_test(&m->map, k) && !page_present(m, k);
        if (missing && fill(m, p, n, MP_FLAG_BACKGROUND) < 0)
            return NULL;
        mc_add(m->c, MC_push_bytes, missing * MP_PAGE);
    }
    for (uint64_t p = 0; p < m->map.pages; p++)
        if (pagemap_test(&m->map, p) && !page_present(m, p))
            return NULL;
    if (!stopping(m))
        mc_add(m->c, MC_push_done, 1);
    return NULL;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    struct memtap *m = fuse_req_userdata(req);
    if (ino != RAM_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if (off < 0 || (uint64_t)off >= m->map.size) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if (size > m->map.size - (uint64_t)off)
        size = (size_t)(m->map.size - (uint64_t)off);
    uint64_t first = (uint64_t)off / MP_PAGE, last = ((uint64_t)off + size + MP_PAGE - 1) / MP_PAGE;
    if (fill(m, first, last - first, 0) < 0) {
        /* The kernel turns this into SIGBUS for the QEMU that faulted: it dies, and
         * hostd reports why from memtap's log and counters. */
        char why[256];
        fprintf(stderr, "memtap: read of %zu bytes at %lld failed: %s\n", size, (long long)off,
                fetcher_last_error(&m->fetch, why, sizeof why));
        fuse_reply_err(req, EIO);
        return;
    }
    mc_add(m->c, MC_reads, 1);
    mc_add(m->c, MC_read_bytes, size);
    if (getenv("SFMPI_MEMTAP_TRACE"))         /* who reads what: for finding a reader that should not */
        fprintf(stderr, "memtap: read %zu at %lld for pid %d\n", size, (long long)off, (int)fuse_req_ctx(req)->pid);
    fuse_reply_buf(req, (const char *)m->cache + off, size);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi) {
    (void)ino, (void)buf, (void)size, (void)off, (void)fi;
    refuse(req);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi) {
    (void)ino, (void)mode, (void)off, (void)len, (void)fi;
    refuse(req);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    if (ino != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    char buf[512];
    size_t used = 0;
    const char *names[3] = {".", "..", RAM_NAME};
    fuse_ino_t inos[3] = {FUSE_ROOT_ID, FUSE_ROOT_ID, RAM_INO};
    for (off_t i = off; i < 3; i++) {
        struct stat st = {.st_ino = inos[i], .st_mode = i == 2 ? S_IFREG : S_IFDIR};
        size_t n = fuse_add_direntry(req, buf + used, sizeof buf - used, names[i], &st, i + 1);
        if (used + n > sizeof buf || used + n > size)
            break;
        used += n;
    }
    fuse_reply_buf(req, buf, used);
}

static const struct fuse_lowlevel_ops OPS = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .fallocate = op_fallocate,
    .readdir = op_readdir,
};

/* The mount's bdi is 0:<minor> of its device: found in mountinfo, since a
 * stat of the mount point would ask this very daemon, which does not serve yet. */
static void raise_read_ahead(const char *mountpoint, int kb) {
    char real[4096];
    if (!realpath(mountpoint, real))
        return;
    FILE *mi = fopen("/proc/self/mountinfo", "re");
    if (!mi)
        return;
    char line[8192];
    unsigned major = 0, minor = 0;
    int found = 0;
    while (fgets(line, sizeof line, mi)) {
        char point[4096];
        unsigned a, b;
        if (sscanf(line, "%*u %*u %u:%u %*s %4095s", &a, &b, point) == 3 && strcmp(point, real) == 0)
            major = a, minor = b, found = 1;      /* the last one: the newest mount there */
    }
    fclose(mi);
    if (!found)
        return;
    char path[128];
    snprintf(path, sizeof path, "/sys/class/bdi/%u:%u/read_ahead_kb", major, minor);
    FILE *f = fopen(path, "we");
    if (f) {
        fprintf(f, "%d\n", kb);
        fclose(f);
    }
}

int memtap_run(const struct memtap_config *cfg, char *err, size_t errlen, void (*ready)(void *), void *arg) {
    static struct memtap m;      /* large (the store queue), and one per process */
    memset(&m, 0, sizeof m);
    pthread_mutex_init(&m.wait_lock, NULL);
    pthread_cond_init(&m.arrived, NULL);
    pthread_mutex_init(&m.store_lock, NULL);
    pthread_cond_init(&m.store_cond, NULL);
    int rc = -1;
    struct fuse_session *se = NULL;
    int mounted = 0, handlers = 0, fetching = 0;
    int lr = pagemap_load(cfg->map_path, &m.map);
    if (lr < 0) {
        snprintf(err, errlen, "page map %s: %s", cfg->map_path, lr == -EINVAL ? "not a page map" : strerror(-lr));
        goto out;
    }
    if (cfg->counters_path) {
        int cr = mc_open(cfg->counters_path, 1, &m.counters);
        if (cr < 0) {
            snprintf(err, errlen, "counters file %s: %s", cfg->counters_path, strerror(-cr));
            goto out;
        }
        m.c = &m.counters.slot[0];
        snprintf(m.c->id, MC_ID_LEN, "%s", cfg->checkpoint);
    }
    fetching = 1;
    if (fetcher_init(&m.fetch, cfg->server_host, cfg->server_port, cfg->checkpoint, cfg->token_hex,
                     cfg->connections ? cfg->connections : 4, cfg->timeout_ms, m.c) < 0) {
        snprintf(err, errlen, "%s", m.fetch.last_error);
        goto out;
    }
    if (m.fetch.size != m.map.size) {
        snprintf(err, errlen, "the server's checkpoint %s has %llu bytes, its page map %llu", cfg->checkpoint,
                 (unsigned long long)m.fetch.size, (unsigned long long)m.map.size);
        goto out;
    }
    m.cache = mmap(NULL, m.map.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    m.present = calloc((size_t)((m.map.pages + 7) / 8), 1);
    if (m.cache == MAP_FAILED || !m.present) {
        m.cache = m.cache == MAP_FAILED ? NULL : m.cache;
        snprintf(err, errlen, "no memory for a cache of %llu bytes", (unsigned long long)m.map.size);
        goto out;
    }
    m.read_ahead = cfg->read_ahead_kb < 0 ? MP_MAX_REQUEST
                   : (uint32_t)(cfg->read_ahead_kb > 1024 ? 1024 : cfg->read_ahead_kb) * 1024u;
    m.wait_ms = cfg->mcast_wait_ms > 0 ? (uint32_t)cfg->mcast_wait_ms : 200;
    m.push = cfg->push;
    if (cfg->workingset) {
        int wr = ws_load(cfg->workingset, m.map.size, &m.ws, &m.ws_n);
        if (wr < 0) {
            snprintf(err, errlen, "working set %s: %s", cfg->workingset,
                     wr == -EINVAL ? "not a working set of this checkpoint" : strerror(-wr));
            goto out;
        }
        m.prefetched = calloc((size_t)((m.map.pages + 7) / 8), 1);
        if (!m.prefetched) {
            snprintf(err, errlen, "out of memory");
            goto out;
        }
    }
    char *argv[] = {"memtap", "-o", "max_read=1048576,fsname=sfmpi-memtap,subtype=sfmpi-memtap", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);
    se = fuse_session_new(&args, &OPS, sizeof OPS, &m);
    fuse_opt_free_args(&args);
    if (!se) {
        snprintf(err, errlen, "fuse_session_new failed");
        goto out;
    }
    if (fuse_set_signal_handlers(se) != 0) {
        snprintf(err, errlen, "cannot install signal handlers");
        goto out;
    }
    handlers = 1;
    if (fuse_session_mount(se, cfg->mountpoint) != 0) {
        snprintf(err, errlen, "cannot mount FUSE at %s (is /dev/fuse there, and fuse3 installed?)", cfg->mountpoint);
        goto out;
    }
    mounted = 1;
    m.se = se;
    raise_read_ahead(cfg->mountpoint, (int)(m.read_ahead / 1024));
    if (cfg->group) {
        struct mcrecv_config rc_cfg = {.group = cfg->group, .local = cfg->mcast_local, .token = m.fetch.token,
                                       .ram_size = m.map.size, .cache = m.cache, .present = m.present,
                                       .counters = m.c, .done = multicast_done, .report = multicast_report,
                                       .arg = &m};
        if (mcrecv_start(&rc_cfg, &m.rx, err, errlen) < 0) {
            fprintf(stderr, "memtap: %s: unicast only\n", err);   /* the clones still get their memory */
            err[0] = '\0';
            m.rx = NULL;
        } else if (pthread_create(&m.storer, NULL, storer_main, &m) != 0) {
            snprintf(err, errlen, "cannot start the page-cache storer");
            goto out;
        } else {
            m.storer_on = 1;
        }
    }
    if ((m.ws_n || m.push) && pthread_create(&m.background, NULL, background_main, &m) == 0)
        m.background_on = 1;
    if (ready)
        ready(arg);
    struct fuse_loop_config loop = {.clone_fd = 0, .max_idle_threads = 8};
    rc = fuse_session_loop_mt(se, &loop) < 0 ? -1 : 0;
    if (rc < 0)
        snprintf(err, errlen, "the FUSE loop failed");
out:
    pthread_mutex_lock(&m.store_lock);
    m.stopping = 1;
    pthread_cond_broadcast(&m.store_cond);
    pthread_mutex_unlock(&m.store_lock);
    if (m.background_on)
        pthread_join(m.background, NULL);
    if (m.storer_on)
        pthread_join(m.storer, NULL);
    mcrecv_stop(m.rx);
    if (mounted)
        fuse_session_unmount(se);
    if (handlers)
        fuse_remove_signal_handlers(se);
    if (se)
        fuse_session_destroy(se);
    if (fetching)
        fetcher_close(&m.fetch);
    if (m.cache)
        munmap(m.cache, m.map.size);
    free(m.present);
    free(m.prefetched);
    free(m.ws);
    pthread_mutex_destroy(&m.wait_lock);
    pthread_cond_destroy(&m.arrived);
    pthread_mutex_destroy(&m.store_lock);
    pthread_cond_destroy(&m.store_cond);
    mc_close(&m.counters);
    pagemap_free(&m.map);
    return rc;
}
