/* libsfmpi-nothp: preloaded into the QEMU of a clone whose RAM is served
 * (memtap's FUSE file), it drops QEMU's madvise(MADV_HUGEPAGE) on guest RAM.
 *
 * Why: QEMU 7.2 advises huge pages on every RAM block, and for a file mapping
 * with VM_HUGEPAGE the kernel's fault path reads ahead two huge pages (4 MiB)
 * whatever the file's read-ahead setting, so touching one 4 KiB page fetched
 * 4 MiB from the memory server (measured: 3 touches, 11 MiB fetched; without
 * the advice, 12 KiB). QEMU has no option to skip the advice, and a process
 * cannot take it back from outside (process_madvise does not take
 * MADV_NOHUGEPAGE), hence this shim. Nothing else is changed: other advice
 * goes through. Built as sfmpi/_nothp*.so by setup.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <sys/mman.h>

typedef int (*madvise_fn)(void *, size_t, int);

int madvise(void *addr, size_t len, int advice) {
    static madvise_fn real;
    if (advice == MADV_HUGEPAGE)
        return 0;
    if (!real)
        real = (madvise_fn)dlsym(RTLD_NEXT, "madvise");
    return real ? real(addr, len, advice) : -1;
}
