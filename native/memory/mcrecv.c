/* memtap's multicast receiver (mcrecv.h). */
#define _GNU_SOURCE
#include "mcrecv.h"
#include "mcast.h"
#include "mcsend.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define RATE_START (256ull << 20)
#define RATE_MAX (1ull << 30)

struct mcrecv {
    struct mcrecv_config cfg;
    int fd, stop_fd;
    pthread_t thread;
    struct mc_key key;
    struct mc_assembly a;
    struct mc_repair repair;
    uint64_t rate;                   /* what it reports */
    uint64_t last_bytes, last_lost, lost_counted, last_report_ns, last_expire_ns;
    uint64_t bytes;                  /* payload received */
    uint8_t buf[BATCH][MC_DATAGRAM_LEN + 1];   /* +1: a longer datagram shows as too long */
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void take(struct mcrecv *r, const uint8_t *buf, size_t len, uint64_t now) {
    struct mc_datagram d;
    const uint8_t *payload;
    if (mc_decode(&r->key, buf, len, r->cfg.ram_size, &d, &payload) != MC_OK) {
        mc_add(r->cfg.counters, MC_mc_invalid, 1);
        return;
    }
    mc_add(r->cfg.counters, MC_mc_received, 1);
    r->bytes += MC_FRAG;
    switch (mc_assembly_accept(&r->a, &d, payload, now)) {
    case MC_COMPLETE:
        mc_add(r->cfg.counters, MC_mc_ranges, 1);
        r->cfg.done(r->cfg.arg, d.offset, d.length);
        break;
    case MC_DUPLICATE:
        mc_add(r->cfg.counters, MC_mc_duplicates, 1);
        break;
    case MC_INVALID:
        mc_add(r->cfg.counters, MC_mc_invalid, 1);
        break;
    case MC_NEW:
        break;
    }
}

/* Ranges quiet too long: their whole pages are kept (memtap asks for the rest when faulted). */
static void expire(struct mcrecv *r, uint64_t now) {
    while (mc_assembly_expire(&r->a, now, MCRECV_EXPIRE_MS * 1000000ull, r->cfg.present, &r->repair))
        for (uint32_t i = 0; i < r->repair.n_received; i++)
            r->cfg.done(r->cfg.arg, r->repair.received[i].offset, r->repair.received[i].length);
}

static void report(struct mcrecv *r, uint64_t now) {
    uint64_t span = now - r->last_report_ns;
    uint64_t got = r->bytes - r->last_bytes, lost = r->a.seq.lost - r->last_lost;
    uint64_t arrived = got * 1000000000ull / (span ? span : 1);
    uint64_t before = r->rate;
    if (lost * 100 > got / MC_FRAG + lost && lost > 0) {
        uint64_t slower = arrived / 4 * 3;
        r->rate = slower < MCSEND_FLOOR ? MCSEND_FLOOR : slower < r->rate ? slower : r->rate;
    } else if (got) {
        r->rate = r->rate / 4 * 5 > RATE_MAX ? RATE_MAX : r->rate / 4 * 5;
    }
    if (r->a.seq.lost > r->lost_counted) {
        mc_add(r->cfg.counters, MC_mc_lost, r->a.seq.lost - r->lost_counted);
        r->lost_counted = r->a.seq.lost;
    }
    if (got || r->rate != before)
        r->cfg.report(r->cfg.arg, r->rate);
    r->last_bytes = r->bytes, r->last_lost = r->a.seq.lost, r->last_report_ns = now;
}

static void *receiver_main(void *arg) {
    struct mcrecv *r = arg;
    uint8_t (*buf)[MC_DATAGRAM_LEN + 1] = r->buf;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    for (;;) {
        struct pollfd fds[2] = {{r->fd, POLLIN, 0}, {r->stop_fd, POLLIN, 0}};
        int rc = poll(fds, 2, 20);
        if (rc < 0 && errno != EINTR)
            break;
        if (fds[1].revents)
            break;
        uint64_t now = now_ns();
        if (rc > 0 && (fds[0].revents & POLLIN)) {
            for (int i = 0; i < BATCH; i++) {
                iov[i] = (struct iovec){buf[i], sizeof buf[i]};
                memset(&msgs[i], 0, sizeof msgs[i]);
                msgs[i].msg_hdr.msg_iov = &iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            int n = recvmmsg(r->fd, msgs, BATCH, MSG_DONTWAIT, NULL);
            for (int i = 0; i < n; i++)
                take(r, buf[i], (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) ? sizeof buf[i] : msgs[i].msg_len, now);
        }
        if (now - r->last_expire_ns > 20000000ull) {
            expire(r, now);
            r->last_expire_ns = now;
        }
        if (now - r->last_report_ns > MCRECV_REPORT_MS * 1000000ull)
            report(r, now);
    }
    return NULL;
}

int mcrecv_start(const struct mcrecv_config *cfg, struct mcrecv **out, char *err, size_t errlen) {
    struct sockaddr_in group;
    struct in_addr local = {.s_addr = htonl(INADDR_ANY)};
    if (mcsend_parse_group(cfg->group, &group) < 0)
        return snprintf(err, errlen, "%s is not an IPv4 multicast ADDRESS:PORT", cfg->group), -1;
    if (cfg->local && inet_pton(AF_INET, cfg->local, &local) != 1)
        return snprintf(err, errlen, "%s is not a numeric IPv4 address", cfg->local), -1;
    struct mcrecv *r = calloc(1, sizeof *r);
    if (!r)
        return snprintf(err, errlen, "out of memory"), -1;
    r->cfg = *cfg;
    r->fd = r->stop_fd = -1;
    r->rate = RATE_START;
    r->last_report_ns = r->last_expire_ns = now_ns();
    mc_assembly_init(&r->a, cfg->cache, cfg->ram_size);
    const char *what = NULL;
    int one = 1, rcvbuf = MCRECV_RCVBUF;
    struct ip_mreq mreq = {.imr_multiaddr = group.sin_addr, .imr_interface = local};
    r->fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (r->fd < 0)
        what = "socket";
    else if (setsockopt(r->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        what = "SO_REUSEADDR";
    else if (bind(r->fd, (struct sockaddr *)&group, sizeof group) < 0)   /* the group's address: no other traffic */
        what = "bind to the group";
    else if (setsockopt(r->fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mreq, sizeof mreq) < 0)
        what = "join the group";
    else if (mc_key_init(&r->key, cfg->token) < 0)
        what = "key the MAC (OpenSSL)", errno = EIO;
    else if ((r->stop_fd = eventfd(0, EFD_CLOEXEC)) < 0)
        what = "eventfd";
    if (!what && setsockopt(r->fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
        setsockopt(r->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);   /* without CAP_NET_ADMIN: what rmem_max allows */
    if (!what && (errno = pthread_create(&r->thread, NULL, receiver_main, r)) != 0)
        what = "start the receiver thread";
    if (what) {
        snprintf(err, errlen, "multicast group %s: cannot %s: %s", cfg->group, what, strerror(errno));
        if (r->key.ctx)
            mc_key_free(&r->key);
        if (r->fd >= 0)
            close(r->fd);
        if (r->stop_fd >= 0)
            close(r->stop_fd);
        free(r);
        return -1;
    }
    *out = r;
    return 0;
}

void mcrecv_stop(struct mcrecv *r) {
    if (!r)
        return;
    uint64_t one = 1;
    ssize_t ignored = write(r->stop_fd, &one, sizeof one);
    (void)ignored;
    pthread_join(r->thread, NULL);
    close(r->fd);
    close(r->stop_fd);
    mc_key_free(&r->key);
    free(r);
}
