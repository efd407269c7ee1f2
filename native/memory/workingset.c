/* The working set (workingset.h). */
#define _GNU_SOURCE
#include "workingset.h"
#include "le.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char MAGIC[8] = "SFMWS1\0";

int ws_init(struct workingset *w, uint64_t ram_size) {
    memset(w, 0, sizeof *w);
    w->ram_size = ram_size;
    w->seen = calloc((size_t)(ram_size / MP_PAGE + 7) / 8, 1);
    w->e = malloc(sizeof *w->e * WS_MAX);
    if (!w->seen || !w->e) {
        free(w->seen);
        free(w->e);
        w->seen = NULL, w->e = NULL;
        return -ENOMEM;
    }
    pthread_mutex_init(&w->lock, NULL);
    return 0;
}

void ws_free(struct workingset *w) {
    if (!w->seen)
        return;
    free(w->seen);
    free(w->e);
    w->seen = NULL, w->e = NULL;
    pthread_mutex_destroy(&w->lock);
}

static int seen(const struct workingset *w, uint64_t p) { return (w->seen[p >> 3] >> (p & 7)) & 1; }

void ws_record(struct workingset *w, uint64_t offset, uint32_t length) {
    uint64_t p = offset / MP_PAGE, end = (offset + length) / MP_PAGE;
    pthread_mutex_lock(&w->lock);
    while (p < end && w->n < WS_MAX) {
        if (seen(w, p)) {
            p++;
            continue;
        }
        uint64_t q = p;
        while (q < end && !seen(w, q)) {
            w->seen[q >> 3] |= (uint8_t)(1u << (q & 7));
            q++;
        }
        struct ws_entry *last = w->n ? &w->e[w->n - 1] : NULL;
        uint64_t len = (q - p) * MP_PAGE;
        if (last && last->offset + last->length == p * MP_PAGE && last->length + len <= MP_MAX_REQUEST)
            last->length += (uint32_t)len;      /* faults one page after another: one entry */
        else
            w->e[w->n++] = (struct ws_entry){p * MP_PAGE, (uint32_t)len};
        p = q;
    }
    pthread_mutex_unlock(&w->lock);
}

int ws_save(struct workingset *w, const char *path) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return -ENAMETOOLONG;
    pthread_mutex_lock(&w->lock);
    uint32_t n = w->n;
    size_t len = WS_HEADER + (size_t)n * WS_ENTRY;
    uint8_t *buf = calloc(len, 1);
    if (buf) {
        memcpy(buf, MAGIC, 8);
        put32(buf + 8, n);
        for (uint32_t i = 0; i < n; i++) {
            put64(buf + WS_HEADER + (size_t)i * WS_ENTRY, w->e[i].offset);
            put32(buf + WS_HEADER + (size_t)i * WS_ENTRY + 8, w->e[i].length);
        }
    }
    pthread_mutex_unlock(&w->lock);
    if (!buf)
        return -ENOMEM;
    int rc = 0, fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, buf, len) != (ssize_t)len || fsync(fd) < 0)
        rc = errno ? -errno : -EIO;
    if (fd >= 0 && close(fd) < 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && rename(tmp, path) < 0)
        rc = -errno;
    if (rc < 0)
        unlink(tmp);
    free(buf);
    return rc < 0 ? rc : (int)n;
}

int ws_load(const char *path, uint64_t ram_size, struct ws_entry **out, uint32_t *n) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    uint8_t head[WS_HEADER];
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size < WS_HEADER ||
        st.st_size > WS_HEADER + (off_t)WS_MAX * WS_ENTRY || pread(fd, head, WS_HEADER, 0) != WS_HEADER ||
        memcmp(head, MAGIC, 8) != 0 || get32(head + 12) != 0 || get32(head + 8) > WS_MAX ||
        st.st_size != WS_HEADER + (off_t)get32(head + 8) * WS_ENTRY) {
        close(fd);
        return -EINVAL;
    }
    uint32_t count = get32(head + 8);
    size_t len = (size_t)count * WS_ENTRY;
    uint8_t *raw = malloc(len ? len : 1);
    struct ws_entry *e = malloc(sizeof *e * (count ? count : 1));
    int rc = raw && e ? 0 : -ENOMEM;
    if (rc == 0 && pread(fd, raw, len, WS_HEADER) != (ssize_t)len)
        rc = -EINVAL;
    for (uint32_t i = 0; rc == 0 && i < count; i++) {
        struct mp_request r = {.offset = get64(raw + (size_t)i * WS_ENTRY),
                               .length = get32(raw + (size_t)i * WS_ENTRY + 8)};
        if (mp_check_range(&r, ram_size) != MP_OK)
            rc = -EINVAL;
        e[i] = (struct ws_entry){r.offset, r.length};
    }
    close(fd);
    free(raw);
    if (rc < 0) {
        free(e);
        return rc;
    }
    *out = e;
    *n = count;
    return 0;
}
