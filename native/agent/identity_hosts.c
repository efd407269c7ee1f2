/*
 * The clone's names: its hostname (kernel and /etc/hostname), and every
 * member of its family in /etc/hosts, so that each resolves by name (MPI
 * launchers need it).
 */
#define _GNU_SOURCE
#include "identity_steps.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HOSTS_FILE "/etc/hosts"
#define HOSTS_BEGIN "# sfmpi family begin"
#define HOSTS_END "# sfmpi family end"

int set_hostname(const char *name, char *err, size_t errlen)
{
    if (sethostname(name, strlen(name)) != 0)
        return fail(err, errlen, "set hostname %s: %s", name, strerror(errno));
    char text[300];
    snprintf(text, sizeof text, "%s\n", name);
    return write_atomic("/etc/hostname", text, err, errlen);
}

int identity_write_hosts(json_object *hosts, char *err, size_t errlen)
{
    char path[512];
    identity_path(HOSTS_FILE, path, sizeof path);
    size_t cap = 4096, len = 0;
    char *out = malloc(cap);
    if (!out)
        return fail(err, errlen, "out of memory");
    out[0] = 0;
#define APPEND(...)                                                                                     \
    do {                                                                                                \
        int need_ = snprintf(NULL, 0, __VA_ARGS__);                                                     \
        while (len + (size_t)need_ + 1 > cap)                                                           \
            out = realloc(out, cap *= 2);                                                               \
        len += (size_t)sprintf(out + len, __VA_ARGS__);                                                 \
    } while (0)
    FILE *f = fopen(path, "re");
    if (f) {
        char line[1024];
        int inside = 0;
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            if (strcmp(line, HOSTS_BEGIN) == 0)
                inside = 1;
            else if (strcmp(line, HOSTS_END) == 0)
                inside = 0;
            else if (!inside && strncmp(line, "127.0.1.1", 9) != 0)
                APPEND("%s\n", line);
        }
        fclose(f);
    } else {
        APPEND("127.0.0.1 localhost\n");
    }
    APPEND("%s\n", HOSTS_BEGIN);
    size_t n = json_object_is_type(hosts, json_type_array) ? json_object_array_length(hosts) : 0;
    for (size_t i = 0; i < n; i++) {
        json_object *pair = json_object_array_get_idx(hosts, i);
        if (!json_object_is_type(pair, json_type_array) || json_object_array_length(pair) != 2)
            continue;
        APPEND("%s %s\n", json_object_get_string(json_object_array_get_idx(pair, 1)),
               json_object_get_string(json_object_array_get_idx(pair, 0)));
    }
    APPEND("%s\n", HOSTS_END);
#undef APPEND
    int rc = write_atomic(HOSTS_FILE, out, err, errlen);
    free(out);
    return rc;
}
