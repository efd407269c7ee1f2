/*
 * Re-identification of a guest (identity.h says what and when): the steps in
 * order, what the parent prepares for its clones, and the helpers the steps
 * share.  The steps themselves are in identity_system.c (clock, RNG, boot ID,
 * machine-id), identity_network.c, identity_hosts.c (hostname, /etc/hosts)
 * and identity_hooks.c (/etc/sfmpi/clone.d).
 *
 * It is C, in the agent, because a clone's call returns only after it: under
 * TCG a resumed clone translates every code path again, and the same steps in
 * Python cost each clone about 0.3 s of CPU (8 clones on 2 cores: 1.3 s) where
 * this costs a few ms.  Network changes go through ioctls, not `ip`, for the
 * same reason: every process a clone starts costs ~100 ms under TCG.
 */
#define _GNU_SOURCE
#include "identity_steps.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* -- helpers the steps share ---------------------------------------------- */

int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

double monotonic_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

char *read_first_line(const char *path, char *buf, size_t len)
{
    buf[0] = 0;
    FILE *f = fopen(path, "re");
    if (f) {
        if (fgets(buf, (int)len, f))
            buf[strcspn(buf, "\n")] = 0;
        fclose(f);
    }
    return buf;
}

const char *identity_path(const char *path, char *buf, size_t len)
{
    const char *root = getenv("SFMPI_AGENT_ROOT");
    snprintf(buf, len, "%s%s", root ? root : "", path);
    return buf;
}

const char *str_field(json_object *obj, const char *key)
{
    json_object *v;
    if (!json_object_object_get_ex(obj, key, &v) || !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

/* Written next to the file, then renamed: a reader never sees half of it. */
int write_atomic(const char *path, const char *text, char *err, size_t errlen)
{
    char full[512], tmp[600];
    identity_path(path, full, sizeof full);
    snprintf(tmp, sizeof tmp, "%s.sfmpi-new", full);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return fail(err, errlen, "write %s: %s", full, strerror(errno));
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t n = write(fd, text + off, len - off);
        if (n < 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            return fail(err, errlen, "write %s: %s", full, strerror(e));
        }
        off += (size_t)n;
    }
    close(fd);
    if (rename(tmp, full) != 0)
        return fail(err, errlen, "replace %s: %s", full, strerror(errno));
    return 0;
}

/* -- prepared in the parent ----------------------------------------------- */

void identity_prepare(struct identity_prep *prep)
{
    identity_release(prep);
    if (nic_name(prep->nic, sizeof prep->nic) != 0)
        prep->nic[0] = 0;
    prep->ioctl_sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    prep->random_fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
    prep->hooks = scan_hooks();
    prepare_boot_id();
    prep->ready = true;
}

void identity_release(struct identity_prep *prep)
{
    if (prep->ready) {
        if (prep->ioctl_sock >= 0)
            close(prep->ioctl_sock);
        if (prep->random_fd >= 0)
            close(prep->random_fd);
        free_hooks(prep->hooks);
    }
    memset(prep, 0, sizeof *prep);
    prep->ioctl_sock = prep->random_fd = -1;
}

/* -- all of it ---------------------------------------------------------- */

int identity_apply(json_object *msg, double received, bool run_hooks, const struct identity_prep *prep,
                   json_object *steps, char *err, size_t errlen)
{
    if (prep && !prep->ready)
        prep = NULL;
    double mark = received;
#define DONE(step)                                                                                      \
    do {                                                                                                \
        double now_ = monotonic_s();                                                                    \
        json_object_object_add(steps, step, json_object_new_double((now_ - mark) * 1000.0));            \
        mark = now_;                                                                                    \
    } while (0)
    json_object *ident, *v;
    if (!json_object_object_get_ex(msg, "identity", &ident) || !json_object_is_type(ident, json_type_object))
        return fail(err, errlen, "no identity in the message");
    if (json_object_object_get_ex(msg, "time", &v) && json_object_get_double(v) > 0) {
        if (set_clock(json_object_get_double(v), received, err, errlen))
            return -1;
        DONE("clock");
    }
    const char *s;
    if ((s = str_field(msg, "entropy")) && *s) {
        if (reseed(s, prep ? prep->random_fd : -1, err, errlen))
            return -1;
        DONE("rng");
    }
    if ((s = str_field(msg, "boot_id")) && *s) {
        if (set_boot_id(s, err, errlen))
            return -1;
        DONE("boot_id");
    }
    if (configure_network(ident, prep, err, errlen))
        return -1;
    DONE("network");
    const char *hostname = str_field(ident, "hostname");
    if (!hostname)
        return fail(err, errlen, "identity without hostname");
    if (set_hostname(hostname, err, errlen))
        return -1;
    DONE("hostname");
    if (json_object_object_get_ex(msg, "hosts", &v) && json_object_is_type(v, json_type_array) &&
        json_object_array_length(v) > 0) {
        if (identity_write_hosts(v, err, errlen))
            return -1;
    } else {
        json_object *one = json_object_new_array(), *pair = json_object_new_array();
        json_object_array_add(pair, json_object_new_string(hostname));
        json_object_array_add(pair, json_object_new_string(str_field(ident, "ip")));
        json_object_array_add(one, pair);
        int rc = identity_write_hosts(one, err, errlen);
        json_object_put(one);
        if (rc)
            return -1;
    }
    DONE("hosts");
    if ((s = str_field(msg, "machine_id")) && *s) {
        if (set_machine_id(s, err, errlen))
            return -1;
        DONE("machine_id");
    }
    if (run_hooks) {
        char **hooks = prep ? prep->hooks : scan_hooks();
        int rc = run_clone_hooks(ident, hooks, err, errlen);
        if (!prep)
            free_hooks(hooks);
        if (rc)
            return -1;
        DONE("hooks");
    }
#undef DONE
    return 0;
}
