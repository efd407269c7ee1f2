/* The map of non-zero pages (pagemap.h). */
#define _GNU_SOURCE
#include "pagemap.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int alloc_map(struct pagemap *m, uint64_t size) {
    m->size = size;
    m->pages = (size + MP_PAGE - 1) / MP_PAGE;
    m->bits = calloc((size_t)((m->pages + 7) / 8) + 1, 1);
    return m->bits ? 0 : -ENOMEM;
}

static int page_is_zero(const uint8_t *p, size_t len) {
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < len / 8; i++)
        if (w[i])
            return 0;
    for (size_t i = len & ~(size_t)7; i < len; i++)
        if (p[i])
            return 0;
    return 1;
}

int pagemap_scan(const char *ram_path, struct pagemap *map, uint64_t *nonzero) {
    enum { CHUNK = 1 << 20 };
    int fd = open(ram_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        int e = errno ? -errno : -EINVAL;
        close(fd);
        return e;
    }
    int rc = alloc_map(map, (uint64_t)st.st_size);
    uint8_t *buf = rc == 0 ? aligned_alloc(MP_PAGE, CHUNK) : NULL;
    if (!buf) {
        close(fd);
        pagemap_free(map);
        return -ENOMEM;
    }
    uint64_t count = 0;
    off_t pos = 0;
    while (pos < st.st_size) {
        off_t data = lseek(fd, pos, SEEK_DATA);
        if (data < 0)
            break;                          /* ENXIO: only a hole is left */
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            hole = st.st_size;
        data &= ~(off_t)(MP_PAGE - 1);
        for (off_t at = data; at < hole;) {
            size_t want = (size_t)(hole - at < CHUNK ? hole - at : CHUNK);
            ssize_t got = pread(fd, buf, want, at);
            if (got <= 0) {
                rc = got < 0 ? -errno : 0;
                goto out;
            }
            for (ssize_t off = 0; off < got; off += MP_PAGE) {
                size_t len = (size_t)(got - off < MP_PAGE ? got - off : MP_PAGE);
                if (!page_is_zero(buf + off, len)) {
                    uint64_t page = (uint64_t)(at + off) / MP_PAGE;
                    if (!pagemap_test(map, page)) {
                        map->bits[page >> 3] |= (uint8_t)(1u << (page & 7));
                        count++;
                    }
                }
            }
            at += got;
        }
        pos = hole;
    }
out:
    free(buf);
    close(fd);
    if (rc < 0) {
        pagemap_free(map);
        return rc;
    }
    if (nonzero)
        *nonzero = count;
    return 0;
}

static int write_all(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -errno;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int pagemap_save(const struct pagemap *map, const char *path) {
    uint8_t head[PAGEMAP_HEADER] = {0};
    memcpy(head, PAGEMAP_MAGIC, 8);
    for (int i = 0; i < 8; i++)
        head[8 + i] = (uint8_t)(map->size >> (8 * i));
    for (int i = 0; i < 4; i++)
        head[16 + i] = (uint8_t)(MP_PAGE >> (8 * i));
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    int rc = write_all(fd, head, sizeof head);
    if (rc == 0)
        rc = write_all(fd, map->bits, (size_t)((map->pages + 7) / 8));
    if (close(fd) < 0 && rc == 0)
        rc = -errno;
    return rc;
}

int pagemap_load(const char *path, struct pagemap *map) {
    memset(map, 0, sizeof *map);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    uint8_t head[PAGEMAP_HEADER];
    struct stat st;
    int rc = -EINVAL;
    if (fstat(fd, &st) == 0 && pread(fd, head, sizeof head, 0) == (ssize_t)sizeof head &&
        memcmp(head, PAGEMAP_MAGIC, 8) == 0) {
        uint64_t size = 0;
        uint32_t page = 0;
        for (int i = 0; i < 8; i++)
            size |= (uint64_t)head[8 + i] << (8 * i);
        for (int i = 0; i < 4; i++)
            page |= (uint32_t)head[16 + i] << (8 * i);
        uint64_t pages = (size + MP_PAGE - 1) / MP_PAGE;
        uint64_t nbytes = (pages + 7) / 8;
        /* 1 TiB of RAM at most: a map file is not trusted to size an allocation. */
        if (page == MP_PAGE && size > 0 && size % MP_PAGE == 0 && size <= (1ull << 40) &&
            (uint64_t)st.st_size == PAGEMAP_HEADER + nbytes && alloc_map(map, size) == 0) {
            rc = pread(fd, map->bits, (size_t)nbytes, PAGEMAP_HEADER) == (ssize_t)nbytes ? 0 : -EINVAL;
            if (rc)
                pagemap_free(map);
        }
    }
    close(fd);
    return rc;
}

void pagemap_free(struct pagemap *map) {
    free(map->bits);
    map->bits = NULL;
    map->pages = map->size = 0;
}

uint64_t pagemap_count(const struct pagemap *m, uint64_t first, uint64_t count) {
    uint64_t n = 0;
    for (uint64_t p = first; p < first + count && p < m->pages; p++)
        n += (uint64_t)pagemap_test(m, p);
    return n;
}
