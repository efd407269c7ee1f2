/* memtap's connections to its memory server (fetch.h). */
#define _GNU_SOURCE
#include "fetch.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void fail(struct fetcher *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct fetcher *f, const char *fmt, ...) {
    va_list ap;
    pthread_mutex_lock(&f->err_lock);
    va_start(ap, fmt);
    vsnprintf(f->last_error, sizeof f->last_error, fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&f->err_lock);
}

const char *fetcher_last_error(struct fetcher *f, char *buf, size_t len) {
    pthread_mutex_lock(&f->err_lock);
    snprintf(buf, len, "%s", f->last_error);
    pthread_mutex_unlock(&f->err_lock);
    return buf;
}

/* Exactly len bytes within the deadline, or -1. */
static int recv_full(int fd, void *buf, size_t len, uint64_t deadline) {
    uint8_t *p = buf;
    while (len) {
        uint64_t now = now_us();
        if (now >= deadline)
            return errno = ETIMEDOUT, -1;
        struct pollfd pfd = {fd, POLLIN, 0};
        int rc = poll(&pfd, 1, (int)((deadline - now + 999) / 1000));
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc == 0)
            return errno = ETIMEDOUT, -1;
        if (rc < 0)
            return -1;
        ssize_t n = recv(fd, p, len, MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n == 0)
            return errno = ECONNRESET, -1;
        if (n < 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int send_full(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int dial(struct fetcher *f, uint64_t *size) {
    struct sockaddr_storage ss = {0};
    socklen_t alen;
    struct sockaddr_in *in4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, f->host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET, in4->sin_port = htons(f->port), alen = sizeof *in4;
    } else if (inet_pton(AF_INET6, f->host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6, in6->sin6_port = htons(f->port), alen = sizeof *in6;
    } else {
        fail(f, "memory server address %s is not a numeric IP address", f->host);
        return -1;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return fail(f, "socket: %s", strerror(errno)), -1;
    uint64_t deadline = now_us() + (uint64_t)f->timeout_ms * 1000u;
    if (connect(fd, (struct sockaddr *)&ss, alen) < 0 && errno != EINPROGRESS) {
        fail(f, "memory server %s:%u: %s", f->host, f->port, strerror(errno));
        close(fd);
        return -1;
    }
    struct pollfd pfd = {fd, POLLOUT, 0};
    int err = 0;
    socklen_t elen = sizeof err;
    if (poll(&pfd, 1, f->timeout_ms) != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0 || err) {
        fail(f, "memory server %s:%u: %s", f->host, f->port, err ? strerror(err) : "no answer to connect");
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint8_t hello[MP_HELLO_FIXED + MP_ID_MAX], raw[MP_WELCOME_LEN];
    struct mp_welcome w;
    size_t hlen = mp_encode_hello(hello, f->token, f->id);
    if (send_full(fd, hello, hlen) < 0 || recv_full(fd, raw, sizeof raw, deadline) < 0) {
        fail(f, "memory server %s:%u: %s", f->host, f->port,
             errno == ETIMEDOUT ? "no answer within the timeout (to its hello)" : strerror(errno));
        close(fd);
        return -1;
    }
    if (mp_decode_welcome(raw, &w) != MP_OK || w.status != MP_OK) {
        fail(f, "memory server %s:%u refused checkpoint %s: %s", f->host, f->port, f->id,
             mp_decode_welcome(raw, &w) != MP_OK ? "not the sfmpi memory protocol" : mp_status_name(w.status));
        close(fd);
        return -1;
    }
    if (w.page_size != MP_PAGE || w.max_request < MP_PAGE || w.size == 0 || w.size % MP_PAGE) {
        fail(f, "memory server %s:%u: a welcome that makes no sense (page %u, size %llu)", f->host, f->port,
             w.page_size, (unsigned long long)w.size);
        close(fd);
        return -1;
    }
    *size = w.size;
    return fd;
}

int fetcher_init(struct fetcher *f, const char *host, uint16_t port, const char *id, const char *token_hex,
                 int connections, int timeout_ms, struct mc_slot *counters) {
    memset(f, 0, sizeof *f);
    pthread_mutex_init(&f->err_lock, NULL);
    snprintf(f->host, sizeof f->host, "%s", host);
    f->port = port;
    f->timeout_ms = timeout_ms > 0 ? timeout_ms : 10000;
    f->count = connections < 1 ? 1 : connections > FETCH_MAX_CONNECTIONS ? FETCH_MAX_CONNECTIONS : connections;
    f->counters = counters;
    for (int i = 0; i < FETCH_MAX_CONNECTIONS; i++) {
        pthread_mutex_init(&f->conn[i].lock, NULL);
        f->conn[i].fd = -1;
    }
    if (!mp_id_valid(id, strlen(id)))
        return fail(f, "not a checkpoint id: %.80s", id), -1;
    snprintf(f->id, sizeof f->id, "%s", id);
    if (mp_token_from_hex(token_hex, f->token) < 0)
        return fail(f, "a token is 64 hex digits"), -1;
    int fd = dial(f, &f->size);
    if (fd < 0)
        return -1;
    f->conn[0].fd = fd;
    return 0;
}

static struct fetch_conn *take(struct fetcher *f) {
    for (int i = 0; i < f->count; i++)
        if (pthread_mutex_trylock(&f->conn[i].lock) == 0)
            return &f->conn[i];
    static __thread unsigned spread;
    struct fetch_conn *c = &f->conn[spread++ % (unsigned)f->count];
    pthread_mutex_lock(&c->lock);
    return c;
}

static void drop(struct fetch_conn *c) {
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

/* 0: the bytes are in dst; 1: the range went to the multicast group; -1: the
 * connection broke (one fresh try is worth it); -2: an answer that another try
 * would not change. */
static int ask(struct fetcher *f, struct fetch_conn *c, uint64_t offset, uint32_t length, uint8_t *dst,
               uint32_t flags) {
    if (c->fd < 0) {
        uint64_t size;
        int fd = dial(f, &size);
        if (fd < 0)
            return -1;
        if (size != f->size) {
            fail(f, "memory server %s:%u now says checkpoint %s has %llu bytes, not %llu", f->host, f->port, f->id,
                 (unsigned long long)size, (unsigned long long)f->size);
            close(fd);
            return -1;
        }
        c->fd = fd;
        mc_add(f->counters, MC_reconnects, 1);
    }
    uint8_t raw[MP_REQUEST_LEN], head[MP_REPLY_LEN];
    struct mp_request r = {.req_id = ++c->next_id, .offset = offset, .length = length, .flags = flags};
    struct mp_reply rep;
    uint64_t deadline = now_us() + (uint64_t)f->timeout_ms * 1000u;
    mp_encode_request(raw, &r);
    if (send_full(c->fd, raw, sizeof raw) < 0 || recv_full(c->fd, head, sizeof head, deadline) < 0) {
        int timed_out = errno == ETIMEDOUT;
        fail(f, "memory server %s:%u: %s", f->host, f->port,
             timed_out ? "no answer within the timeout" : strerror(errno));
        return drop(c), timed_out ? -2 : -1;   /* a stalled server gets no second wait */
    }
    if (mp_decode_reply(head, &rep) != MP_OK || rep.req_id != r.req_id ||
        (rep.status == MP_OK && rep.length != length) || (rep.status != MP_OK && rep.length != 0) ||
        (rep.status == MP_MULTICAST && !(flags & MP_FLAG_MULTICAST))) {
        fail(f, "memory server %s:%u answered something that is not the reply asked for", f->host, f->port);
        return drop(c), -1;
    }
    if (rep.status == MP_MULTICAST || (rep.status == MP_OK && length == 0))
        return rep.status == MP_MULTICAST;
    if (rep.status != MP_OK) {
        /* A well-formed refusal: the connection is fine, and asking again would get the same. */
        fail(f, "memory server %s:%u: %s", f->host, f->port, mp_status_name(rep.status));
        return -2;
    }
    if (recv_full(c->fd, dst, length, deadline) < 0) {
        fail(f, "memory server %s:%u: reply cut short (%s)", f->host, f->port, strerror(errno));
        return drop(c), -1;
    }
    return 0;
}

int fetcher_ask(struct fetcher *f, uint64_t offset, uint32_t length, uint8_t *dst, uint32_t flags) {
    uint64_t t0 = now_us();
    struct fetch_conn *c = take(f);
    /* A connection that broke since its last use gets one fresh try. */
    int rc = ask(f, c, offset, length, dst, flags);
    if (rc == -1 && c->fd < 0)
        rc = ask(f, c, offset, length, dst, flags);
    pthread_mutex_unlock(&c->lock);
    if (rc < 0) {
        mc_add(f->counters, MC_fetch_errors, 1);
        return -1;
    }
    mc_add(f->counters, MC_fetches, 1);
    if (rc == 0)
        mc_add(f->counters, MC_fetch_bytes, length);
    mc_latency(f->counters, now_us() - t0);
    return rc;
}

int fetcher_get(struct fetcher *f, uint64_t offset, uint32_t length, uint8_t *dst) {
    return fetcher_ask(f, offset, length, dst, 0) < 0 ? -1 : 0;
}

int fetcher_report(struct fetcher *f, uint64_t bytes_per_s) {
    for (int i = 0; i < f->count; i++) {
        struct fetch_conn *c = &f->conn[i];
        if (pthread_mutex_trylock(&c->lock) != 0)
            continue;
        int rc = c->fd >= 0 ? ask(f, c, bytes_per_s, 0, NULL, MP_FLAG_REPORT) : -1;
        pthread_mutex_unlock(&c->lock);
        return rc < 0 ? -1 : 0;
    }
    return -1;                 /* every connection busy: the next report goes instead */
}

void fetcher_close(struct fetcher *f) {
    for (int i = 0; i < FETCH_MAX_CONNECTIONS; i++) {
        drop(&f->conn[i]);
        pthread_mutex_destroy(&f->conn[i].lock);
    }
    pthread_mutex_destroy(&f->err_lock);
}
