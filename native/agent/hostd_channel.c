/* hostd's virtio-serial port and the lines that come on it (hostd_channel.h). */
#define _GNU_SOURCE
#include "hostd_channel.h"

#include "clone_api.h"
#include "identity.h"
#include "jobs_runner.h"
#include "line_io.h"

#include <fcntl.h>
#include <glob.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PROTOCOL_VERSION 2
#define PORT_NAME "org.sfmpi.0"
/* While no host is connected the port reports POLLHUP at once: look again later. */
#define PORT_RETRY_S 0.05

static struct {
    int fd;
    bool connected;
    double retry_at;
    struct line_buf in;
} port = {.fd = -1};

/* -- setup ------------------------------------------------------------------ */

static const char *find_port(char *out, size_t len)
{
    bool tried_modprobe = false;
    for (int tries = 0; tries < 1200; tries++) {
        if (access("/dev/virtio-ports/" PORT_NAME, F_OK) == 0)
            return "/dev/virtio-ports/" PORT_NAME;
        glob_t g;
        if (glob("/sys/class/virtio-ports/*/name", 0, NULL, &g) == 0) {
            for (size_t i = 0; i < g.gl_pathc; i++) {
                char name[64];
                if (strcmp(read_first_line(g.gl_pathv[i], name, sizeof name), PORT_NAME) == 0) {
                    char *dir = strdup(g.gl_pathv[i]);
                    *strrchr(dir, '/') = 0;
                    snprintf(out, len, "/dev/%s", strrchr(dir, '/') + 1);
                    free(dir);
                    if (access(out, F_OK) == 0) {
                        globfree(&g);
                        return out;
                    }
                }
            }
            globfree(&g);
        }
        if (!tried_modprobe) {
            tried_modprobe = true;
            if (system("modprobe virtio_console") != 0)
                fprintf(stderr, "sfmpi-agentd: modprobe virtio_console failed\n");
        }
        usleep(100000);
    }
    fprintf(stderr, "sfmpi-agentd: virtio-serial port %s not found\n", PORT_NAME);
    exit(1);
}

void open_hostd_port(int fd, const char *path)
{
    port.fd = fd;
    if (port.fd < 0) {
        char found[300];
        if (!path)
            path = find_port(found, sizeof found);
        port.fd = open(path, O_RDWR | O_CLOEXEC);
        if (port.fd < 0)
            die(path);
    }
}

/* -- to hostd ----------------------------------------------------------------- */

bool send_host(json_object *msg)
{
    bool ok = port.fd >= 0 && send_json(port.fd, msg, false);
    json_object_put(msg);
    return ok;
}

void forward_to_hostd(const char *line)
{
    if (port.fd >= 0)
        write_line(port.fd, line, strlen(line), false);
}

void send_ready(void)
{
    char hostname[256] = "", boot_id[64];
    double uptime = 0;
    gethostname(hostname, sizeof hostname);
    read_first_line(KERNEL_BOOT_ID, boot_id, sizeof boot_id);
    FILE *f = fopen("/proc/uptime", "re");
    if (f) {
        if (fscanf(f, "%lf", &uptime) != 1)
            uptime = 0;
        fclose(f);
    }
    json_object *msg = json_object_new_object();
    json_object_object_add(msg, "ev", json_object_new_string("ready"));
    json_object_object_add(msg, "version", json_object_new_int(PROTOCOL_VERSION));
    json_object_object_add(msg, "hostname", json_object_new_string(hostname));
    json_object_object_add(msg, "boot_id", json_object_new_string(boot_id));
    json_object_object_add(msg, "uptime", json_object_new_double(uptime));
    send_host(msg);
}

static void send_error(json_object *id, const char *message)
{
    json_object *ev = json_object_new_object();
    json_object_object_add(ev, "ev", json_object_new_string("error"));
    json_object_object_add(ev, "id", id ? json_object_get(id) : NULL);
    json_object_object_add(ev, "message", json_object_new_string(message));
    send_host(ev);
}

/* A call waiting for hostd would otherwise wait forever: hostd forgot it. */
static void host_gone(void)
{
    port.retry_at = monotonic_s() + PORT_RETRY_S;
    if (port.connected) {
        port.connected = false;
        fail_pending_calls("HostdError", "lost the connection to hostd");
    }
}

/* -- lines from hostd ------------------------------------------------------- */

/* The parent's identity at boot, or a host-side clone's after resume (an
 * in-guest clone's comes with the answer to its clone call). */
static void handle_identify(json_object *msg, double received)
{
    char err[1024];
    json_object *ident, *id, *steps = json_object_new_object();
    bool is_clone = json_object_object_get_ex(msg, "identity", &ident) &&
                    json_object_object_get_ex(ident, "id", &id) && json_object_get_int(id) != 0;
    int rc = identity_apply(msg, received, is_clone, NULL, steps, err, sizeof err);
    json_object_put(steps);
    json_object *ev = json_object_new_object();
    json_object_object_add(ev, "ev", json_object_new_string("identified"));
    json_object_object_add(ev, "ok", json_object_new_boolean(rc == 0));
    if (rc == 0)
        keep_identity(ident);
    else
        json_object_object_add(ev, "error", json_object_new_string(err));
    send_host(ev);
}

static void host_line(const char *line)
{
    double received = monotonic_s();
    json_object *msg = json_tokener_parse(line), *v;
    if (!msg || !json_object_is_type(msg, json_type_object)) {
        send_error(NULL, "malformed request");
    } else if (json_object_object_get_ex(msg, "re", &v)) {
        hostd_answered(msg, received);
    } else if (!json_object_object_get_ex(msg, "op", &v) || !json_object_is_type(v, json_type_string)) {
        send_error(NULL, "malformed request");
    } else if (strcmp(json_object_get_string(v), "ping") == 0) {
        send_ready();
    } else if (strcmp(json_object_get_string(v), "identify") == 0) {
        handle_identify(msg, received);
    } else {
        /* exec, signal, and whatever else: the jobs runner answers. */
        forward_to_jobs_runner(line);
    }
    if (msg)
        json_object_put(msg);
}

bool hostd_port_due(double now, double *next)
{
    if (now >= port.retry_at)
        return true;
    if (port.retry_at < *next)
        *next = port.retry_at;
    return false;
}

int hostd_port_fd(void)
{
    return port.fd;
}

void port_readable(short revents)
{
    if (!(revents & POLLIN)) {
        host_gone(); /* POLLHUP: no host connected; wait for one */
        return;
    }
    char chunk[65536];
    ssize_t n = read(port.fd, chunk, sizeof chunk);
    if (n <= 0) {
        host_gone();
        return;
    }
    port.connected = true;
    buf_append(&port.in, chunk, (size_t)n);
    char *line;
    while (buf_take_line(&port.in, &line)) {
        if (line[strspn(line, " \t\r")])
            host_line(line);
        free(line);
    }
    if (port.in.len > MAX_LINE)
        port.in.len = 0; /* not a line anybody sends: drop it */
}
