/* Unit tests of the lazy-memory path's C code (native/memory): the protocol's
 * records, the page map, the counters file, the memory server and the
 * fetcher, over real TCP sockets on 127.0.0.1. Built with AddressSanitizer
 * and UBSan (make memory-test); run by tests/unit/test_native_memory.py.
 *
 * No framework: CHECK counts checks and failures and says where one failed.
 * Exit 0 when every check passed, else 1.
 */
#define _GNU_SOURCE
#include "counters.h"
#include "fetch.h"
#include "pagemap.h"
#include "protocol.h"
#include "server.h"
#include "workingset.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static unsigned long checks, failures;

#define CHECK(expr)                                                                 \
    do {                                                                            \
        __atomic_fetch_add(&checks, 1, __ATOMIC_RELAXED);                           \
        if (!(expr)) {                                                              \
            __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);                     \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #expr); \
        }                                                                           \
    } while (0)

#define RAM_PAGES 2048u                       /* 8 MiB */
#define RAM_SIZE ((uint64_t)RAM_PAGES * MP_PAGE)
#define MAX_PAGES (MP_MAX_REQUEST / MP_PAGE)  /* 256 */
#define ZERO_RUN_FIRST 1024u                  /* pages [1024, 1280): a whole request of zeros */
#define TOKEN_HEX "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"
#define OTHER_TOKEN_HEX "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543211"

static uint8_t *ram;                           /* what the RAM file holds */
static uint8_t nonzero[RAM_PAGES];             /* 1: page i has data */
static uint8_t token[MP_TOKEN_LEN];
static uint64_t zero_asked;                    /* zero pages inside ranges server 1 served */
static char dir[64], ram_path[128], map_path[128], ctl_path[128], counters_path[128], ctl2_path[128];

/* -- small helpers ------------------------------------------------------------ */

static uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    return *s = x;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static uint64_t zero_pages_in(uint64_t offset, uint32_t length) {
    uint64_t n = 0;
    for (uint64_t p = offset / MP_PAGE; p < (offset + length) / MP_PAGE; p++)
        n += !nonzero[p];
    return n;
}

static int same_as_ram(uint64_t offset, uint32_t length, const uint8_t *buf) {
    return memcmp(ram + offset, buf, length) == 0;
}

static int thread_count(void) {
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    if (!d)
        return -1;
    for (struct dirent *e; (e = readdir(d));)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

/* Wait (up to ms) until at most `max` threads are left: 1 if they are. */
static int wait_threads(int max, int ms) {
    uint64_t end = now_ms() + (uint64_t)ms;
    while (thread_count() > max) {
        if (now_ms() > end)
            return 0;
        sleep_ms(20);
    }
    return 1;
}

static int write_file(const char *path, const void *buf, size_t len) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, buf, len);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

static uint8_t *read_whole(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    uint8_t *buf = malloc((size_t)st.st_size + 1);
    ssize_t n = buf ? pread(fd, buf, (size_t)st.st_size, 0) : -1;
    close(fd);
    if (n != st.st_size) {
        free(buf);
        return NULL;
    }
    *len = (size_t)st.st_size;
    return buf;
}

/* -- a raw client of the memory protocol ------------------------------------- */

static int tcp_listen(uint16_t *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t len = sizeof a;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 16) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

static int tcp_connect(uint16_t port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    /* No test waits forever on a server that does not answer. */
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

static int send_all(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n, len -= (size_t)n;
    }
    return 0;
}

static int recv_all(int fd, void *buf, size_t len) {
    uint8_t *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n, len -= (size_t)n;
    }
    return 0;
}

/* What the next recv says: 0 EOF, -1 reset, -2 timeout or other error, 1 data. */
static int next_recv(int fd) {
    uint8_t b;
    ssize_t n;
    do
        n = recv(fd, &b, 1, 0);
    while (n < 0 && errno == EINTR);
    return n == 0 ? 0 : n > 0 ? 1 : errno == ECONNRESET ? -1 : -2;
}

/* The server closed: EOF, or a reset when it closed with bytes of ours unread. */
static int closed_by_server(int fd) {
    int r = next_recv(fd);
    return r == 0 || r == -1;
}

/* Send raw hello bytes and read the welcome: its status, or -1 (no welcome). */
static int64_t welcome_after(int fd, const uint8_t *hello, size_t len, struct mp_welcome *w) {
    uint8_t raw[MP_WELCOME_LEN];
    struct mp_welcome tmp;
    if (!w)
        w = &tmp;
    if (send_all(fd, hello, len) < 0 || recv_all(fd, raw, sizeof raw) < 0 || mp_decode_welcome(raw, w) != MP_OK)
        return -1;
    return w->status;
}

static int64_t say_hello(int fd, const uint8_t tok[MP_TOKEN_LEN], const char *id, struct mp_welcome *w) {
    uint8_t hello[MP_HELLO_FIXED + 128];
    size_t len = mp_encode_hello(hello, tok, id);
    return welcome_after(fd, hello, len, w);
}

/* A connection to `id` past its welcome, or -1. */
static int session(uint16_t port, const char *id) {
    int fd = tcp_connect(port);
    if (fd < 0)
        return -1;
    if (say_hello(fd, token, id, NULL) != MP_OK) {
        close(fd);
        return -1;
    }
    return fd;
}

/* One request: the reply's status (data into dst when 0), or -1 when the
 * connection ended or the reply is not the one asked for. */
static int64_t ask(int fd, uint32_t req_id, uint64_t offset, uint32_t length, uint32_t flags, uint8_t *dst) {
    uint8_t raw[MP_REQUEST_LEN], head[MP_REPLY_LEN];
    struct mp_request r = {.req_id = req_id, .offset = offset, .length = length, .flags = flags};
    struct mp_reply rep;
    mp_encode_request(raw, &r);
    if (send_all(fd, raw, sizeof raw) < 0 || recv_all(fd, head, sizeof head) < 0)
        return -1;
    if (mp_decode_reply(head, &rep) != MP_OK || rep.req_id != req_id)
        return -1;
    if (rep.status != MP_OK)
        return rep.length == 0 ? (int64_t)rep.status : -1;
    if (rep.length != length || recv_all(fd, dst, length) < 0)
        return -1;
    return MP_OK;
}

/* A good request on server 1: 1 when the data is the file's (and counted). */
static int ask_good(int fd, uint32_t req_id, uint64_t offset, uint32_t length, uint8_t *buf) {
    if (ask(fd, req_id, offset, length, 0, buf) != MP_OK)
        return 0;
    __atomic_fetch_add(&zero_asked, zero_pages_in(offset, length), __ATOMIC_RELAXED);
    return same_as_ram(offset, length, buf);
}

/* -- the protocol's pure code ------------------------------------------------- */

static void test_protocol(void) {
    uint8_t buf[MP_HELLO_FIXED + MP_ID_MAX];
    struct mp_hello h;
    size_t len = mp_encode_hello(buf, token, "ck-1");
    CHECK(len == MP_HELLO_FIXED + 4);
    CHECK(memcmp(buf, "SFMH", 4) == 0);
    CHECK(mp_decode_hello_head(buf, &h) == MP_OK && h.version == MP_VERSION && h.id_len == 4);
    CHECK(memcmp(h.token, token, MP_TOKEN_LEN) == 0);
    CHECK(mp_decode_hello_id(buf + MP_HELLO_FIXED, &h) == MP_OK && strcmp(h.id, "ck-1") == 0);

    struct mp_welcome w = {.status = 9, .size = 0x123456789abcdef0ull, .page_size = MP_PAGE, .max_request = 7}, w2;
    uint8_t wb[MP_WELCOME_LEN];
    CHECK(mp_encode_welcome(wb, &w) == MP_WELCOME_LEN && memcmp(wb, "SFMW", 4) == 0);
    CHECK(mp_decode_welcome(wb, &w2) == MP_OK && w2.status == 9 && w2.size == w.size && w2.page_size == MP_PAGE &&
          w2.max_request == 7);
    wb[0] ^= 1;
    CHECK(mp_decode_welcome(wb, &w2) == MP_E_MAGIC);

    struct mp_request r = {.req_id = 77, .offset = 1ull << 40, .length = MP_PAGE, .flags = 0}, r2;
    uint8_t rb[MP_REQUEST_LEN];
    CHECK(mp_encode_request(rb, &r) == MP_REQUEST_LEN && memcmp(rb, "SFMQ", 4) == 0);
    CHECK(mp_decode_request(rb, &r2) == MP_OK && r2.req_id == 77 && r2.offset == r.offset && r2.length == MP_PAGE);
    r.flags = MP_FLAG_MULTICAST | MP_FLAG_BACKGROUND | MP_FLAG_REPAIR;
    mp_encode_request(rb, &r);
    CHECK(mp_decode_request(rb, &r2) == MP_OK && r2.flags == r.flags);
    CHECK(mp_check_request(&r2, 1ull << 41) == MP_OK);
    r.flags = 0x10;
    mp_encode_request(rb, &r);
    CHECK(mp_decode_request(rb, &r2) == MP_E_FLAGS);
    r2 = (struct mp_request){.offset = 5000000, .length = 0, .flags = MP_FLAG_REPORT};
    CHECK(mp_check_request(&r2, MP_PAGE) == MP_OK);          /* a report: offset is a rate */
    r2.length = MP_PAGE;
    CHECK(mp_check_request(&r2, MP_PAGE) == MP_E_FLAGS);     /* a report carries no range */
    r2 = (struct mp_request){.length = 0, .flags = MP_FLAG_REPORT | MP_FLAG_MULTICAST};
    CHECK(mp_check_request(&r2, MP_PAGE) == MP_E_FLAGS);

    struct mp_reply p = {.req_id = 5, .status = MP_E_RANGE, .length = 0}, p2;
    uint8_t pb[MP_REPLY_LEN];
    CHECK(mp_encode_reply(pb, &p) == MP_REPLY_LEN && memcmp(pb, "SFMA", 4) == 0);
    CHECK(mp_decode_reply(pb, &p2) == MP_OK && p2.req_id == 5 && p2.status == MP_E_RANGE && p2.length == 0);

    CHECK(mp_id_valid("a", 1) && mp_id_valid("A.b_c-9", 7));
    CHECK(!mp_id_valid("", 0) && !mp_id_valid(".a", 2) && !mp_id_valid("a/b", 3) && !mp_id_valid("a b", 3));
    char long_id[MP_ID_MAX + 2];
    memset(long_id, 'x', sizeof long_id - 1);
    long_id[MP_ID_MAX + 1] = '\0';
    CHECK(mp_id_valid(long_id, MP_ID_MAX) && !mp_id_valid(long_id, MP_ID_MAX + 1));

    struct mp_request q = {.offset = 0, .length = MP_PAGE};
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_OK);
    q.length = 0;
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_E_LENGTH);
    q.length = MP_MAX_REQUEST + MP_PAGE;
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_E_LENGTH);
    q.length = MP_MAX_REQUEST;
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_OK);
    q.length = 100;
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_E_ALIGN);
    q.length = MP_PAGE, q.offset = 100;
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_E_ALIGN);
    q.offset = RAM_SIZE - MP_PAGE;
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_OK);
    q.offset = RAM_SIZE;
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_E_RANGE);
    q.offset = RAM_SIZE - MP_PAGE, q.length = 2 * MP_PAGE;
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_E_RANGE);
    q.offset = UINT64_MAX & ~(uint64_t)(MP_PAGE - 1), q.length = MP_PAGE;
    CHECK(mp_check_range(&q, RAM_SIZE) == MP_E_RANGE);
    CHECK(mp_check_range(&q, UINT64_MAX) == MP_E_RANGE);   /* offset + length would wrap */

    uint8_t t[MP_TOKEN_LEN], t2[MP_TOKEN_LEN];
    CHECK(mp_token_from_hex(TOKEN_HEX, t) == 0 && t[0] == 0x00 && t[1] == 0x11 && t[31] == 0x10);
    CHECK(mp_token_from_hex(OTHER_TOKEN_HEX, t2) == 0 && !mp_token_equal(t, t2) && mp_token_equal(t, t));
    CHECK(mp_token_from_hex("abc", t2) < 0);
    CHECK(mp_token_from_hex(TOKEN_HEX "0", t2) < 0);
    char bad_hex[] = TOKEN_HEX;
    bad_hex[10] = 'g';
    CHECK(mp_token_from_hex(bad_hex, t2) < 0);
    CHECK(strcmp(mp_status_name(MP_OK), "ok") == 0 && strcmp(mp_status_name(12345), "unknown status") == 0);
    for (uint32_t s = 0; s < MP_STATUS_COUNT; s++)
        CHECK(mp_status_name(s) != NULL);
}

/* -- the RAM file and its page map ---------------------------------------------- */

static void make_ram(void) {
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    ram = calloc(1, RAM_SIZE);
    for (uint32_t p = 0; p < RAM_PAGES; p++) {
        /* The first MiB all data (the abandoned 1 MiB request's range), a MiB of
         * zeros at ZERO_RUN_FIRST, elsewhere a page in four, and the last page. */
        int data = p < MAX_PAGES || p == RAM_PAGES - 1 ||
                   (!(p >= ZERO_RUN_FIRST && p < ZERO_RUN_FIRST + MAX_PAGES) && rng_next(&seed) % 4 == 0);
        if (data)
            for (uint32_t i = 0; i < MP_PAGE; i += 8) {
                uint64_t v = rng_next(&seed);
                memcpy(ram + (uint64_t)p * MP_PAGE + i, &v, 8);
            }
        nonzero[p] = (uint8_t)data;
    }
    /* Pages with one byte of data, at either end of the page. */
    nonzero[300] = nonzero[301] = 1;
    memset(ram + 300ull * MP_PAGE, 0, 2 * MP_PAGE);
    ram[301ull * MP_PAGE - 1] = 1;
    ram[301ull * MP_PAGE] = 0x80;
    /* A page of data that is all zeros after all: the map must say zero. */
    memset(ram + 302ull * MP_PAGE, 0, MP_PAGE);
    nonzero[302] = 0;

    /* Sparse: holes where the zeros are, written zeros at page 302. */
    int fd = open(ram_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    CHECK(fd >= 0 && ftruncate(fd, (off_t)RAM_SIZE) == 0);
    for (uint32_t p = 0; p < RAM_PAGES; p++)
        if (nonzero[p] || p == 302)
            CHECK(pwrite(fd, ram + (uint64_t)p * MP_PAGE, MP_PAGE, (off_t)p * MP_PAGE) == MP_PAGE);
    close(fd);
}

static void test_pagemap(void) {
    struct pagemap map, loaded;
    uint64_t count = 0, expect = 0, seed = 42;
    for (uint32_t p = 0; p < RAM_PAGES; p++)
        expect += nonzero[p];
    CHECK(pagemap_scan(ram_path, &map, &count) == 0);
    CHECK(count == expect);
    CHECK(map.size == RAM_SIZE && map.pages == RAM_PAGES);
    int same = 1;
    for (uint32_t p = 0; p < RAM_PAGES; p++)
        same &= pagemap_test(&map, p) == nonzero[p];
    CHECK(same);
    CHECK(!pagemap_test(&map, RAM_PAGES) && !pagemap_test(&map, UINT64_MAX));
    CHECK(pagemap_save(&map, map_path) == 0);
    CHECK(pagemap_load(map_path, &loaded) == 0);
    CHECK(loaded.size == RAM_SIZE && loaded.pages == RAM_PAGES && memcmp(loaded.bits, map.bits, RAM_PAGES / 8) == 0);

    /* pagemap_count against a count done here, ranges past the end included. */
    CHECK(pagemap_count(&loaded, 0, RAM_PAGES) == expect);
    CHECK(pagemap_count(&loaded, 0, 0) == 0);
    CHECK(pagemap_count(&loaded, ZERO_RUN_FIRST, MAX_PAGES) == 0);
    CHECK(pagemap_count(&loaded, RAM_PAGES - 1, 10) == 1);
    CHECK(pagemap_count(&loaded, RAM_PAGES + 5, 10) == 0);
    int agree = 1;
    for (int i = 0; i < 500; i++) {
        uint64_t first = rng_next(&seed) % RAM_PAGES, n = rng_next(&seed) % 400, manual = 0;
        for (uint64_t p = first; p < first + n && p < RAM_PAGES; p++)
            manual += nonzero[p];
        agree &= pagemap_count(&loaded, first, n) == manual;
    }
    CHECK(agree);
    pagemap_free(&map);
    pagemap_free(&loaded);
    CHECK(loaded.bits == NULL && loaded.pages == 0);

    /* Corrupt map files: each is -EINVAL. */
    size_t len;
    uint8_t *good = read_whole(map_path, &len);
    CHECK(good && len == PAGEMAP_HEADER + RAM_PAGES / 8);
    if (!good)
        return;
    char bad[160];
    snprintf(bad, sizeof bad, "%s/bad.map", dir);
    uint8_t *copy = malloc(len);

    memcpy(copy, good, len);
    copy[0] = 'X';                                         /* bad magic */
    CHECK(write_file(bad, copy, len) == 0 && pagemap_load(bad, &map) == -EINVAL && map.bits == NULL);
    CHECK(write_file(bad, good, len - 1) == 0 && pagemap_load(bad, &map) == -EINVAL);   /* truncated bitmap */
    CHECK(write_file(bad, good, PAGEMAP_HEADER) == 0 && pagemap_load(bad, &map) == -EINVAL);
    CHECK(write_file(bad, good, 10) == 0 && pagemap_load(bad, &map) == -EINVAL);        /* truncated header */
    CHECK(write_file(bad, good, 0) == 0 && pagemap_load(bad, &map) == -EINVAL);
    memcpy(copy, good, len);
    copy[8] = 100;                      /* RAM size 8 MiB + 100: same bitmap length, not a page multiple */
    CHECK(write_file(bad, copy, len) == 0 && pagemap_load(bad, &map) == -EINVAL);
    memcpy(copy, good, len);
    copy[17] = 0x20;                                       /* page size 8192 */
    CHECK(write_file(bad, copy, len) == 0 && pagemap_load(bad, &map) == -EINVAL);
    memcpy(copy, good, len);
    memset(copy + 8, 0, 8);                                /* size 0 */
    CHECK(write_file(bad, copy, PAGEMAP_HEADER) == 0 && pagemap_load(bad, &map) == -EINVAL);
    memcpy(copy, good, len);
    memset(copy + 8, 0, 8);
    copy[14] = 1;                                          /* 256 TiB: no huge allocation */
    CHECK(write_file(bad, copy, len) == 0 && pagemap_load(bad, &map) == -EINVAL);
    memset(copy + 8, 0xff, 8);
    copy[8] = 0, copy[9] = 0xf0;                           /* 2^64 - 4096: pages must not wrap */
    CHECK(write_file(bad, copy, len) == 0 && pagemap_load(bad, &map) == -EINVAL);
    char missing[160];
    snprintf(missing, sizeof missing, "%s/none.map", dir);
    CHECK(pagemap_load(missing, &map) == -ENOENT);
    CHECK(pagemap_scan(missing, &map, NULL) == -ENOENT);
    free(copy);
    free(good);
    unlink(bad);
}

/* -- the server ------------------------------------------------------------------ */

static void *run_server(void *arg) {
    ms_run(arg);
    return NULL;
}

static void test_add(struct ms_server *s) {
    uint64_t size = 0;
    const char *err = NULL;
    CHECK(ms_add(s, "ck-1", TOKEN_HEX, ram_path, map_path, NULL, &size, &err) == 0 && size == RAM_SIZE);
    err = NULL;
    CHECK(ms_add(s, "ck-1", TOKEN_HEX, ram_path, map_path, NULL, &size, &err) == -EEXIST && err);
    CHECK(ms_add(s, "../x", TOKEN_HEX, ram_path, map_path, NULL, &size, &err) == -EINVAL);
    CHECK(ms_add(s, "ck-9", "abc", ram_path, map_path, NULL, &size, &err) == -EINVAL);
    CHECK(ms_add(s, "ck-9", TOKEN_HEX, "/nonexistent/ram", map_path, NULL, &size, &err) == -ENOENT);
    CHECK(ms_add(s, "ck-9", TOKEN_HEX, ram_path, "/nonexistent/map", NULL, &size, &err) == -ENOENT);
    /* A map of another size than the RAM file. */
    char small[160];
    snprintf(small, sizeof small, "%s/small.map", dir);
    struct pagemap m = {.size = MP_PAGE, .pages = 1, .bits = calloc(1, 1)};
    CHECK(pagemap_save(&m, small) == 0);
    pagemap_free(&m);
    err = NULL;
    CHECK(ms_add(s, "ck-9", TOKEN_HEX, ram_path, small, NULL, &size, &err) == -EINVAL && err);
    unlink(small);
    CHECK(ms_add(s, "ck-2", TOKEN_HEX, ram_path, map_path, NULL, &size, &err) == 0);
}

static void test_good_requests(uint16_t port) {
    uint8_t *buf = malloc(MP_MAX_REQUEST);
    struct mp_welcome w;
    int fd = tcp_connect(port);
    CHECK(fd >= 0);
    CHECK(say_hello(fd, token, "ck-1", &w) == MP_OK);
    CHECK(w.size == RAM_SIZE && w.page_size == MP_PAGE && w.max_request == MP_MAX_REQUEST);
    CHECK(ask_good(fd, 1, 0, MP_PAGE, buf));
    CHECK(ask_good(fd, 2, 300ull * MP_PAGE, 3 * MP_PAGE, buf));          /* the one-byte pages, page 302 */
    CHECK(ask_good(fd, 3, RAM_SIZE - MP_PAGE, MP_PAGE, buf));            /* the last page */
    CHECK(ask_good(fd, 4, 512ull * MP_PAGE, MP_MAX_REQUEST, buf));       /* the whole max length */
    CHECK(ask_good(fd, 5, (uint64_t)ZERO_RUN_FIRST * MP_PAGE, MP_MAX_REQUEST, buf));  /* 256 zero pages */
    CHECK(ask_good(fd, 6, RAM_SIZE - MP_MAX_REQUEST, MP_MAX_REQUEST, buf));
    CHECK(ask_good(fd, 7, 77ull * MP_PAGE, 17 * MP_PAGE, buf));
    close(fd);
    free(buf);
}

static void test_hellos(uint16_t port) {
    uint8_t hello[MP_HELLO_FIXED + 128], wrong[MP_TOKEN_LEN];
    int fd;

    /* Wrong token: refused, and the server closes (it read the whole hello: EOF). */
    memcpy(wrong, token, sizeof wrong);
    wrong[31] ^= 1;
    fd = tcp_connect(port);
    CHECK(say_hello(fd, wrong, "ck-1", NULL) == MP_E_TOKEN);
    CHECK(next_recv(fd) == 0);
    close(fd);

    /* Ids that are unknown or not ids. */
    const char *bad_ids[] = {"nope", "", "ck/1", ".ck-1", "ck 1", "ck-1/../ck-1"};
    for (size_t i = 0; i < sizeof bad_ids / sizeof *bad_ids; i++) {
        fd = tcp_connect(port);
        CHECK(say_hello(fd, token, bad_ids[i], NULL) == MP_E_NO_CHECKPOINT);
        CHECK(closed_by_server(fd));
        close(fd);
    }
    char id65[MP_ID_MAX + 2];
    memset(id65, 'a', MP_ID_MAX + 1);
    id65[MP_ID_MAX + 1] = '\0';
    fd = tcp_connect(port);
    CHECK(say_hello(fd, token, id65, NULL) == MP_E_NO_CHECKPOINT);
    CHECK(closed_by_server(fd));
    close(fd);

    /* Bad magic: server.c answers with a welcome of status MP_E_MAGIC, then closes. */
    size_t len = mp_encode_hello(hello, token, "ck-1");
    memcpy(hello, "GET ", 4);
    fd = tcp_connect(port);
    CHECK(welcome_after(fd, hello, len, NULL) == MP_E_MAGIC);
    CHECK(closed_by_server(fd));
    close(fd);

    /* Bad version. */
    len = mp_encode_hello(hello, token, "ck-1");
    hello[4] = MP_VERSION + 1;
    fd = tcp_connect(port);
    CHECK(welcome_after(fd, hello, len, NULL) == MP_E_VERSION);
    CHECK(closed_by_server(fd));
    close(fd);

    /* An id_len longer than the id sent, then silence: after the hello
     * timeout, server.c answers MP_E_MAGIC (a cut hello) and closes. */
    len = mp_encode_hello(hello, token, "ck-1");
    hello[6] = 10;
    fd = tcp_connect(port);
    uint64_t t0 = now_ms();
    CHECK(welcome_after(fd, hello, len, NULL) == MP_E_MAGIC);
    CHECK(now_ms() - t0 >= 250);
    CHECK(next_recv(fd) == 0);
    close(fd);
}

static void test_bad_requests(uint16_t port) {
    uint8_t *buf = malloc(MP_MAX_REQUEST);
    int fd = session(port, "ck-1");
    CHECK(fd >= 0);
    CHECK(ask(fd, 10, 100, MP_PAGE, 0, buf) == MP_E_ALIGN);             /* misaligned offset */
    CHECK(ask_good(fd, 11, 0, MP_PAGE, buf));                            /* still usable */
    CHECK(ask(fd, 12, MP_PAGE, 100, 0, buf) == MP_E_ALIGN);             /* misaligned length */
    CHECK(ask(fd, 13, MP_PAGE, MP_PAGE + 1, 0, buf) == MP_E_ALIGN);
    CHECK(ask_good(fd, 14, MP_PAGE, MP_PAGE, buf));
    CHECK(ask(fd, 15, RAM_SIZE, MP_PAGE, 0, buf) == MP_E_RANGE);        /* just past the end */
    CHECK(ask(fd, 16, RAM_SIZE - MP_PAGE, 2 * MP_PAGE, 0, buf) == MP_E_RANGE);
    CHECK(ask(fd, 17, UINT64_MAX & ~(uint64_t)(MP_PAGE - 1), MP_PAGE, 0, buf) == MP_E_RANGE);  /* would wrap */
    CHECK(ask(fd, 18, UINT64_MAX - MP_MAX_REQUEST + 1, MP_MAX_REQUEST, 0, buf) == MP_E_RANGE);
    CHECK(ask(fd, 19, 1ull << 40, MP_PAGE, 0, buf) == MP_E_RANGE);
    CHECK(ask(fd, 20, 0, 0, 0, buf) == MP_E_LENGTH);
    CHECK(ask(fd, 21, 0, MP_MAX_REQUEST + MP_PAGE, 0, buf) == MP_E_LENGTH);
    CHECK(ask(fd, 22, 0, UINT32_MAX, 0, buf) == MP_E_LENGTH);
    CHECK(ask_good(fd, 23, RAM_SIZE - MP_PAGE, MP_PAGE, buf));          /* still usable */
    /* Unknown flags: not a request of this protocol, the server closes. */
    CHECK(ask(fd, 24, 0, MP_PAGE, 0x100, buf) == -1);
    CHECK(next_recv(fd) == 0);
    close(fd);

    /* Bad request magic: closed too. */
    fd = session(port, "ck-1");
    CHECK(fd >= 0);
    uint8_t raw[MP_REQUEST_LEN];
    struct mp_request r = {.req_id = 1, .offset = 0, .length = MP_PAGE};
    mp_encode_request(raw, &r);
    memcpy(raw, "SFMX", 4);
    CHECK(send_all(fd, raw, sizeof raw) == 0);
    CHECK(next_recv(fd) == 0);
    close(fd);
    free(buf);
}

/* Peers that ask for 1 MiB, read the reply's head and go: their threads end. */
static void test_abandoning_peers(uint16_t port, int baseline) {
    for (int i = 0; i < 16; i++) {
        int fd = session(port, "ck-1");
        uint8_t raw[MP_REQUEST_LEN], head[MP_REPLY_LEN];
        struct mp_request r = {.req_id = 1, .offset = 0, .length = MP_MAX_REQUEST};   /* all data pages */
        mp_encode_request(raw, &r);
        CHECK(fd >= 0 && send_all(fd, raw, sizeof raw) == 0 && recv_all(fd, head, sizeof head) == 0);
        close(fd);
    }
    uint8_t *buf = malloc(MP_MAX_REQUEST);
    int fd = session(port, "ck-1");
    CHECK(fd >= 0 && ask_good(fd, 1, 5ull * MP_PAGE, MP_MAX_REQUEST, buf));
    close(fd);
    free(buf);
    CHECK(wait_threads(baseline, 5000));
}

static void test_half_hello(uint16_t port) {
    uint8_t hello[MP_HELLO_FIXED + 8];
    mp_encode_hello(hello, token, "ck-1");
    int fd = tcp_connect(port);
    uint64_t t0 = now_ms();
    CHECK(send_all(fd, hello, 20) == 0);
    CHECK(next_recv(fd) == 0);                   /* dropped without a welcome */
    uint64_t took = now_ms() - t0;
    CHECK(took >= 250 && took < 3000);           /* hello_timeout_ms is 300 */
    close(fd);
}

/* -- many clients at once ------------------------------------------------------- */

struct worker {
    pthread_t th;
    uint16_t port;
    struct fetcher *f;        /* NULL: a raw connection of its own */
    uint64_t seed;
    int done, bad;
};

static void *worker_main(void *arg) {
    struct worker *wk = arg;
    uint8_t *buf = malloc(MP_MAX_REQUEST);
    int fd = wk->f ? -1 : session(wk->port, "ck-1");
    if (!buf || (!wk->f && fd < 0)) {
        wk->bad = 1;
        goto out;
    }
    for (int i = 0; i < 40; i++) {
        uint64_t page = rng_next(&wk->seed) % RAM_PAGES, room = RAM_PAGES - page;
        uint64_t pages = 1 + rng_next(&wk->seed) % (room < MAX_PAGES ? room : MAX_PAGES);
        uint64_t offset = page * MP_PAGE;
        uint32_t length = (uint32_t)(pages * MP_PAGE);
        int ok;
        if (wk->f) {
            ok = fetcher_get(wk->f, offset, length, buf) == 0 && same_as_ram(offset, length, buf);
            if (ok)
                __atomic_fetch_add(&zero_asked, zero_pages_in(offset, length), __ATOMIC_RELAXED);
        } else {
            ok = ask_good(fd, (uint32_t)i + 1, offset, length, buf);
        }
        wk->bad += !ok;
        wk->done++;
    }
out:
    if (fd >= 0)
        close(fd);
    free(buf);
    return NULL;
}

static void test_concurrent(uint16_t port) {
    enum { RAW = 24, SHARED = 8 };
    struct worker wk[RAW + SHARED];
    struct fetcher f;
    struct mc_slot fc;
    memset(&fc, 0, sizeof fc);
    CHECK(fetcher_init(&f, "127.0.0.1", port, "ck-1", TOKEN_HEX, 4, 5000, &fc) == 0);
    for (int i = 0; i < RAW + SHARED; i++) {
        wk[i] = (struct worker){.port = port, .f = i < RAW ? NULL : &f, .seed = 0x1234567ull * (uint64_t)(i + 1)};
        CHECK(pthread_create(&wk[i].th, NULL, worker_main, &wk[i]) == 0);
    }
    for (int i = 0; i < RAW + SHARED; i++) {
        pthread_join(wk[i].th, NULL);
        CHECK(wk[i].bad == 0 && wk[i].done == 40);
    }
    CHECK(fc.field[MC_fetches] == SHARED * 40 && fc.field[MC_fetch_errors] == 0);
    fetcher_close(&f);
}

/* -- remove while connected -------------------------------------------------------- */

static void test_remove(struct ms_server *s, uint16_t port) {
    uint8_t *buf = malloc(MP_MAX_REQUEST);
    int fd = session(port, "ck-2");
    CHECK(fd >= 0);
    CHECK(ask_good(fd, 1, 0, 2 * MP_PAGE, buf));
    CHECK(ms_remove(s, "ck-2") == 0);
    CHECK(ms_remove(s, "ck-2") == -ENOENT);
    /* server.c: the next request is answered MP_E_NO_CHECKPOINT, then the connection ends. */
    CHECK(ask(fd, 2, 0, MP_PAGE, 0, buf) == MP_E_NO_CHECKPOINT);
    CHECK(next_recv(fd) == 0);
    close(fd);
    fd = tcp_connect(port);
    CHECK(say_hello(fd, token, "ck-2", NULL) == MP_E_NO_CHECKPOINT);
    CHECK(closed_by_server(fd));
    close(fd);
    /* Its slot is free again once the last connection went: the id can come back. */
    uint64_t size;
    const char *err;
    CHECK(ms_add(s, "ck-2", TOKEN_HEX, ram_path, map_path, NULL, &size, &err) == 0);
    fd = session(port, "ck-2");
    CHECK(fd >= 0 && ask_good(fd, 1, 8ull * MP_PAGE, MP_PAGE, buf));
    close(fd);
    CHECK(ms_remove(s, "ck-2") == 0);            /* no connection: freed at once */
    free(buf);
}

/* -- the control socket ------------------------------------------------------------- */

static int control_connect(const char *path) {
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    snprintf(un.sun_path, sizeof un.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&un, sizeof un) < 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

/* Send a command, read one reply line (without its newline): 0, or -1. */
static int control(int fd, const char *cmd, char *reply, size_t len) {
    size_t used = 0;
    if (send_all(fd, cmd, strlen(cmd)) < 0)
        return -1;
    for (;;) {
        char c;
        ssize_t n = recv(fd, &c, 1, 0);
        if (n <= 0)
            return -1;
        if (c == '\n')
            break;
        if (used + 1 < len)
            reply[used++] = c;
    }
    reply[used] = '\0';
    return 0;
}

static void test_control(uint16_t port) {
    char reply[600], cmd[512], expect[32];
    struct stat st;
    CHECK(stat(ctl_path, &st) == 0 && S_ISSOCK(st.st_mode) && (st.st_mode & 077) == 0);
    int fd = control_connect(ctl_path);
    CHECK(fd >= 0);
    snprintf(expect, sizeof expect, "ok %u", port);
    CHECK(control(fd, "ping\n", reply, sizeof reply) == 0 && strcmp(reply, expect) == 0);
    snprintf(cmd, sizeof cmd, "add ck-3 nothex %s %s\n", ram_path, map_path);
    CHECK(control(fd, cmd, reply, sizeof reply) == 0 && strncmp(reply, "error ", 6) == 0 &&
          strstr(reply, "64 hex digits"));
    CHECK(control(fd, "frobnicate ck-1\n", reply, sizeof reply) == 0 && strncmp(reply, "error ", 6) == 0);
    CHECK(control(fd, "\n", reply, sizeof reply) == 0 && strncmp(reply, "error ", 6) == 0);
    CHECK(control(fd, "remove nosuch\n", reply, sizeof reply) == 0 && strncmp(reply, "error ", 6) == 0);
    CHECK(control(fd, "add ck-3\n", reply, sizeof reply) == 0 && strncmp(reply, "error ", 6) == 0);
    snprintf(cmd, sizeof cmd, "add ck-3 %s %s %s\n", TOKEN_HEX, ram_path, map_path);
    snprintf(expect, sizeof expect, "ok %llu", (unsigned long long)RAM_SIZE);
    CHECK(control(fd, cmd, reply, sizeof reply) == 0 && strcmp(reply, expect) == 0);
    CHECK(control(fd, cmd, reply, sizeof reply) == 0 && strncmp(reply, "error ", 6) == 0);   /* served already */
    /* Two commands in one write: two replies, in order. */
    CHECK(control(fd, "ping\nremove ck-3\n", reply, sizeof reply) == 0 && strncmp(reply, "ok ", 3) == 0);
    CHECK(control(fd, "", reply, sizeof reply) == 0 && strcmp(reply, "ok") == 0);
    /* A line longer than any command (server.c: CONTROL_LINE, 4096): no reply,
     * the server ends this session. */
    size_t big = 5000;
    char *line = malloc(big + 2);
    memset(line, 'a', big);
    line[big] = '\n', line[big + 1] = '\0';
    CHECK(control(fd, line, reply, sizeof reply) == -1);
    free(line);
    close(fd);
    /* The server keeps serving: control and memory. */
    fd = control_connect(ctl_path);
    snprintf(expect, sizeof expect, "ok %u", port);
    CHECK(fd >= 0 && control(fd, "ping\n", reply, sizeof reply) == 0 && strcmp(reply, expect) == 0);
    close(fd);
    uint8_t buf[MP_PAGE];
    fd = session(port, "ck-1");
    CHECK(fd >= 0 && ask_good(fd, 1, 9ull * MP_PAGE, MP_PAGE, buf));
    close(fd);
}

/* -- the fetcher ----------------------------------------------------------------------- */

enum fake_mode { FAKE_GARBAGE, FAKE_STALL, FAKE_STALL_AFTER_WELCOME, FAKE_GARBAGE_REPLY };

struct fake {
    pthread_t th;
    int fd;
    uint16_t port;
    enum fake_mode mode;
    int stop;
    int accepted;
};

/* Until stop, or the peer closes: 1 when it sent something, 0 at EOF/stop. */
static int fake_wait(struct fake *fk, int c, uint8_t *buf, size_t len) {
    size_t got = 0;
    while (!__atomic_load_n(&fk->stop, __ATOMIC_RELAXED)) {
        struct pollfd p = {c, POLLIN, 0};
        if (poll(&p, 1, 50) <= 0)
            continue;
        ssize_t n = recv(c, buf + got, len - got, 0);
        if (n <= 0)
            return 0;
        got += (size_t)n;
        if (got == len)
            return 1;
    }
    return 0;
}

static void *fake_main(void *arg) {
    struct fake *fk = arg;
    uint64_t seed = 0xdeadbeefcafef00dull;
    while (!__atomic_load_n(&fk->stop, __ATOMIC_RELAXED)) {
        struct pollfd p = {fk->fd, POLLIN, 0};
        if (poll(&p, 1, 50) <= 0)
            continue;
        int c = accept(fk->fd, NULL, NULL);
        if (c < 0)
            continue;
        __atomic_fetch_add(&fk->accepted, 1, __ATOMIC_RELAXED);
        uint8_t in[MP_HELLO_FIXED + MP_ID_MAX], junk[64], out[MP_WELCOME_LEN];
        for (size_t i = 0; i < sizeof junk; i++)
            junk[i] = (uint8_t)rng_next(&seed);
        junk[0] = 'x';                                   /* never a magic */
        if (fk->mode == FAKE_GARBAGE) {
            send_all(c, junk, sizeof junk);
        } else if (fk->mode != FAKE_STALL && fake_wait(fk, c, in, MP_HELLO_FIXED) &&
                   fake_wait(fk, c, in, (size_t)(in[6] | in[7] << 8))) {
            struct mp_welcome w = {.status = MP_OK, .size = RAM_SIZE, .page_size = MP_PAGE,
                                   .max_request = MP_MAX_REQUEST};
            mp_encode_welcome(out, &w);
            send_all(c, out, sizeof out);
            if (fk->mode == FAKE_GARBAGE_REPLY && fake_wait(fk, c, in, MP_REQUEST_LEN))
                send_all(c, junk, sizeof junk);
        }
        /* Then read and never answer, until the peer goes. */
        while (fake_wait(fk, c, in, 1))
            ;
        close(c);
    }
    return NULL;
}

static int fake_start(struct fake *fk, enum fake_mode mode) {
    memset(fk, 0, sizeof *fk);
    fk->mode = mode;
    fk->fd = tcp_listen(&fk->port);
    if (fk->fd < 0)
        return -1;
    if (pthread_create(&fk->th, NULL, fake_main, fk) != 0) {
        close(fk->fd);
        return -1;
    }
    return 0;
}

static void fake_stop(struct fake *fk) {
    __atomic_store_n(&fk->stop, 1, __ATOMIC_RELAXED);
    pthread_join(fk->th, NULL);
    close(fk->fd);
}

static int error_has(struct fetcher *f, const char *what) {
    char e[256];
    fetcher_last_error(f, e, sizeof e);
    if (!strstr(e, what)) {
        fprintf(stderr, "  last_error is \"%s\", wanted \"%s\" in it\n", e, what);
        return 0;
    }
    return 1;
}

static void test_fetcher(uint16_t port) {
    struct fetcher f;
    struct mc_slot fc;
    uint8_t *buf = malloc(MP_MAX_REQUEST);
    memset(&fc, 0, sizeof fc);

    CHECK(fetcher_init(&f, "127.0.0.1", port, "ck-1", TOKEN_HEX, 2, 2000, &fc) == 0);
    CHECK(f.size == RAM_SIZE);
    static const uint64_t pages[][2] = {{0, 1}, {300, 3}, {2047, 1}, {512, 256}, {1000, 100}};
    for (size_t i = 0; i < sizeof pages / sizeof *pages; i++) {
        uint64_t off = pages[i][0] * MP_PAGE;
        uint32_t len = (uint32_t)(pages[i][1] * MP_PAGE);
        memset(buf, 0xa5, len);
        CHECK(fetcher_get(&f, off, len, buf) == 0 && same_as_ram(off, len, buf));
        __atomic_fetch_add(&zero_asked, zero_pages_in(off, len), __ATOMIC_RELAXED);
    }
    CHECK(fc.field[MC_fetches] == 5 && fc.field[MC_fetch_bytes] == 361ull * MP_PAGE);
    /* A range the server refuses: an error naming why, and the fetcher goes on. */
    CHECK(fetcher_get(&f, RAM_SIZE, MP_PAGE, buf) == -1 && error_has(&f, mp_status_name(MP_E_RANGE)));
    CHECK(fc.field[MC_fetch_errors] == 1);
    CHECK(fetcher_get(&f, 4 * MP_PAGE, MP_PAGE, buf) == 0 && same_as_ram(4 * MP_PAGE, MP_PAGE, buf));
    fetcher_close(&f);

    /* Wrong token, unknown id, bad arguments. */
    CHECK(fetcher_init(&f, "127.0.0.1", port, "ck-1", OTHER_TOKEN_HEX, 1, 2000, NULL) == -1 &&
          error_has(&f, mp_status_name(MP_E_TOKEN)));
    fetcher_close(&f);
    CHECK(fetcher_init(&f, "127.0.0.1", port, "ck-404", TOKEN_HEX, 1, 2000, NULL) == -1 &&
          error_has(&f, mp_status_name(MP_E_NO_CHECKPOINT)));
    fetcher_close(&f);
    CHECK(fetcher_init(&f, "127.0.0.1", port, "../x", TOKEN_HEX, 1, 2000, NULL) == -1 &&
          error_has(&f, "not a checkpoint id"));
    fetcher_close(&f);
    CHECK(fetcher_init(&f, "127.0.0.1", port, "ck-1", "xyz", 1, 2000, NULL) == -1 && error_has(&f, "64 hex"));
    fetcher_close(&f);
    CHECK(fetcher_init(&f, "localhost", port, "ck-1", TOKEN_HEX, 1, 2000, NULL) == -1 &&
          error_has(&f, "not a numeric IP address"));
    fetcher_close(&f);

    /* A port nobody listens on: refused at once. */
    struct fake fk;
    uint16_t dead_port;
    int dead = tcp_listen(&dead_port);
    close(dead);
    uint64_t t0 = now_ms();
    CHECK(fetcher_init(&f, "127.0.0.1", dead_port, "ck-1", TOKEN_HEX, 1, 2000, NULL) == -1 &&
          error_has(&f, "refused"));
    CHECK(now_ms() - t0 < 1000);
    fetcher_close(&f);

    /* A garbage server. */
    CHECK(fake_start(&fk, FAKE_GARBAGE) == 0);
    t0 = now_ms();
    CHECK(fetcher_init(&f, "127.0.0.1", fk.port, "ck-1", TOKEN_HEX, 1, 500, NULL) == -1 &&
          error_has(&f, "not the sfmpi memory protocol"));
    CHECK(now_ms() - t0 < 1500);
    fetcher_close(&f);
    fake_stop(&fk);

    /* A stalled server: accepts, reads, never answers. */
    CHECK(fake_start(&fk, FAKE_STALL) == 0);
    t0 = now_ms();
    CHECK(fetcher_init(&f, "127.0.0.1", fk.port, "ck-1", TOKEN_HEX, 1, 500, NULL) == -1 &&
          error_has(&f, "no answer within the timeout"));
    uint64_t took = now_ms() - t0;
    CHECK(took >= 400 && took <= 1500);
    fetcher_close(&f);
    fake_stop(&fk);

    /* A server that welcomes, then stalls: the get fails in about the timeout,
     * with no second wait. */
    CHECK(fake_start(&fk, FAKE_STALL_AFTER_WELCOME) == 0);
    memset(&fc, 0, sizeof fc);
    CHECK(fetcher_init(&f, "127.0.0.1", fk.port, "ck-1", TOKEN_HEX, 1, 500, &fc) == 0 && f.size == RAM_SIZE);
    t0 = now_ms();
    CHECK(fetcher_get(&f, 0, MP_PAGE, buf) == -1 && error_has(&f, "no answer within the timeout"));
    took = now_ms() - t0;
    CHECK(took >= 400 && took <= 1500);
    CHECK(fc.field[MC_fetch_errors] == 1 && fc.field[MC_reconnects] == 0);
    fetcher_close(&f);
    fake_stop(&fk);
    CHECK(fk.accepted == 1);

    /* A server that welcomes, then answers garbage: an error, quickly. */
    CHECK(fake_start(&fk, FAKE_GARBAGE_REPLY) == 0);
    CHECK(fetcher_init(&f, "127.0.0.1", fk.port, "ck-1", TOKEN_HEX, 1, 500, NULL) == 0);
    t0 = now_ms();
    CHECK(fetcher_get(&f, 0, MP_PAGE, buf) == -1 && error_has(&f, "not the reply asked for"));
    CHECK(now_ms() - t0 < 1500);
    fetcher_close(&f);
    fake_stop(&fk);
    free(buf);
}

/* -- max_connections ---------------------------------------------------------------- */

static void test_busy(void) {
    struct ms_config cfg = {.listen_host = "127.0.0.1", .control_path = ctl2_path, .max_connections = 2,
                            .hello_timeout_ms = 2000, .send_timeout_ms = 2000};
    struct ms_server *s = NULL;
    const char *err = NULL;
    pthread_t th;
    uint64_t size;
    uint8_t buf[MP_PAGE];
    CHECK(ms_create(&cfg, &s, &err) == 0);
    if (!s)
        return;
    uint16_t port = ms_port(s);
    CHECK(port != 0);
    CHECK(ms_add(s, "ck-1", TOKEN_HEX, ram_path, map_path, NULL, &size, &err) == 0);
    CHECK(pthread_create(&th, NULL, run_server, s) == 0);
    int a = session(port, "ck-1"), b = session(port, "ck-1");
    CHECK(a >= 0 && b >= 0);
    CHECK(ask(a, 1, 0, MP_PAGE, 0, buf) == MP_OK && same_as_ram(0, MP_PAGE, buf));
    int c = tcp_connect(port);
    CHECK(say_hello(c, token, "ck-1", NULL) == MP_E_BUSY);
    CHECK(closed_by_server(c));
    close(c);
    CHECK(ask(b, 1, MP_PAGE, MP_PAGE, 0, buf) == MP_OK && same_as_ram(MP_PAGE, MP_PAGE, buf));
    /* When one goes, another may come (once its thread has let go of the slot). */
    close(a);
    int d = -1;
    for (int i = 0; i < 100 && d < 0; i++) {
        d = session(port, "ck-1");
        if (d < 0)
            sleep_ms(20);
    }
    CHECK(d >= 0 && ask(d, 1, 2 * MP_PAGE, MP_PAGE, 0, buf) == MP_OK && same_as_ram(2 * MP_PAGE, MP_PAGE, buf));
    /* ms_stop ends the connections that are still open. */
    ms_stop(s);
    CHECK(pthread_join(th, NULL) == 0);
    CHECK(closed_by_server(b));
    CHECK(closed_by_server(d));
    close(b);
    close(d);
    ms_destroy(s);
    CHECK(access(ctl2_path, F_OK) < 0);          /* the control socket is gone */
}

/* -- the counters file ---------------------------------------------------------------- */

static void test_counters(void) {
    size_t len = 0;
    uint8_t *file = read_whole(counters_path, &len);
    CHECK(file && len == sizeof(struct mc_header) + MC_SERVER_SLOTS * sizeof(struct mc_slot));
    if (!file || len < sizeof(struct mc_header) + 2 * sizeof(struct mc_slot)) {
        free(file);
        return;
    }
    struct mc_header *h = (struct mc_header *)file;
    struct mc_slot *slot = (struct mc_slot *)(h + 1);
    CHECK(memcmp(h->magic, MC_MAGIC, 8) == 0 && h->slots == MC_SERVER_SLOTS && h->fields == MC_FIELDS &&
          h->hist == MC_HIST && h->pid == (uint32_t)getpid());
    CHECK(strcmp(slot[0].id, "*") == 0 && strcmp(slot[1].id, "ck-1") == 0);
    CHECK(slot[0].field[MC_requests] > 0);
    CHECK(slot[0].field[MC_bad_requests] > 0);
    CHECK(slot[0].field[MC_connections] > 0 && slot[0].field[MC_refused] > 0);
    CHECK(slot[0].field[MC_bytes_sent] >= slot[0].field[MC_requests] * MP_PAGE);
    CHECK(slot[0].field[MC_io_errors] == 0);
    CHECK(slot[0].field[MC_zero_pages_asked] == zero_asked);
    if (slot[0].field[MC_zero_pages_asked] != zero_asked)
        fprintf(stderr, "  zero_pages_asked %llu, the test asked for %llu\n",
                (unsigned long long)slot[0].field[MC_zero_pages_asked], (unsigned long long)zero_asked);
    uint64_t hist = 0;
    for (int b = 0; b < MC_HIST; b++)
        hist += slot[0].hist[b];
    CHECK(hist == slot[0].field[MC_requests]);
    CHECK(slot[1].field[MC_requests] > 0 && slot[1].field[MC_requests] <= slot[0].field[MC_requests]);
    free(file);
}

/* The working set: recorded runs, extended and capped; saved and loaded back;
 * files that are not a working set of this RAM refused. */
static void test_workingset(void) {
    struct workingset w;
    char path[600];
    snprintf(path, sizeof path, "%s/ram.ws", dir);
    CHECK(ws_init(&w, 64 * MP_PAGE) == 0);
    ws_record(&w, 5 * MP_PAGE, MP_PAGE);
    ws_record(&w, 6 * MP_PAGE, 2 * MP_PAGE);        /* continues 5: one entry 5-7 */
    ws_record(&w, 5 * MP_PAGE, 4 * MP_PAGE);        /* 5-7 recorded: only 8 is new, and continues */
    ws_record(&w, 20 * MP_PAGE, MP_PAGE);
    CHECK(w.n == 2 && w.e[0].offset == 5 * MP_PAGE && w.e[0].length == 4 * MP_PAGE);
    CHECK(w.e[1].offset == 20 * MP_PAGE && w.e[1].length == MP_PAGE);
    CHECK(ws_save(&w, path) == 2);
    struct ws_entry *e = NULL;
    uint32_t n = 0;
    CHECK(ws_load(path, 64 * MP_PAGE, &e, &n) == 0 && n == 2 && e[1].offset == 20 * MP_PAGE);
    free(e);
    CHECK(ws_load(path, 16 * MP_PAGE, &e, &n) == -EINVAL);   /* another RAM: page 20 is past its end */
    size_t len = 0;
    uint8_t *raw = read_whole(path, &len);
    CHECK(raw && len == WS_HEADER + 2 * WS_ENTRY);
    if (raw) {
        CHECK(write_file(path, raw, len - 1) == 0);                        /* truncated */
        CHECK(ws_load(path, 64 * MP_PAGE, &e, &n) == -EINVAL);
        raw[8] = 3;                                            /* count says 3, the file holds 2 */
        CHECK(write_file(path, raw, len) == 0);
        CHECK(ws_load(path, 64 * MP_PAGE, &e, &n) == -EINVAL);
        raw[8] = 2;
        raw[WS_HEADER + 8] = 1;                                /* a length that is not whole pages */
        CHECK(write_file(path, raw, len) == 0);
        CHECK(ws_load(path, 64 * MP_PAGE, &e, &n) == -EINVAL);
        raw[WS_HEADER + 8] = 0, raw[0] = 'X';                  /* not the magic */
        CHECK(write_file(path, raw, len) == 0);
        CHECK(ws_load(path, 64 * MP_PAGE, &e, &n) == -EINVAL);
        free(raw);
    }
    for (uint32_t i = 0; i < WS_MAX + 10; i++)               /* capped: every other page, one entry each */
        ws_record(&w, 32 * MP_PAGE + (uint64_t)(i % 16) * 2 * MP_PAGE, MP_PAGE);
    CHECK(w.n <= WS_MAX);
    ws_free(&w);
    struct workingset big;
    CHECK(ws_init(&big, (uint64_t)3 * WS_MAX * MP_PAGE) == 0);
    for (uint32_t i = 0; i < WS_MAX + 10; i++)
        ws_record(&big, (uint64_t)i * 2 * MP_PAGE, MP_PAGE);
    CHECK(big.n == WS_MAX);
    CHECK(ws_save(&big, path) == WS_MAX);
    CHECK(ws_load(path, (uint64_t)3 * WS_MAX * MP_PAGE, &e, &n) == 0 && n == WS_MAX);
    free(e);
    ws_free(&big);
    unlink(path);
}

/* -- main --------------------------------------------------------------------------- */

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    snprintf(dir, sizeof dir, "/tmp/sfm-test-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(ram_path, sizeof ram_path, "%s/ram", dir);
    snprintf(map_path, sizeof map_path, "%s/ram.map", dir);
    snprintf(ctl_path, sizeof ctl_path, "%s/ctl.sock", dir);
    snprintf(ctl2_path, sizeof ctl2_path, "%s/ctl2.sock", dir);
    snprintf(counters_path, sizeof counters_path, "%s/counters", dir);
    CHECK(mp_token_from_hex(TOKEN_HEX, token) == 0);
    int baseline = thread_count();

    test_protocol();
    test_workingset();
    make_ram();
    test_pagemap();

    struct ms_config cfg = {.listen_host = "127.0.0.1", .port = 0, .control_path = ctl_path,
                            .counters_path = counters_path, .hello_timeout_ms = 300, .send_timeout_ms = 3000};
    struct ms_server *s = NULL;
    const char *err = NULL;
    struct ms_config bad = cfg;
    bad.listen_host = "localhost";
    CHECK(ms_create(&bad, &s, &err) == -EINVAL && err);
    s = NULL;
    CHECK(ms_create(&cfg, &s, &err) == 0 && s);
    if (!s) {
        fprintf(stderr, "ms_create: %s\n", err ? err : "?");
        return 1;
    }
    uint16_t port = ms_port(s);
    CHECK(port != 0);
    pthread_t th;
    CHECK(pthread_create(&th, NULL, run_server, s) == 0);
    test_add(s);

    test_good_requests(port);
    test_hellos(port);
    test_bad_requests(port);
    test_abandoning_peers(port, baseline + 1);
    test_half_hello(port);
    test_concurrent(port);
    test_remove(s, port);
    test_control(port);
    test_fetcher(port);
    test_busy();

    /* A fetcher connected to server 1 when it stops: its next get fails, quickly. */
    struct fetcher f;
    uint8_t page[MP_PAGE];
    CHECK(fetcher_init(&f, "127.0.0.1", port, "ck-1", TOKEN_HEX, 1, 3000, NULL) == 0);
    CHECK(fetcher_get(&f, 0, MP_PAGE, page) == 0 && same_as_ram(0, MP_PAGE, page));
    ms_stop(s);
    CHECK(pthread_join(th, NULL) == 0);
    uint64_t t0 = now_ms();
    CHECK(fetcher_get(&f, 0, MP_PAGE, page) == -1);
    uint64_t took = now_ms() - t0;
    CHECK(took < 1000);
    if (took >= 1000)
        fprintf(stderr, "  fetcher_get after ms_stop took %llu ms\n", (unsigned long long)took);
    fetcher_close(&f);
    ms_destroy(s);
    CHECK(access(ctl_path, F_OK) < 0);

    test_counters();
    /* Every connection thread has ended (ASan's leak check runs at exit). */
    CHECK(wait_threads(baseline, 5000));

    unlink(ram_path);
    unlink(map_path);
    unlink(counters_path);
    rmdir(dir);
    free(ram);
    if (failures) {
        fprintf(stderr, "memory_test: %lu of %lu checks failed\n", failures, checks);
        return 1;
    }
    printf("memory_test: all %lu checks passed\n", checks);
    return 0;
}
