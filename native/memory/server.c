/* The memory server (server.h). */
#define _GNU_SOURCE
#include "server.h"
#include "counters.h"
#include "mcsend.h"
#include "pagemap.h"
#include "protocol.h"
#include "workingset.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CHECKPOINTS (MC_SERVER_SLOTS - 1)   /* slot 0 holds the totals */
#define CONTROL_LINE 4096

struct checkpoint {
    int used;
    int removed;              /* remove came while connections held it */
    int refs;
    char id[MP_ID_MAX + 1];
    uint8_t token[MP_TOKEN_LEN];
    int fd;
    uint64_t size;
    struct pagemap map;
    struct mc_slot *counters;
    int multicast;            /* mc is set up: the checkpoint has a group */
    struct mcsend mc;
    struct workingset ws;
};

struct connection {
    struct ms_server *server;
    int fd;
    int index;                /* in server->conn_fds */
    uint32_t receiver;        /* its host, for the pacer's reports */
};

struct ms_server {
    struct ms_config cfg;
    int listen_fd, control_fd, stop_fd;
    uint16_t port;
    pthread_mutex_t lock;     /* checkpoints, conn_fds, live */
    pthread_cond_t idle;      /* live reached 0 */
    struct checkpoint ck[MAX_CHECKPOINTS];
    int *conn_fds;            /* -1 when free; shut down on stop */
    int live;
    struct mc_file counters;
    struct mc_slot *totals;
    int udp_fd;               /* multicast goes out of it; -1: none */
};

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void set_timeout(int fd, int opt, int ms) {
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof tv);
}

/* Exactly len bytes, or -1 (EOF, error, timeout). */
static int read_full(int fd, void *buf, size_t len) {
    uint8_t *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int send_full(int fd, const struct iovec *iov_in, int count) {
    struct iovec iov[2];
    memcpy(iov, iov_in, sizeof(struct iovec) * (size_t)count);
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)count};
    while (msg.msg_iovlen) {
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        while (msg.msg_iovlen && (size_t)n >= msg.msg_iov->iov_len) {
            n -= (ssize_t)msg.msg_iov->iov_len;
            msg.msg_iov++;
            msg.msg_iovlen--;
        }
        if (msg.msg_iovlen) {
            msg.msg_iov->iov_base = (uint8_t *)msg.msg_iov->iov_base + n;
            msg.msg_iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* -- checkpoints ------------------------------------------------------------ */

static struct checkpoint *find_locked(struct ms_server *s, const char *id) {
    for (int i = 0; i < MAX_CHECKPOINTS; i++)
        if (s->ck[i].used && !s->ck[i].removed && strcmp(s->ck[i].id, id) == 0)
            return &s->ck[i];
    return NULL;
}

static void release_locked(struct checkpoint *c) {
    if (--c->refs > 0 || !c->removed)
        return;
    close(c->fd);
    pagemap_free(&c->map);
    if (c->multicast)
        mcsend_free(&c->mc);
    ws_free(&c->ws);
    memset(c, 0, sizeof *c);
}

int ms_add(struct ms_server *s, const char *id, const char *token_hex, const char *ram_path,
           const char *map_path, const char *group, uint64_t *size, const char **err) {
    uint8_t token[MP_TOKEN_LEN];
    struct sockaddr_in group_addr;
    if (!mp_id_valid(id, strlen(id)))
        return *err = "not a checkpoint id", -EINVAL;
    if (mp_token_from_hex(token_hex, token) < 0)
        return *err = "a token is 64 hex digits", -EINVAL;
    if (group && mcsend_parse_group(group, &group_addr) < 0)
        return *err = "a group is an IPv4 multicast ADDRESS:PORT", -EINVAL;
    if (group && s->udp_fd < 0)
        return *err = "this server was started without multicast", -EINVAL;
    int fd = open(ram_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return *err = "cannot open the RAM file", -errno;
    struct stat st;
    struct pagemap map;
    int rc = pagemap_load(map_path, &map);
    if (rc < 0) {
        close(fd);
        return *err = "not a page map (or none there)", rc;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != map.size) {
        close(fd);
        pagemap_free(&map);
        return *err = "the RAM file's size is not the map's", -EINVAL;
    }
    pthread_mutex_lock(&s->lock);
    struct checkpoint *slot = NULL;
    int index = 0;
    if (find_locked(s, id))
        *err = "a checkpoint of that id is served already", rc = -EEXIST;
    for (int i = 0; rc == 0 && i < MAX_CHECKPOINTS && !slot; i++)
        if (!s->ck[i].used)
            slot = &s->ck[i], index = i;
    if (rc == 0 && !slot)
        *err = "the server serves as many checkpoints as it can", rc = -ENOSPC;
    if (rc == 0 && (rc = ws_init(&slot->ws, map.size)) < 0)
        *err = "out of memory";
    if (rc == 0 && group) {
        rc = mcsend_init(&slot->mc, s->udp_fd, &group_addr, token, map.size,
                         s->cfg.mcast_rate ? s->cfg.mcast_rate : 64u << 20, err);
        if (rc < 0)
            ws_free(&slot->ws);
        slot->multicast = rc == 0;
    }
    if (rc == 0) {
        slot->used = 1;
        slot->refs = 1;               /* the table's own reference */
        snprintf(slot->id, sizeof slot->id, "%s", id);
        memcpy(slot->token, token, sizeof token);
        slot->fd = fd;
        slot->size = map.size;
        slot->map = map;
        slot->counters = s->counters.slot ? &s->counters.slot[index + 1] : NULL;
        if (slot->counters) {
            memset(slot->counters, 0, sizeof *slot->counters);
            snprintf(slot->counters->id, MC_ID_LEN, "%s", id);
        }
        *size = map.size;
    }
    pthread_mutex_unlock(&s->lock);
    if (rc) {
        close(fd);
        pagemap_free(&map);
    }
    return rc;
}

int ms_remove(struct ms_server *s, const char *id) {
    pthread_mutex_lock(&s->lock);
    struct checkpoint *c = find_locked(s, id);
    if (c) {
        c->removed = 1;
        release_locked(c);
    }
    pthread_mutex_unlock(&s->lock);
    return c ? 0 : -ENOENT;
}

int ms_save_workingset(struct ms_server *s, const char *id, const char *path) {
    pthread_mutex_lock(&s->lock);
    struct checkpoint *c = find_locked(s, id);
    if (c)
        c->refs++;
    pthread_mutex_unlock(&s->lock);
    if (!c)
        return -ENOENT;
    int rc = ws_save(&c->ws, path);
    pthread_mutex_lock(&s->lock);
    release_locked(c);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

/* -- a connection ---------------------------------------------------------- */

static int send_welcome(int fd, uint32_t status, uint64_t size) {
    uint8_t buf[MP_WELCOME_LEN];
    struct mp_welcome w = {.status = status, .size = size, .page_size = MP_PAGE, .max_request = MP_MAX_REQUEST};
    struct iovec iov = {buf, mp_encode_welcome(buf, &w)};
    return send_full(fd, &iov, 1);
}

static struct checkpoint *greet(struct ms_server *s, int fd) {
    uint8_t head[MP_HELLO_FIXED], id[MP_ID_MAX];
    struct mp_hello h;
    if (read_full(fd, head, sizeof head) < 0)
        return NULL;
    uint32_t st = mp_decode_hello_head(head, &h);
    if (st == MP_OK)
        st = read_full(fd, id, h.id_len) < 0 ? MP_E_MAGIC : mp_decode_hello_id(id, &h);
    struct checkpoint *c = NULL;
    if (st == MP_OK) {
        pthread_mutex_lock(&s->lock);
        c = find_locked(s, h.id);
        if (!c)
            st = MP_E_NO_CHECKPOINT;
        else if (!mp_token_equal(c->token, h.token))
            st = MP_E_TOKEN, c = NULL;
        else
            c->refs++;
        pthread_mutex_unlock(&s->lock);
    }
    if (st != MP_OK) {
        mc_add(s->totals, MC_refused, 1);
        send_welcome(fd, st, 0);
        return NULL;
    }
    if (send_welcome(fd, MP_OK, c->size) < 0) {
        pthread_mutex_lock(&s->lock);
        release_locked(c);
        pthread_mutex_unlock(&s->lock);
        return NULL;
    }
    return c;
}

static void count(struct mc_slot *slots[2], enum mc_field f, uint64_t v) {
    mc_add(slots[0], f, v);
    mc_add(slots[1], f, v);
}

static int serve_one(struct ms_server *s, struct checkpoint *c, struct connection *conn, uint8_t *buf) {
    int fd = conn->fd;
    uint8_t raw[MP_REQUEST_LEN], head[MP_REPLY_LEN];
    struct mp_request r;
    struct mc_slot *slots[2] = {s->totals, c->counters};
    if (read_full(fd, raw, sizeof raw) < 0)
        return -1;
    uint64_t t0 = now_us();
    uint32_t st = mp_decode_request(raw, &r);
    if (st != MP_OK) {                       /* not a request at all: the peer is not one of ours */
        count(slots, MC_bad_requests, 1);
        return -1;
    }
    st = __atomic_load_n(&c->removed, __ATOMIC_RELAXED) ? MP_E_NO_CHECKPOINT : mp_check_request(&r, c->size);
    uint32_t len = 0;
    if (st == MP_OK && (r.flags & MP_FLAG_REPORT)) {
        if (c->multicast)
            mcsend_report(&c->mc, conn->receiver, r.offset);
        count(slots, MC_mc_reports, 1);
    } else if (st == MP_OK) {
        if (!(r.flags & MP_FLAG_BACKGROUND))
            ws_record(&c->ws, r.offset, r.length);
        int by_group = c->multicast && (r.flags & MP_FLAG_MULTICAST);
        if (by_group && !mcsend_claim(&c->mc, r.offset, r.length)) {
            count(slots, MC_mc_suppressed, 1);     /* on its way to every host already */
            st = MP_MULTICAST;
        } else {
            ssize_t got = pread(c->fd, buf, r.length, (off_t)r.offset);
            if (got != (ssize_t)r.length)
                st = MP_E_IO;
            else if (by_group)
                st = mcsend_range(&c->mc, r.offset, r.length, buf, slots) == 0 ? MP_MULTICAST : MP_E_IO;
            else
                len = r.length;
        }
        if (r.flags & MP_FLAG_REPAIR) {
            count(slots, MC_repair_requests, 1);
            count(slots, MC_repair_bytes, r.length);
        }
    }
    struct mp_reply rep = {.req_id = r.req_id, .status = st, .length = len};
    struct iovec iov[2] = {{head, mp_encode_reply(head, &rep)}, {buf, len}};
    if (send_full(fd, iov, len ? 2 : 1) < 0)
        return -1;
    if (st == MP_OK || st == MP_MULTICAST) {
        if (r.length) {
            count(slots, MC_requests, 1);
            count(slots, MC_bytes_sent, len);
            count(slots, MC_zero_pages_asked,
                  r.length / MP_PAGE - pagemap_count(&c->map, r.offset / MP_PAGE, r.length / MP_PAGE));
            mc_latency(slots[0], now_us() - t0);
            mc_latency(slots[1], now_us() - t0);
        }
    } else {
        count(slots, st == MP_E_IO ? MC_io_errors : MC_bad_requests, 1);
    }
    return st == MP_E_NO_CHECKPOINT ? -1 : 0;
}

/* Which host a connection comes from: every memtap of one host reports as one receiver. */
static uint32_t peer_id(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    uint32_t h = 2166136261u;
    if (getpeername(fd, (struct sockaddr *)&ss, &len) < 0)
        return 0;
    const uint8_t *p = ss.ss_family == AF_INET ? (const uint8_t *)&((struct sockaddr_in *)&ss)->sin_addr
                                                : (const uint8_t *)&((struct sockaddr_in6 *)&ss)->sin6_addr;
    for (size_t i = 0; i < (ss.ss_family == AF_INET ? 4u : 16u); i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static void *connection_main(void *arg) {
    struct connection *conn = arg;
    struct ms_server *s = conn->server;
    int fd = conn->fd;
    set_timeout(fd, SO_RCVTIMEO, s->cfg.hello_timeout_ms);
    set_timeout(fd, SO_SNDTIMEO, s->cfg.send_timeout_ms);
    struct checkpoint *c = greet(s, fd);
    uint8_t *buf = c ? malloc(MP_MAX_REQUEST) : NULL;
    conn->receiver = peer_id(fd);
    if (c && buf) {
        set_timeout(fd, SO_RCVTIMEO, 0);     /* an idle memtap may wait long between faults */
        while (serve_one(s, c, conn, buf) == 0)
            ;
    }
    free(buf);
    pthread_mutex_lock(&s->lock);
    if (c)
        release_locked(c);
    s->conn_fds[conn->index] = -1;
    close(fd);
    if (--s->live == 0)
        pthread_cond_broadcast(&s->idle);
    pthread_mutex_unlock(&s->lock);
    free(conn);
    return NULL;
}

static void accept_one(struct ms_server *s) {
    int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    mc_add(s->totals, MC_connections, 1);
    pthread_mutex_lock(&s->lock);
    int index = -1;
    for (int i = 0; i < s->cfg.max_connections && index < 0; i++)
        if (s->conn_fds[i] < 0)
            index = i;
    struct connection *conn = index >= 0 ? malloc(sizeof *conn) : NULL;
    pthread_t tid;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 << 10);
    if (conn) {
        *conn = (struct connection){.server = s, .fd = fd, .index = index};
        s->conn_fds[index] = fd;
        s->live++;
        if (pthread_create(&tid, &attr, connection_main, conn) != 0) {
            s->conn_fds[index] = -1;
            s->live--;
            free(conn);
            conn = NULL;
        }
    }
    pthread_attr_destroy(&attr);
    pthread_mutex_unlock(&s->lock);
    if (!conn) {
        mc_add(s->totals, MC_refused, 1);
        set_timeout(fd, SO_SNDTIMEO, 1000);
        send_welcome(fd, MP_E_BUSY, 0);
        close(fd);
    }
}

/* -- the control socket ------------------------------------------------------ */

static void control_reply(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void control_reply(int fd, const char *fmt, ...) {
    char out[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, sizeof out - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof out - 2)
        n = (int)sizeof out - 2;
    out[n++] = '\n';
    struct iovec iov = {out, (size_t)n};
    send_full(fd, &iov, 1);
}

static void control_command(struct ms_server *s, int fd, char *line) {
    char *save = NULL, *words[6] = {0};
    int n = 0;
    for (char *w = strtok_r(line, " \t\r", &save); w && n < 6; w = strtok_r(NULL, " \t\r", &save))
        words[n++] = w;
    if (n == 1 && strcmp(words[0], "ping") == 0) {
        control_reply(fd, "ok %u", s->port);
    } else if ((n == 5 || n == 6) && strcmp(words[0], "add") == 0) {
        const char *err = "";
        uint64_t size = 0;
        int rc = ms_add(s, words[1], words[2], words[3], words[4], n == 6 ? words[5] : NULL, &size, &err);
        if (rc == 0)
            control_reply(fd, "ok %llu", (unsigned long long)size);
        else
            control_reply(fd, "error %s: %s", err, strerror(-rc));
    } else if (n == 2 && strcmp(words[0], "remove") == 0) {
        if (ms_remove(s, words[1]) == 0)
            control_reply(fd, "ok");
        else
            control_reply(fd, "error no such checkpoint");
    } else if (n == 3 && strcmp(words[0], "workingset") == 0) {
        int rc = ms_save_workingset(s, words[1], words[2]);
        if (rc >= 0)
            control_reply(fd, "ok %d", rc);
        else
            control_reply(fd, "error %s", rc == -ENOENT ? "no such checkpoint" : strerror(-rc));
    } else {
        control_reply(fd, "error commands: add ID TOKEN RAM MAP [GROUP:PORT] | remove ID | workingset ID PATH | ping");
    }
}

/* One client at a time, one command per line, until it closes: hostd's owner
 * class is the only client, and its commands are short. */
static void control_session(struct ms_server *s) {
    int fd = accept4(s->control_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return;
    set_timeout(fd, SO_RCVTIMEO, 5000);
    set_timeout(fd, SO_SNDTIMEO, 5000);
    char line[CONTROL_LINE];
    size_t used = 0;
    for (;;) {
        ssize_t got = recv(fd, line + used, sizeof line - 1 - used, 0);
        if (got <= 0)
            break;
        used += (size_t)got;
        line[used] = '\0';
        char *nl;
        while ((nl = memchr(line, '\n', used))) {
            *nl = '\0';
            control_command(s, fd, line);
            used -= (size_t)(nl + 1 - line);
            memmove(line, nl + 1, used);
            line[used] = '\0';
        }
        if (used == sizeof line - 1)
            break;                           /* a line longer than any command */
    }
    close(fd);
}

/* -- lifecycle --------------------------------------------------------------- */

static int listen_on(const struct ms_config *cfg, uint16_t *port, const char **err) {
    struct sockaddr_storage ss = {0};
    socklen_t len;
    struct sockaddr_in *in4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, cfg->listen_host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons(cfg->port);
        len = sizeof *in4;
    } else if (inet_pton(AF_INET6, cfg->listen_host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(cfg->port);
        len = sizeof *in6;
    } else {
        return *err = "the listen address is not a numeric IP address", -EINVAL;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0)
        return *err = "socket", -errno;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, len) < 0 || listen(fd, 128) < 0) {
        int e = -errno;
        close(fd);
        return *err = "cannot listen on that address and port", e;
    }
    getsockname(fd, (struct sockaddr *)&ss, &len);
    *port = ntohs(ss.ss_family == AF_INET ? in4->sin_port : in6->sin6_port);
    return fd;
}

static int control_socket(const char *path, const char **err) {
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof un.sun_path)
        return *err = "the control socket's path is too long", -ENAMETOOLONG;
    strcpy(un.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return *err = "socket", -errno;
    unlink(path);
    mode_t old = umask(077);                 /* hostd only */
    int rc = bind(fd, (struct sockaddr *)&un, sizeof un);
    umask(old);
    if (rc < 0 || listen(fd, 8) < 0) {
        int e = -errno;
        close(fd);
        return *err = "cannot create the control socket", e;
    }
    return fd;
}

/* Multicast leaves from mcast_if, one hop (the hosts' network), and loops
 * back to this host's own memtaps of the group. */
static int multicast_socket(const struct ms_config *cfg, const char **err) {
    struct in_addr from;
    if (inet_pton(AF_INET, cfg->mcast_if, &from) != 1)
        return *err = "the multicast address is not a numeric IPv4 address", -EINVAL;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return *err = "socket", -errno;
    unsigned char ttl = (unsigned char)(cfg->mcast_ttl > 0 && cfg->mcast_ttl < 256 ? cfg->mcast_ttl : 1), loop = 1;
    int sndbuf = 4 << 20;
    if (setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &from, sizeof from) < 0 ||
        setsockopt(fd, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof ttl) < 0 ||
        setsockopt(fd, IPPROTO_IP, IP_MULTICAST_LOOP, &loop, sizeof loop) < 0) {
        int e = -errno;
        close(fd);
        return *err = "cannot send multicast from that address", e;
    }
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    return fd;
}

int ms_create(const struct ms_config *cfg, struct ms_server **out, const char **err) {
    struct ms_server *s = calloc(1, sizeof *s);
    if (!s)
        return *err = "out of memory", -ENOMEM;
    s->cfg = *cfg;
    if (s->cfg.max_connections <= 0)
        s->cfg.max_connections = 256;
    if (s->cfg.hello_timeout_ms <= 0)
        s->cfg.hello_timeout_ms = 10000;
    if (s->cfg.send_timeout_ms <= 0)
        s->cfg.send_timeout_ms = 30000;
    s->listen_fd = s->control_fd = s->stop_fd = s->udp_fd = -1;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->idle, NULL);
    int rc = 0;
    s->conn_fds = malloc(sizeof(int) * (size_t)s->cfg.max_connections);
    if (!s->conn_fds)
        rc = -ENOMEM, *err = "out of memory";
    for (int i = 0; rc == 0 && i < s->cfg.max_connections; i++)
        s->conn_fds[i] = -1;
    if (rc == 0 && cfg->counters_path) {
        rc = mc_open(cfg->counters_path, MC_SERVER_SLOTS, &s->counters);
        if (rc < 0)
            *err = "cannot create the counters file";
        else
            s->totals = &s->counters.slot[0], snprintf(s->totals->id, MC_ID_LEN, "*");
    }
    if (rc == 0 && (s->listen_fd = listen_on(cfg, &s->port, err)) < 0)
        rc = s->listen_fd;
    if (rc == 0 && (s->control_fd = control_socket(cfg->control_path, err)) < 0)
        rc = s->control_fd;
    if (rc == 0 && (s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
        rc = -errno, *err = "eventfd";
    if (rc == 0 && cfg->mcast_if && (s->udp_fd = multicast_socket(cfg, err)) < 0)
        rc = s->udp_fd;
    if (rc < 0) {
        ms_destroy(s);
        return rc;
    }
    *out = s;
    return 0;
}

uint16_t ms_port(const struct ms_server *s) { return s->port; }

void ms_stop(struct ms_server *s) {
    uint64_t one = 1;
    ssize_t ignored = write(s->stop_fd, &one, sizeof one);
    (void)ignored;
}

int ms_run(struct ms_server *s) {
    struct pollfd fds[3] = {{s->listen_fd, POLLIN, 0}, {s->control_fd, POLLIN, 0}, {s->stop_fd, POLLIN, 0}};
    for (;;) {
        if (poll(fds, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (fds[2].revents)
            break;
        if (fds[0].revents & POLLIN)
            accept_one(s);
        if (fds[1].revents & POLLIN)
            control_session(s);
    }
    /* Stop: no new connections (open, the listening socket would still take
     * them into its backlog, and a memtap that dials now would wait out its
     * whole timeout instead of being refused at once); then end every
     * connection and wait for its thread. */
    close(s->listen_fd);
    s->listen_fd = -1;
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < s->cfg.max_connections; i++)
        if (s->conn_fds[i] >= 0)
            shutdown(s->conn_fds[i], SHUT_RDWR);
    while (s->live > 0)
        pthread_cond_wait(&s->idle, &s->lock);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void ms_destroy(struct ms_server *s) {
    if (!s)
        return;
    for (int i = 0; i < MAX_CHECKPOINTS; i++)
        if (s->ck[i].used) {
            close(s->ck[i].fd);
            pagemap_free(&s->ck[i].map);
            if (s->ck[i].multicast)
                mcsend_free(&s->ck[i].mc);
            ws_free(&s->ck[i].ws);
        }
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    if (s->control_fd >= 0) {
        close(s->control_fd);
        unlink(s->cfg.control_path);
    }
    if (s->stop_fd >= 0)
        close(s->stop_fd);
    if (s->udp_fd >= 0)
        close(s->udp_fd);
    mc_close(&s->counters);
    free(s->conn_fds);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->idle);
    free(s);
}
