/* The memory server's multicast side (mcsend.h). */
#define _GNU_SOURCE
#include "mcsend.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int mcsend_parse_group(const char *text, struct sockaddr_in *out) {
    char host[32];
    unsigned port;
    char extra;
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host || sscanf(colon + 1, "%u%c", &port, &extra) != 1 ||
        port < 1 || port > 65535)
        return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1 || !IN_MULTICAST(ntohl(out->sin_addr.s_addr)))
        return -1;
    return 0;
}

int mcsend_init(struct mcsend *m, int fd, const struct sockaddr_in *group, const uint8_t token[MP_TOKEN_LEN],
                uint64_t ram_size, uint64_t rate, const char **err) {
    memset(m, 0, sizeof *m);
    m->fd = fd;
    m->group = *group;
    m->ram_size = ram_size;
    if (getrandom(&m->session, sizeof m->session, 0) != sizeof m->session)
        return *err = "no random session id", -EIO;
    m->ever = calloc((size_t)(ram_size / MP_PAGE + 7) / 8, 1);
    if (!m->ever)
        return *err = "out of memory", -ENOMEM;
    uint64_t now = now_ns();
    if (mc_key_init(&m->key, token) < 0 ||
        mc_pacer_init(&m->pacer, MCSEND_FLOOR, rate < MCSEND_FLOOR ? MCSEND_FLOOR : rate, MCSEND_BURST,
                      1000000000ull, now) < 0) {
        free(m->ever);
        m->ever = NULL;
        return *err = "cannot key the multicast MAC (OpenSSL)", -EIO;
    }
    mc_recent_init(&m->recent, MCSEND_WINDOW_MS * 1000000ull);
    pthread_mutex_init(&m->lock, NULL);
    return 0;
}

void mcsend_free(struct mcsend *m) {
    if (!m->ever)
        return;
    mc_key_free(&m->key);
    free(m->ever);
    m->ever = NULL;
    pthread_mutex_destroy(&m->lock);
}

int mcsend_claim(struct mcsend *m, uint64_t offset, uint32_t length) {
    pthread_mutex_lock(&m->lock);
    int send = mc_recent_should_send(&m->recent, offset, length, now_ns()) == 1;
    pthread_mutex_unlock(&m->lock);
    return send;
}

static void add_both(struct mc_slot *slots[2], enum mc_field f, uint64_t v) {
    mc_add(slots[0], f, v);
    mc_add(slots[1], f, v);
}

int mcsend_range(struct mcsend *m, uint64_t offset, uint32_t length, const uint8_t *buf, struct mc_slot *slots[2]) {
    uint8_t dgram[MC_DATAGRAM_LEN];
    uint64_t paced_ns = 0, distinct = 0;
    int rc = 0;
    pthread_mutex_lock(&m->lock);
    for (uint64_t p = offset / MP_PAGE; p < (offset + length) / MP_PAGE; p++)
        if (!(m->ever[p >> 3] & (1u << (p & 7)))) {
            m->ever[p >> 3] |= (uint8_t)(1u << (p & 7));
            distinct += MP_PAGE;
        }
    for (uint16_t i = 0; i < length / MC_FRAG && rc == 0; i++) {
        uint64_t now = now_ns();
        while (!mc_pacer_allow(&m->pacer, MC_DATAGRAM_LEN, now)) {
            uint64_t wait = mc_pacer_wait_ns(&m->pacer, MC_DATAGRAM_LEN, now);
            struct timespec ts = {.tv_sec = (time_t)(wait / 1000000000u), .tv_nsec = (long)(wait % 1000000000u)};
            nanosleep(&ts, NULL);
            uint64_t later = now_ns();
            paced_ns += later - now;
            now = later;
        }
        struct mc_datagram d;
        mc_fragment(&d, m->session, m->seq++, offset, length, i);
        size_t n = mc_encode(&m->key, &d, buf + (size_t)i * MC_FRAG, dgram);
        ssize_t sent;
        do
            sent = n ? sendto(m->fd, dgram, n, 0, (struct sockaddr *)&m->group, sizeof m->group) : -1;
        while (sent < 0 && errno == EINTR);
        if (sent != (ssize_t)n)
            rc = -1;
        else
            add_both(slots, MC_mc_sent_datagrams, 1);
    }
    pthread_mutex_unlock(&m->lock);
    if (rc == 0)
        add_both(slots, MC_mc_sent_bytes, length);
    add_both(slots, MC_mc_distinct_bytes, distinct);
    add_both(slots, MC_mc_paced_us, paced_ns / 1000u);
    return rc;
}

void mcsend_report(struct mcsend *m, uint32_t receiver, uint64_t bytes_per_s) {
    pthread_mutex_lock(&m->lock);
    mc_pacer_report(&m->pacer, receiver, bytes_per_s, now_ns());
    pthread_mutex_unlock(&m->lock);
}
