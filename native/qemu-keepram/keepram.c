/* libsfmpi-keepram: preloaded into every clone's QEMU, it keeps the guest's
 * free page reports from punching holes in the checkpoint's RAM file.
 *
 * Why: a parent VM has a virtio-balloon with free page reporting, so pages
 * its guest frees are dropped from its RAM file and never travel. A clone is
 * restored from the parent's device state, so it has the same balloon, and
 * its guest reports freed pages too. QEMU 7.2 then discards the range with
 * fallocate(PUNCH_HOLE) on the RAM block's file even when the file is mapped
 * privately (ram_block_discard_range; fixed in later QEMU), and the clone's
 * RAM file is the checkpoint every other clone maps: one clone freeing memory
 * would zero it under all of them. With this shim that fallocate on the file
 * named by SFMPI_KEEP_FILE succeeds without touching it, and QEMU's
 * madvise(MADV_DONTNEED) that follows drops only the clone's private copies
 * (the memory is given back; the pages read as the checkpoint's again, which
 * a freed page may). Every other fallocate (the disk's discards and zero
 * writes) goes through unchanged. Built as sfmpi/_keepram*.so by setup.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>

typedef int (*fallocate_fn)(int, int, off_t, off_t);

static dev_t keep_dev;
static ino_t keep_ino;
static int keep_known;

__attribute__((constructor)) static void find_keep_file(void) {
    const char *path = getenv("SFMPI_KEEP_FILE");
    struct stat st;
    if (path && *path && stat(path, &st) == 0) {
        keep_dev = st.st_dev;
        keep_ino = st.st_ino;
        keep_known = 1;
    }
}

static int is_keep_file(int fd) {
    struct stat st;
    return keep_known && fstat(fd, &st) == 0 && st.st_dev == keep_dev && st.st_ino == keep_ino;
}

static int guarded(const char *name, int fd, int mode, off_t offset, off_t len) {
    if ((mode & FALLOC_FL_PUNCH_HOLE) && is_keep_file(fd))
        return 0;
    fallocate_fn real = (fallocate_fn)dlsym(RTLD_NEXT, name);
    return real ? real(fd, mode, offset, len) : -1;
}

int fallocate(int fd, int mode, off_t offset, off_t len) {
    return guarded("fallocate", fd, mode, offset, len);
}

int fallocate64(int fd, int mode, off_t offset, off_t len) {
    return guarded("fallocate64", fd, mode, offset, len);
}
