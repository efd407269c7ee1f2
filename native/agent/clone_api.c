/* The clone-API socket server (clone_api.h). */
#define _GNU_SOURCE
#include "clone_api.h"

#include "hostd_channel.h"
#include "identity.h"
#include "line_io.h"

#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define API_VERSION 1
#define API_GROUP "sfmpi"

/* Clone-API calls that go to hostd, the fields they carry, and how long the
 * agent waits for hostd (0: as long as hostd is there; a lost connection
 * fails the call at once).  fork: the VM is forked inside the call, and the
 * answer differs in the parent and each clone. */
struct api_op {
    const char *name;
    const char *fields[4]; /* NULL-terminated: at most 3 */
    double timeout_s;
    bool fork;
};
static const struct api_op API_OPS[] = {
    {"ticket", {"n", "timeout", "resources"}, 60, false},
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
    int fd;
    struct client clients[MAX_CLIENTS];
    /* Request ids must not repeat in a clone either: the clone carries this
     * counter in memory, and hostd answers a clone's copy of request R. */
    long next_req;
    json_object *identity;
    /* Looked up before a fork op goes to hostd, used in each clone. */
    struct identity_prep prep;
} api = {.fd = -1,
         .clients = {[0 ... MAX_CLIENTS - 1] = {.fd = -1}},
         .next_req = 1,
         .prep = {.ioctl_sock = -1, .random_fd = -1}};

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

void fail_pending_calls(const char *type, const char *why)
{
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (api.clients[i].fd >= 0 && api.clients[i].req)
            answer_client(&api.clients[i], failure(type, why));
}

/* -- identity ---------------------------------------------------------------- */

void keep_identity(json_object *ident)
{
    if (api.identity)
        json_object_put(api.identity);
    api.identity = json_object_get(ident);
}

static json_object *whoami(void)
{
    if (!api.identity)
        return failure("HostdError", "this VM has no identity yet (hostd has not configured it)");
    json_object *ans = json_object_new_object(), *v;
    int id = json_object_object_get_ex(api.identity, "id", &v) ? json_object_get_int(v) : 0;
    json_object_object_add(ans, "v", json_object_new_int(API_VERSION));
    json_object_object_add(ans, "ok", json_object_new_boolean(1));
    json_object_object_add(ans, "id", json_object_new_int(id));
    json_object_object_add(ans, "role", json_object_new_string(id == 0 ? "parent" : "clone"));
    /* host: the physical host the VM runs on (a clone of a fork across hosts may be elsewhere). */
    const char *keys[] = {"family", "ip", "mac", "hostname", "ticket", "host", NULL};
    for (int i = 0; keys[i]; i++)
        json_object_object_add(ans, keys[i],
                               json_object_object_get_ex(api.identity, keys[i], &v) ? json_object_get(v) : NULL);
    return ans;
}

/* -- a program's request ------------------------------------------------------ */

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
        if (api.clients[i].fd >= 0 && api.clients[i].req && api.clients[i].op->fork)
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
        identity_prepare(&api.prep);
    json_object *fwd = json_object_new_object();
    long id = api.next_req++;
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

/* -- hostd's answer ------------------------------------------------------------ */

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
        int rc = identity_apply(answer, arrived, true, &api.prep, steps, err, sizeof err);
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

void hostd_answered(json_object *answer, double arrived)
{
    json_object *re, *ok;
    json_object_object_get_ex(answer, "re", &re);
    long id = json_object_is_type(re, json_type_int) ? json_object_get_int64(re) : 0;
    if (id <= 0)
        return; /* not an answer to anything this agent asked */
    for (int i = 0; i < MAX_CLIENTS; i++) {
        struct client *c = &api.clients[i];
        if (c->fd < 0 || c->req != id)
            continue;
        bool success = json_object_object_get_ex(answer, "ok", &ok) && json_object_get_boolean(ok);
        bool fork = c->op->fork;
        answer_client(c, success && fork ? fork_answer(c, answer, arrived) : to_client(answer));
        if (fork)
            identity_release(&api.prep);
        return;
    }
}

void check_deadlines(void)
{
    double now = monotonic_s();
    for (int i = 0; i < MAX_CLIENTS; i++) {
        struct client *c = &api.clients[i];
        if (c->fd >= 0 && c->req && c->deadline > 0 && now >= c->deadline) {
            char msg[200];
            snprintf(msg, sizeof msg, "hostd did not answer %s in %.0f s", c->op->name, c->op->timeout_s);
            answer_client(c, failure("HostdError", msg));
        }
    }
}

/* -- the socket and its connections -------------------------------------------- */

void listen_api(const char *path)
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
    api.fd = fd;
}

int api_listen_fd(void)
{
    return api.fd;
}

void accept_client(void)
{
    int fd = accept4(api.fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0)
        return;
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (api.clients[i].fd < 0) {
            api.clients[i].fd = fd;
            return;
        }
    }
    json_object *ans = failure("BusyError", "too many clone-API connections at once");
    send_json(fd, ans, true);
    json_object_put(ans);
    close(fd);
}

int poll_clients(struct pollfd *fds, struct client **owner, double *next)
{
    int n = 0;
    for (int i = 0; i < MAX_CLIENTS; i++) {
        struct client *c = &api.clients[i];
        if (c->fd < 0)
            continue;
        if (c->req) {
            /* waiting for hostd: the connection is not read again */
            if (c->deadline > 0 && c->deadline < *next)
                *next = c->deadline;
            continue;
        }
        owner[n] = c;
        fds[n++] = (struct pollfd){c->fd, POLLIN, 0};
    }
    return n;
}

void clients_readable(const struct pollfd *fds, struct client *const *owner, int n)
{
    /* A slot closed or reused since poll_clients is not read. */
    for (int i = 0; i < n; i++)
        if (fds[i].revents && owner[i]->fd == fds[i].fd)
            client_readable(owner[i]);
}
