/*
 * sfmpi-agentd: the guest agent, root from boot, hostd's end in the guest.
 *
 * It owns the two channels of the guest:
 * - the virtio-serial port to hostd (wire protocol 2, documented in
 *   sfmpi/guest/agent.py): pings, identities, answers to clone-API calls;
 * - the clone-API socket for programs in the guest (/run/sfmpi/api.sock,
 *   protocol sfclone/1, docs/clone-api.md): calls forwarded to hostd.
 * Running commands for `vm exec` (exec, signal) is left to the Python part
 * (sfmpi.guest.agent --jobs-fd), a child that gets those lines over a
 * socketpair and whose events go to hostd unchanged.
 *
 * Why this part is C: a clone's clone call returns only after the clone has
 * re-identified itself, and a resumed clone runs every code path cold.  Under
 * TCG each path is translated again per clone: the Python agent took about
 * 0.3 s of CPU per clone from the answer to "cloned", so 8 clones on 2 cores
 * needed 1.3 s more than with this.  Under KVM it would not matter.
 *
 * One thread, one poll loop.  It runs SCHED_FIFO (reset on fork, so nothing it
 * starts inherits it): in a clone it is first to run after resume, before
 * what wakes up with it (systemd on the clock step, kernel workers).
 */
#define _GNU_SOURCE
#include "identity.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROTOCOL_VERSION 2
#define API_VERSION 1
#define PORT_NAME "org.sfmpi.0"
#define DEFAULT_API_SOCKET "/run/sfmpi/api.sock"
#define API_GROUP "sfmpi"
#define DEFAULT_PYTHON "/usr/bin/python3"
#define MAX_CLIENTS 256
#define MAX_LINE (1 << 20)
#define REALTIME_PRIORITY 10
/* While no host is connected the port reports POLLHUP at once: look again later. */
#define PORT_RETRY_S 0.05

/* Clone-API calls that go to hostd, the fields they carry, and how long the
 * agent waits for hostd (0: as long as hostd is there; a lost connection
 * fails the call at once).  fork: the VM is forked inside the call, and the
 * answer differs in the parent and each clone. */
struct api_op {
    const char *name;
    const char *fields[3];
    double timeout_s;
    bool fork;
};
static const struct api_op API_OPS[] = {
    {"ticket", {"n", "timeout", NULL}, 60, false},
    {"clone", {"ticket", NULL, NULL}, 900, true},
    {"checkpoint", {NULL, NULL, NULL}, 900, true},
    {"create_clones", {"checkpoint", "ticket", NULL}, 900, true},
    {"exit", {"status", NULL, NULL}, 120, false},
    {"join", {"ticket", "timeout", NULL}, 0, false},
    {"kill", {"ticket", NULL, NULL}, 120, false},
    {"members", {"ticket", NULL, NULL}, 60, false},
};
/* What hostd sends a clone for its re-identification only; the program's
 * answer leaves it out. */
static const char *const PRIVATE_FIELDS[] = {"re", "identity", "time", "entropy", "machine_id", "boot_id",
                                             "hosts", NULL};

struct line_buf {
    char *data;
    size_t len, cap;
};

/* A program's connection: reading its one request, then waiting for hostd. */
struct client {
    int fd; /* -1: slot free */
    struct line_buf in;
    long req; /* 0: request not forwarded yet */
    const struct api_op *op;
    double deadline; /* 0: none */
    double sent;
};

static struct {
    int port;
    bool connected;
    double port_retry_at;
    struct line_buf port_in;
    int jobs;
    pid_t jobs_pid;
    struct line_buf jobs_in;
    int api;
    struct client clients[MAX_CLIENTS];
    /* Request ids must not repeat in a clone either: the clone carries this
     * counter in memory, and hostd answers a clone's copy of request R. */
    long next_req;
    json_object *identity;
    /* Looked up before a fork op goes to hostd, used in each clone. */
    struct identity_prep prep;
} A = {.port = -1, .jobs = -1, .api = -1, .next_req = 1, .prep = {.ioctl_sock = -1, .random_fd = -1}};

static void die(const char *what)
{
    fprintf(stderr, "sfmpi-agentd: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* -- line buffers --------------------------------------------------------- */

static int buf_append(struct line_buf *b, const char *data, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (b->len + n + 1 > cap)
            cap *= 2;
        char *p = realloc(b->data, cap);
        if (!p)
            return -1;
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = 0;
    return 0;
}

/* Takes the next complete line out of b into *line (malloc'd); 0 if none. */
static int buf_take_line(struct line_buf *b, char **line)
{
    char *nl = b->len ? memchr(b->data, '\n', b->len) : NULL;
    if (!nl)
        return 0;
    size_t n = (size_t)(nl - b->data);
    *line = strndup(b->data, n);
    memmove(b->data, nl + 1, b->len - n - 1);
    b->len -= n + 1;
    b->data[b->len] = 0;
    return 1;
}

/* -- writing -------------------------------------------------------------- */

static bool write_all(int fd, const char *data, size_t len, bool sock)
{
    while (len > 0) {
        ssize_t n = sock ? send(fd, data, len, MSG_NOSIGNAL) : write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return false;
        }
        data += n;
        len -= (size_t)n;
    }
    return true;
}

/* `text` and a newline in one write: the line arrives whole at the other end. */
static bool write_line(int fd, const char *text, size_t len, bool sock)
{
    char *line = malloc(len + 1);
    if (!line)
        return false;
    memcpy(line, text, len);
    line[len] = '\n';
    bool ok = write_all(fd, line, len + 1, sock);
    free(line);
    return ok;
}

static bool send_json(int fd, json_object *msg, bool sock)
{
    size_t len;
    const char *text = json_object_to_json_string_length(msg, JSON_C_TO_STRING_PLAIN, &len);
    return write_line(fd, text, len, sock);
}

/* To hostd.  No host connected: the message has nobody to go to (the host
 * pings on connect, so nothing is lost that matters). */
static bool send_host(json_object *msg)
{
    bool ok = A.port >= 0 && send_json(A.port, msg, false);
    json_object_put(msg);
    return ok;
}

static json_object *failure(const char *type, const char *message)
{
    json_object *ans = json_object_new_object(), *err = json_object_new_object();
    json_object_object_add(ans, "v", json_object_new_int(API_VERSION));
    json_object_object_add(ans, "ok", json_object_new_boolean(0));
    json_object_object_add(err, "type", json_object_new_string(type));
    json_object_object_add(err, "message", json_object_new_string(message));
    json_object_object_add(ans, "error", err);
    return ans;
}

static void close_client(struct client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    free(c->in.data);
    memset(c, 0, sizeof *c);
    c->fd = -1;
}

/* The program gets its one answer and the connection ends. */
static void answer_client(struct client *c, json_object *ans)
{
    send_json(c->fd, ans, true); /* the caller may be gone: nothing to undo */
    json_object_put(ans);
    close_client(c);
}

/* -- to hostd: ready, and the failure of every waiting call ---------------- */

static void send_ready(void)
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

static void fail_pending(const char *type, const char *why)
{
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (A.clients[i].fd >= 0 && A.clients[i].req)
            answer_client(&A.clients[i], failure(type, why));
}

/* A call waiting for hostd would otherwise wait forever: hostd forgot it. */
static void host_gone(void)
{
    A.port_retry_at = monotonic_s() + PORT_RETRY_S;
    if (A.connected) {
        A.connected = false;
        fail_pending("HostdError", "lost the connection to hostd");
    }
}

/* -- identities ------------------------------------------------------------ */

static void keep_identity(json_object *ident)
{
    if (A.identity)
        json_object_put(A.identity);
    A.identity = json_object_get(ident);
}

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

static json_object *whoami(void)
{
    if (!A.identity)
        return failure("HostdError", "this VM has no identity yet (hostd has not configured it)");
    json_object *ans = json_object_new_object(), *v;
    int id = json_object_object_get_ex(A.identity, "id", &v) ? json_object_get_int(v) : 0;
    json_object_object_add(ans, "v", json_object_new_int(API_VERSION));
    json_object_object_add(ans, "ok", json_object_new_boolean(1));
    json_object_object_add(ans, "id", json_object_new_int(id));
    json_object_object_add(ans, "role", json_object_new_string(id == 0 ? "parent" : "clone"));
    const char *keys[] = {"family", "ip", "mac", "hostname", "ticket", NULL};
    for (int i = 0; keys[i]; i++)
        json_object_object_add(ans, keys[i],
                               json_object_object_get_ex(A.identity, keys[i], &v) ? json_object_get(v) : NULL);
    return ans;
}

/* -- the clone API: a program's request ------------------------------------ */

static const struct api_op *find_op(const char *name)
{
    for (size_t i = 0; i < sizeof API_OPS / sizeof API_OPS[0]; i++)
        if (strcmp(API_OPS[i].name, name) == 0)
            return &API_OPS[i];
    return NULL;
}

static bool fork_in_progress(void)
{
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (A.clients[i].fd >= 0 && A.clients[i].req && A.clients[i].op->fork)
            return true;
    return false;
}

/* Returns the answer, or NULL when the request went to hostd. */
static json_object *handle_request(struct client *c, const char *line)
{
    json_object *req = json_tokener_parse(line), *v;
    json_object *ans = NULL;
    if (!req || !json_object_is_type(req, json_type_object)) {
        ans = failure("UsageError", "malformed request: one JSON object per line expected");
        goto out;
    }
    if (!json_object_object_get_ex(req, "v", &v) || !json_object_is_type(v, json_type_int) ||
        json_object_get_int(v) != API_VERSION) {
        char msg[300];
        snprintf(msg, sizeof msg, "protocol version %s not supported (this agent speaks sfclone/%d)",
                 json_object_object_get_ex(req, "v", &v) ? json_object_to_json_string(v) : "None", API_VERSION);
        ans = failure("ProtocolError", msg);
        goto out;
    }
    const char *name = json_object_object_get_ex(req, "op", &v) && json_object_is_type(v, json_type_string)
                           ? json_object_get_string(v)
                           : "";
    if (strcmp(name, "whoami") == 0) {
        ans = whoami();
        goto out;
    }
    const struct api_op *op = find_op(name);
    if (!op) {
        char msg[300];
        snprintf(msg, sizeof msg, "unknown op '%.200s'", name);
        ans = failure("UsageError", msg);
        goto out;
    }
    if (op->fork && fork_in_progress()) {
        ans = failure("BusyError", "another clone call is in progress in this VM");
        goto out;
    }
    if (op->fork)
        identity_prepare(&A.prep);
    json_object *fwd = json_object_new_object();
    long id = A.next_req++;
    json_object_object_add(fwd, "req", json_object_new_int64(id));
    json_object_object_add(fwd, "op", json_object_new_string(op->name));
    for (int i = 0; op->fields[i]; i++)
        json_object_object_add(fwd, op->fields[i],
                               json_object_object_get_ex(req, op->fields[i], &v) ? json_object_get(v) : NULL);
    /* Waiting before it is sent: hostd may stop this VM for the checkpoint
     * the moment the request arrives, and each clone must resume waiting. */
    c->sent = monotonic_s();
    c->req = id;
    c->op = op;
    c->deadline = op->timeout_s > 0 ? c->sent + op->timeout_s : 0;
    if (!send_host(fwd)) {
        c->req = 0;
        ans = failure("HostdError", "the agent cannot reach hostd (virtio-serial port closed)");
    }
out:
    if (req)
        json_object_put(req);
    return ans;
}

static void client_readable(struct client *c)
{
    char chunk[4096];
    ssize_t n = read(c->fd, chunk, sizeof chunk);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        close_client(c);
        return;
    }
    if (buf_append(&c->in, chunk, (size_t)n) != 0 || c->in.len > MAX_LINE) {
        close_client(c);
        return;
    }
    char *line;
    if (!buf_take_line(&c->in, &line))
        return;
    json_object *ans = handle_request(c, line);
    free(line);
    if (ans)
        answer_client(c, ans);
}

/* -- the clone API: hostd's answer ------------------------------------------ */

static json_object *to_client(json_object *answer)
{
    json_object *out = json_object_new_object();
    json_object_object_foreach(answer, key, val)
    {
        bool private = false;
        for (int i = 0; PRIVATE_FIELDS[i]; i++)
            private |= strcmp(key, PRIVATE_FIELDS[i]) == 0;
        if (!private)
            json_object_object_add(out, key, json_object_get(val));
    }
    json_object_object_add(out, "v", json_object_new_int(API_VERSION));
    return out;
}

/* A call the VM was forked inside.  With an identity in the answer we are a
 * clone: nothing runs in the program before it is applied. */
static json_object *fork_answer(struct client *c, json_object *answer, double arrived)
{
    json_object *ident, *v;
    if (json_object_object_get_ex(answer, "identity", &ident)) {
        json_object *clone_id = json_object_object_get_ex(answer, "id", &v) ? v : NULL;
        json_object *steps = json_object_new_object();
        char err[1024];
        double t0 = monotonic_s();
        int rc = identity_apply(answer, arrived, true, &A.prep, steps, err, sizeof err);
        json_object *ev = json_object_new_object();
        json_object_object_add(ev, "ev", json_object_new_string("cloned"));
        json_object_object_add(ev, "id", json_object_get(clone_id));
        json_object_object_add(ev, "ok", json_object_new_boolean(rc == 0));
        if (rc != 0) {
            json_object_put(steps);
            json_object_object_add(ev, "error", json_object_new_string(err));
            send_host(ev);
            /* hostd destroys this VM now; the caller never sees a return. */
            char msg[1200];
            snprintf(msg, sizeof msg, "clone %s: %s", clone_id ? json_object_to_json_string(clone_id) : "?", err);
            return failure("CloneError", msg);
        }
        keep_identity(ident);
        /* Where a clone's time goes in the guest (hostd logs it).  The guest's
         * clock stood still from the parent's pause to the clone's resume, so
         * to_answer is mostly the clone's time from resume to the answer. */
        json_object_object_add(steps, "to_answer", json_object_new_double((arrived - c->sent) * 1000.0));
        json_object_object_add(steps, "identity", json_object_new_double((monotonic_s() - t0) * 1000.0));
        json_object_object_add(ev, "guest_ms", steps);
        send_host(ev);
    } else if (json_object_object_get_ex(answer, "hosts", &v)) {
        char err[1024];
        identity_write_hosts(v, err, sizeof err); /* the parent's view of its family; best effort */
    }
    return to_client(answer);
}

static void hostd_answered(json_object *answer, double arrived)
{
    json_object *re, *ok;
    json_object_object_get_ex(answer, "re", &re);
    long id = json_object_is_type(re, json_type_int) ? json_object_get_int64(re) : 0;
    if (id <= 0)
        return; /* not an answer to anything this agent asked */
    for (int i = 0; i < MAX_CLIENTS; i++) {
        struct client *c = &A.clients[i];
        if (c->fd < 0 || c->req != id)
            continue;
        bool success = json_object_object_get_ex(answer, "ok", &ok) && json_object_get_boolean(ok);
        bool fork = c->op->fork;
        answer_client(c, success && fork ? fork_answer(c, answer, arrived) : to_client(answer));
        if (fork)
            identity_release(&A.prep);
        return;
    }
}

static void check_deadlines(void)
{
    double now = monotonic_s();
    for (int i = 0; i < MAX_CLIENTS; i++) {
        struct client *c = &A.clients[i];
        if (c->fd >= 0 && c->req && c->deadline > 0 && now >= c->deadline) {
            char msg[200];
            snprintf(msg, sizeof msg, "hostd did not answer %s in %.0f s", c->op->name, c->op->timeout_s);
            answer_client(c, failure("HostdError", msg));
        }
    }
}

/* -- lines from hostd ------------------------------------------------------- */

static void send_error(json_object *id, const char *message)
{
    json_object *ev = json_object_new_object();
    json_object_object_add(ev, "ev", json_object_new_string("error"));
    json_object_object_add(ev, "id", id ? json_object_get(id) : NULL);
    json_object_object_add(ev, "message", json_object_new_string(message));
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
    } else if (A.jobs >= 0) {
        /* exec, signal, and whatever else: the jobs runner answers. */
        write_line(A.jobs, line, strlen(line), true);
    }
    if (msg)
        json_object_put(msg);
}

static void port_readable(short revents)
{
    if (!(revents & POLLIN)) {
        host_gone(); /* POLLHUP: no host connected; wait for one */
        return;
    }
    char chunk[65536];
    ssize_t n = read(A.port, chunk, sizeof chunk);
    if (n <= 0) {
        host_gone();
        return;
    }
    A.connected = true;
    buf_append(&A.port_in, chunk, (size_t)n);
    char *line;
    while (buf_take_line(&A.port_in, &line)) {
        if (line[strspn(line, " \t\r")])
            host_line(line);
        free(line);
    }
    if (A.port_in.len > MAX_LINE)
        A.port_in.len = 0; /* not a line anybody sends: drop it */
}

static void jobs_readable(void)
{
    char chunk[65536];
    ssize_t n = read(A.jobs, chunk, sizeof chunk);
    if (n <= 0) {
        /* The jobs runner died: systemd restarts the whole agent. */
        fprintf(stderr, "sfmpi-agentd: the jobs runner (pid %d) went away\n", (int)A.jobs_pid);
        exit(1);
    }
    buf_append(&A.jobs_in, chunk, (size_t)n);
    char *line;
    while (buf_take_line(&A.jobs_in, &line)) {
        if (A.port >= 0)
            write_line(A.port, line, strlen(line), false);
        free(line);
    }
}

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

static void start_jobs_runner(const char *python)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        die("socketpair");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        if (dup2(sv[1], 3) < 0)
            _exit(127);
        execl(python, python, "-m", "sfmpi.guest.agent", "--jobs-fd", "3", (char *)NULL);
        fprintf(stderr, "sfmpi-agentd: run %s: %s\n", python, strerror(errno));
        _exit(127);
    }
    close(sv[1]);
    A.jobs = sv[0];
    A.jobs_pid = pid;
}

static void listen_api(const char *path)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        mkdir(dir, 0755);
    }
    unlink(path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 64) != 0)
        die(path);
    /* Root and the members of group sfmpi may fork this VM; without the group, root only. */
    struct group *g = getgrnam(API_GROUP);
    if (g && chown(path, 0, g->gr_gid) == 0)
        chmod(path, 0660);
    else
        chmod(path, 0600);
    A.api = fd;
}

static void accept_client(void)
{
    int fd = accept4(A.api, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0)
        return;
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (A.clients[i].fd < 0) {
            A.clients[i].fd = fd;
            return;
        }
    }
    json_object *ans = failure("BusyError", "too many clone-API connections at once");
    send_json(fd, ans, true);
    json_object_put(ans);
    close(fd);
}

static void usage(void)
{
    fprintf(stderr, "usage: sfmpi-agentd [--port PATH | --port-fd N] [--api-socket PATH] [--python PATH]\n"
                    "                    [--realtime on|off]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *port_path = NULL, *api_path = DEFAULT_API_SOCKET, *python = DEFAULT_PYTHON;
    bool realtime = true;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        if (strcmp(argv[i], "--port") == 0)
            port_path = argv[++i];
        else if (strcmp(argv[i], "--port-fd") == 0)
            A.port = atoi(argv[++i]);
        else if (strcmp(argv[i], "--api-socket") == 0)
            api_path = argv[++i];
        else if (strcmp(argv[i], "--python") == 0)
            python = argv[++i];
        else if (strcmp(argv[i], "--realtime") == 0)
            realtime = strcmp(argv[++i], "off") != 0;
        else
            usage();
    }
    for (int i = 0; i < MAX_CLIENTS; i++)
        A.clients[i].fd = -1;
    struct sched_param sp = {.sched_priority = REALTIME_PRIORITY};
    if (realtime && sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &sp) != 0)
        fprintf(stderr, "sfmpi-agentd: no real-time priority (%s): clones answer slower\n", strerror(errno));
    if (A.port < 0) {
        char found[300];
        if (!port_path)
            port_path = find_port(found, sizeof found);
        A.port = open(port_path, O_RDWR | O_CLOEXEC);
        if (A.port < 0)
            die(port_path);
    }
    start_jobs_runner(python);
    listen_api(api_path);
    send_ready();
    for (;;) {
        struct pollfd fds[3 + MAX_CLIENTS];
        struct client *owner[3 + MAX_CLIENTS];
        int n = 0;
        double now = monotonic_s(), next = now + 1.0;
        bool port_polled = now >= A.port_retry_at;
        if (port_polled)
            fds[n++] = (struct pollfd){A.port, POLLIN, 0};
        else if (A.port_retry_at < next)
            next = A.port_retry_at;
        fds[n++] = (struct pollfd){A.jobs, POLLIN, 0};
        fds[n++] = (struct pollfd){A.api, POLLIN, 0};
        int fixed = n;
        for (int i = 0; i < MAX_CLIENTS; i++) {
            struct client *c = &A.clients[i];
            if (c->fd < 0)
                continue;
            if (c->req) {
                /* waiting for hostd: the connection is not read again */
                if (c->deadline > 0 && c->deadline < next)
                    next = c->deadline;
                continue;
            }
            owner[n] = c;
            fds[n++] = (struct pollfd){c->fd, POLLIN, 0};
        }
        int timeout = (int)((next - now) * 1000) + 1;
        if (poll(fds, (nfds_t)n, timeout < 0 ? 0 : timeout) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        int k = 0;
        if (port_polled) {
            if (fds[k].revents)
                port_readable(fds[k].revents);
            k++;
        }
        if (fds[k++].revents)
            jobs_readable();
        if (fds[k++].revents & POLLIN)
            accept_client();
        for (int i = fixed; i < n; i++)
            if (fds[i].revents && owner[i]->fd == fds[i].fd)
                client_readable(owner[i]);
        check_deadlines();
    }
}
