/* Counters in a shared file (counters.h). */
#define _GNU_SOURCE
#include "counters.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MC_NAME(name) #name,
const char *const mc_field_names[MC_FIELDS] = {MC_FIELD_LIST(MC_NAME)};
#undef MC_NAME

int mc_open(const char *path, uint32_t slots, struct mc_file *out) {
    size_t len = sizeof(struct mc_header) + (size_t)slots * sizeof(struct mc_slot);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)len) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return -errno;
    out->head = p;
    out->slot = (struct mc_slot *)(out->head + 1);
    out->slots = slots;
    out->head->slots = slots;
    out->head->fields = MC_FIELDS;
    out->head->hist = MC_HIST;
    out->head->pid = (uint32_t)getpid();
    memcpy(out->head->magic, MC_MAGIC, 8);   /* last: a reader sees a whole header or none */
    return 0;
}

void mc_close(struct mc_file *f) {
    if (f->head)
        munmap(f->head, sizeof(struct mc_header) + (size_t)f->slots * sizeof(struct mc_slot));
    f->head = NULL;
    f->slot = NULL;
}

void mc_latency(struct mc_slot *s, uint64_t us) {
    if (!s)
        return;
    int b = 0;
    while (b < MC_HIST - 1 && us >= (2ull << b))
        b++;
    __atomic_fetch_add(&s->hist[b], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->field[MC_latency_sum_us], us, __ATOMIC_RELAXED);
}
