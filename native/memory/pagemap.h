/* The map of a checkpoint's non-zero pages: part of its descriptor, so that
 * zero pages never travel (a clone host synthesises them).
 *
 * File format (little-endian): 8 bytes "SFMAP1\0\0" | u64 RAM size | u32 page
 * size | u32 0 | bitmap, bit i of byte i/8 set when page i holds data. 16 KiB
 * of bitmap for 512 MiB of RAM.
 */
#ifndef SFMPI_MEMORY_PAGEMAP_H
#define SFMPI_MEMORY_PAGEMAP_H

#include <stddef.h>
#include <stdint.h>

#define PAGEMAP_MAGIC "SFMAP1\0\0"
#define PAGEMAP_HEADER 24

struct pagemap {
    uint64_t size;       /* bytes of RAM */
    uint64_t pages;
    uint8_t *bits;       /* ceil(pages / 8) bytes */
};

/* Scan a RAM file (holes skipped with SEEK_DATA, data pages compared to zero).
 * 0, or -errno. `nonzero` gets the count of pages with data. */
int pagemap_scan(const char *ram_path, struct pagemap *map, uint64_t *nonzero);
int pagemap_save(const struct pagemap *map, const char *path);
/* Load and check a map file: 0, -errno, or -EINVAL for a file that is not one. */
int pagemap_load(const char *path, struct pagemap *map);
void pagemap_free(struct pagemap *map);

static inline int pagemap_test(const struct pagemap *m, uint64_t page) {
    return page < m->pages && (m->bits[page >> 3] >> (page & 7)) & 1;
}

/* Pages [first, first + count): how many have data. */
uint64_t pagemap_count(const struct pagemap *m, uint64_t first, uint64_t count);

#endif
