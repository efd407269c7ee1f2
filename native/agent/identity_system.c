/*
 * What a clone inherits from its parent and must not keep: the wall clock
 * (stood still while the VM was paused), the kernel RNG's state, the boot ID
 * and the machine-id.
 */
#define _GNU_SOURCE
#include "identity_steps.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* The kernel's boot ID is made once per boot and read-only, so a clone would
 * keep its parent's.  Programs take it to mean "same machine": UCX (under
 * MPICH and Open MPI) then tries shared memory between ranks on different
 * clones and MPI_Init fails.  A file of our own is bind-mounted over it. */
#define BOOT_ID KERNEL_BOOT_ID
#define BOOT_ID_FILE "/run/sfmpi-boot_id"

int set_clock(double host_time, double received, char *err, size_t errlen)
{
    /* The host's clock at sending, plus what passed since we got it. */
    double now = host_time + (monotonic_s() - received);
    struct timespec ts = {.tv_sec = (time_t)now, .tv_nsec = (long)((now - (double)(time_t)now) * 1e9)};
    if (clock_settime(CLOCK_REALTIME, &ts) != 0)
        return fail(err, errlen, "set the clock: %s", strerror(errno));
    return 0;
}

/* -- entropy ------------------------------------------------------------ */

static int b64_value(int c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* The 64 bytes of host entropy come base64-encoded; glibc has no decoder. */
static size_t b64_decode(const char *in, unsigned char *out, size_t max)
{
    size_t n = 0;
    unsigned acc = 0;
    int bits = 0;
    for (; *in && *in != '='; in++) {
        int v = b64_value((unsigned char)*in);
        if (v < 0)
            continue;
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (n < max)
                out[n++] = (unsigned char)(acc >> bits);
        }
    }
    return n;
}

/* RNDADDENTROPY adds the bytes and credits them; RNDRESEEDCRNG makes the CRNG
 * use them now.  Without the reseed a clone's getrandom() goes on from the
 * parent's CRNG state: measured, all clones returned the same bytes. */
int reseed(const char *b64, int random_fd, char *err, size_t errlen)
{
    struct {
        struct rand_pool_info info;
        unsigned char data[512];
    } req;
    size_t n = b64_decode(b64, req.data, sizeof req.data);
    req.info.entropy_count = (int)(n * 8);
    req.info.buf_size = (int)n;
    int fd = random_fd >= 0 ? random_fd : open("/dev/random", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(err, errlen, "open /dev/random: %s", strerror(errno));
    int rc = ioctl(fd, RNDADDENTROPY, &req);
    if (rc == 0)
        rc = ioctl(fd, RNDRESEEDCRNG);
    int e = errno;
    if (fd != random_fd)
        close(fd);
    if (rc != 0)
        return fail(err, errlen, "reseed the kernel RNG: %s", strerror(e));
    return 0;
}

/* -- boot ID, machine-id --------------------------------------------------- */

/* Our file is bind-mounted over the kernel's already (the two are on one device). */
static bool boot_id_is_ours(const char *path)
{
    struct stat kernel, ours;
    return stat(BOOT_ID, &kernel) == 0 && stat(path, &ours) == 0 && kernel.st_dev == ours.st_dev;
}

int set_boot_id(const char *boot_id, char *err, size_t errlen)
{
    char path[512], text[128];
    identity_path(BOOT_ID_FILE, path, sizeof path);
    snprintf(text, sizeof text, "%s\n", boot_id);
    /* Written in place: a clone of a clone keeps the mount, only the text changes. */
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, text, strlen(text)) < 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return fail(err, errlen, "write %s: %s", path, strerror(e));
    }
    close(fd);
    if (boot_id_is_ours(path))
        return 0;
    if (mount(path, BOOT_ID, NULL, MS_BIND, NULL) != 0)
        return fail(err, errlen, "bind a new boot ID over %s: %s", BOOT_ID, strerror(errno));
    return 0;
}

/* The boot ID file goes over the kernel's now, with the parent's own ID:
 * a clone then only writes its new ID into it (no mount in the clone). */
void prepare_boot_id(void)
{
    char path[512], boot_id[64], err[256];
    identity_path(BOOT_ID_FILE, path, sizeof path);
    if (!boot_id_is_ours(path) && read_first_line(BOOT_ID, boot_id, sizeof boot_id)[0])
        set_boot_id(boot_id, err, sizeof err);
}

int set_machine_id(const char *machine_id, char *err, size_t errlen)
{
    char text[128];
    snprintf(text, sizeof text, "%s\n", machine_id);
    return write_atomic("/etc/machine-id", text, err, errlen);
}
