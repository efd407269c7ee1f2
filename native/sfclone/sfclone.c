/*
 * libsfclone: the C client of protocol sfclone/1 (docs/clone-api.md).
 *
 * Each call connects to the agent's Unix socket, writes one JSON line, reads
 * one JSON line and closes.  json-c builds the requests and parses answers.
 */
#define _GNU_SOURCE /* SOCK_CLOEXEC, MSG_NOSIGNAL, GNU strerror_r */
#include "sfclone.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

/* Answers are small; a longer line means the other end is not the agent. */
#define MAX_ANSWER (1 << 20)

/* Returned by call() when the agent hung up without answering and the
 * caller asked to see that (exit); never leaves this file. */
#define HUNG_UP 1

/* The only mutable state: per thread, like errno. */
static _Thread_local char last_error[1024];

static int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

/* fail() with ": <strerror(errno)>" appended; strerror_r because strerror
 * may share a buffer between threads. */
static int fail_errno(int code, const char *what)
{
    char buf[256];
    return fail(code, "%s: %s", what, strerror_r(errno, buf, sizeof buf));
}

static const struct {
    const char *type;
    int code;
} error_types[] = {
    {"UsageError", SFC_EUSAGE},       {"RoleError", SFC_EROLE},
    {"TicketError", SFC_ETICKET},     {"BusyError", SFC_EBUSY},
    {"CapacityError", SFC_ECAPACITY}, {"CloneError", SFC_ECLONE},
    {"HostdError", SFC_EHOST},        {"ProtocolError", SFC_EPROTO},
};

const char *sfc_strerror(int code)
{
    switch (code) {
    case SFC_OK: return "success";
    case SFC_EFAIL: return "the agent reported an error";
    case SFC_EUSAGE: return "invalid request";
    case SFC_EROLE: return "not allowed in this VM's role";
    case SFC_ETICKET: return "unknown, used, killed or expired ticket";
    case SFC_EBUSY: return "a clone call is already in progress";
    case SFC_ECAPACITY: return "no clone slot available";
    case SFC_ECLONE: return "a clone failed to come up";
    case SFC_EHOST: return "the host daemon failed or is unreachable";
    case SFC_EPROTO: return "protocol error talking to the agent";
    case SFC_ECONNECT: return "cannot connect to the agent socket";
    default: return "unknown error code";
    }
}

const char *sfc_last_error(void)
{
    return last_error;
}

/* ---- transport ---------------------------------------------------------- */

static int connect_agent(int *fd_out)
{
    const char *path = getenv("SFMPI_API_SOCKET");
    if (path == NULL || *path == '\0')
        path = SFC_DEFAULT_SOCKET;

    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    if (len >= sizeof sa.sun_path)
        return fail(SFC_ECONNECT, "socket path too long: %s", path);
    memcpy(sa.sun_path, path, len + 1);

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fail_errno(SFC_ECONNECT, "socket");
    int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    if (rc < 0 && errno == EINTR) {
        /* An interrupted connect goes on in the background: wait for it
         * rather than connecting again (which would fail with EALREADY). */
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        while ((rc = poll(&p, 1, -1)) < 0 && errno == EINTR)
            ;
        if (rc > 0) {
            int err = 0;
            socklen_t elen = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen);
            errno = err;
            rc = err ? -1 : 0;
        }
    }
    if (rc < 0) {
        char what[sizeof sa.sun_path + 16];
        snprintf(what, sizeof what, "connect %s", path);
        int code = fail_errno(SFC_ECONNECT, what);
        close(fd);
        return code;
    }
    *fd_out = fd;
    return 0;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        /* MSG_NOSIGNAL: an agent that went away must not kill us with SIGPIPE. */
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail_errno(SFC_EPROTO, "send to agent");
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads up to the first newline into a malloc'd NUL-terminated *line.  Returns
 * HUNG_UP (message set) if the connection ends first.  A clone's answer comes
 * after the whole VM fork, so there is deliberately no timeout. */
static int read_line(int fd, char **line)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (buf == NULL)
        return fail(SFC_EPROTO, "out of memory");
    for (;;) {
        if (len + 1 == cap) {
            if (cap >= MAX_ANSWER) {
                free(buf);
                return fail(SFC_EPROTO, "answer longer than %d bytes", MAX_ANSWER);
            }
            char *bigger = realloc(buf, cap * 2);
            if (bigger == NULL) {
                free(buf);
                return fail(SFC_EPROTO, "out of memory");
            }
            buf = bigger;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n < 0)
                fail_errno(HUNG_UP, "read from agent");
            else
                fail(HUNG_UP, "the agent closed the connection without an answer");
            free(buf);
            return HUNG_UP;
        }
        char *nl = memchr(buf + len, '\n', (size_t)n);
        len += (size_t)n;
        if (nl != NULL) {
            *nl = '\0';
            *line = buf;
            return 0;
        }
    }
}

static json_object *new_request(const char *op)
{
    json_object *req = json_object_new_object();
    json_object_object_add(req, "v", json_object_new_int(SFC_PROTOCOL_VERSION));
    json_object_object_add(req, "op", json_object_new_string(op));
    return req;
}

/* Maps a failure answer's error object to its code and message. */
static int answer_error(json_object *ans)
{
    json_object *err, *type, *msg;
    if (!json_object_object_get_ex(ans, "error", &err) ||
        !json_object_object_get_ex(err, "type", &type) ||
        !json_object_is_type(type, json_type_string))
        return fail(SFC_EPROTO, "failure answer without an error type");
    const char *t = json_object_get_string(type);
    const char *m = json_object_object_get_ex(err, "message", &msg)
                        ? json_object_get_string(msg) : NULL;
    if (m == NULL)
        m = t;
    for (size_t i = 0; i < sizeof error_types / sizeof error_types[0]; i++)
        if (strcmp(t, error_types[i].type) == 0)
            return fail(error_types[i].code, "%s", m);
    return fail(SFC_EFAIL, "%s: %s", t, m);
}

/* One request/answer exchange; consumes req.  On success *ans is the answer
 * object (caller puts it).  A hang-up is SFC_EPROTO unless allow_hangup, for
 * which it returns HUNG_UP. */
static int call(json_object *req, json_object **ans, int allow_hangup)
{
    const char *text = json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN);
    int fd = -1, rc;
    char *line = NULL;
    *ans = NULL;

    if (text == NULL)
        rc = fail(SFC_EPROTO, "out of memory");
    else if ((rc = connect_agent(&fd)) == 0 &&
             (rc = write_all(fd, text, strlen(text))) == 0 &&
             (rc = write_all(fd, "\n", 1)) == 0)
        rc = read_line(fd, &line);
    if (fd >= 0)
        close(fd);
    json_object_put(req);
    if (rc == HUNG_UP && !allow_hangup)
        rc = SFC_EPROTO;
    if (rc != 0)
        return rc;

    json_object *a = json_tokener_parse(line);
    free(line);
    json_object *v, *ok;
    if (!json_object_is_type(a, json_type_object))
        rc = fail(SFC_EPROTO, "unparsable answer from the agent");
    else if (!json_object_object_get_ex(a, "v", &v) || !json_object_is_type(v, json_type_int) ||
             json_object_get_int64(v) != SFC_PROTOCOL_VERSION)
        rc = fail(SFC_EPROTO, "the agent speaks protocol version %s, this library %d",
                  json_object_object_get_ex(a, "v", &v) ? json_object_to_json_string(v) : "(none)",
                  SFC_PROTOCOL_VERSION);
    else if (!json_object_object_get_ex(a, "ok", &ok) || !json_object_is_type(ok, json_type_boolean))
        rc = fail(SFC_EPROTO, "answer without \"ok\"");
    else if (!json_object_get_boolean(ok))
        rc = answer_error(a);
    if (rc != 0) {
        json_object_put(a);
        return rc;
    }
    *ans = a;
    return 0;
}

/* ---- answer fields: a missing or mistyped field is a protocol error ------ */

static int get_int(json_object *obj, const char *key, int *out)
{
    json_object *f;
    if (!json_object_object_get_ex(obj, key, &f) || !json_object_is_type(f, json_type_int))
        return fail(SFC_EPROTO, "answer lacks integer \"%s\"", key);
    *out = json_object_get_int(f);
    return 0;
}

/* Copies a string field (an integer is taken as its decimal text, a null as
 * "") into buf; a value that does not fit is too_long. */
static int get_str(json_object *obj, const char *key, char *buf, size_t len, int too_long)
{
    json_object *f;
    if (!json_object_object_get_ex(obj, key, &f) ||
        !(f == NULL || json_object_is_type(f, json_type_string) || json_object_is_type(f, json_type_int)))
        return fail(SFC_EPROTO, "answer lacks string \"%s\"", key);
    const char *s = f ? json_object_get_string(f) : "";
    if (strlen(s) >= len)
        return fail(too_long, "\"%s\" does not fit in %zu bytes: %s", key, len, s);
    strcpy(buf, s);
    return 0;
}

static int get_obj(json_object *obj, const char *key, json_type type, json_object **out)
{
    if (!json_object_object_get_ex(obj, key, out) || !json_object_is_type(*out, type))
        return fail(SFC_EPROTO, "answer lacks %s \"%s\"", json_type_to_name(type), key);
    return 0;
}

/* The clone ID in a join answer's keys. */
static int parse_id(const char *key, int *id)
{
    char *end;
    errno = 0;
    long k = strtol(key, &end, 10);
    if (errno || end == key || *end != '\0' || k < 0 || k > 1000000)
        return fail(SFC_EPROTO, "bad clone ID in join answer: %s", key);
    *id = (int)k;
    return 0;
}

/* ---- the verbs ---------------------------------------------------------- */

int sfc_request_ticket(int n, double timeout_s, sfc_ticket *out)
{
    return sfc_request_ticket_with(n, timeout_s, NULL, out);
}

int sfc_request_ticket_with(int n, double timeout_s, const char *resources_json, sfc_ticket *out)
{
    if (out == NULL)
        return fail(SFC_EUSAGE, "sfc_request_ticket: out is NULL");
    json_object *resources = NULL;
    if (resources_json != NULL) {
        resources = json_tokener_parse(resources_json);
        if (resources == NULL || !json_object_is_type(resources, json_type_object)) {
            json_object_put(resources);
            return fail(SFC_EUSAGE, "sfc_request_ticket: resources is not a JSON object: %s", resources_json);
        }
    }
    json_object *req = new_request("ticket"), *ans, *t, *to;
    json_object_object_add(req, "n", json_object_new_int(n));
    if (timeout_s > 0)
        json_object_object_add(req, "timeout", json_object_new_double(timeout_s));
    if (resources != NULL)
        json_object_object_add(req, "resources", resources);
    int rc = call(req, &ans, 0);
    if (rc != 0)
        return rc;
    sfc_ticket r = {0};
    if ((rc = get_obj(ans, "ticket", json_type_object, &t)) == 0 &&
        (rc = get_str(t, "id", r.id, sizeof r.id, SFC_EPROTO)) == 0 &&
        (rc = get_int(t, "requested", &r.requested)) == 0 &&
        (rc = get_int(t, "granted", &r.granted)) == 0 &&
        (rc = get_str(t, "family", r.family, sizeof r.family, SFC_EPROTO)) == 0) {
        /* timeout is optional and null when the ticket has none */
        if (json_object_object_get_ex(t, "timeout", &to) && to != NULL)
            r.timeout = json_object_get_double(to);
        *out = r;
    }
    json_object_put(ans);
    return rc;
}

int sfc_clone(const sfc_ticket *t, int *id_out)
{
    if (t == NULL || id_out == NULL)
        return fail(SFC_EUSAGE, "sfc_clone: NULL argument");
    json_object *req = new_request("clone"), *ans;
    json_object_object_add(req, "ticket", json_object_new_string(t->id));
    int rc = call(req, &ans, 0);
    if (rc == 0) {
        rc = get_int(ans, "id", id_out);
        json_object_put(ans);
    }
    return rc;
}

int sfc_checkpoint_parent(sfc_checkpoint *out, int *id_out)
{
    if (out == NULL)
        return fail(SFC_EUSAGE, "sfc_checkpoint_parent: out is NULL");
    json_object *ans, *c;
    int rc = call(new_request("checkpoint"), &ans, 0);
    if (rc != 0)
        return rc;
    sfc_checkpoint r = {0};
    int id = 0;
    json_object *k;
    /* "id" may be left out in the parent, where it is 0 (as sfmpi.api reads it) */
    if ((rc = get_obj(ans, "checkpoint", json_type_object, &c)) == 0 &&
        (rc = get_str(c, "id", r.id, sizeof r.id, SFC_EPROTO)) == 0 &&
        (rc = get_str(c, "family", r.family, sizeof r.family, SFC_EPROTO)) == 0 &&
        (!json_object_object_get_ex(ans, "id", &k) || (rc = get_int(ans, "id", &id)) == 0)) {
        *out = r;
        if (id_out != NULL)
            *id_out = id;
    }
    json_object_put(ans);
    return rc;
}

int sfc_create_clones(const sfc_checkpoint *c, const sfc_ticket *t, int *clone_ids, int max,
                      int *count)
{
    if (c == NULL || t == NULL || count == NULL || (clone_ids == NULL && max > 0))
        return fail(SFC_EUSAGE, "sfc_create_clones: NULL argument");
    json_object *req = new_request("create_clones"), *ans, *clones;
    json_object_object_add(req, "checkpoint", json_object_new_string(c->id));
    json_object_object_add(req, "ticket", json_object_new_string(t->id));
    int rc = call(req, &ans, 0);
    if (rc != 0)
        return rc;
    if ((rc = get_obj(ans, "clones", json_type_array, &clones)) == 0) {
        int n = (int)json_object_array_length(clones);
        for (int i = 0; i < n && rc == 0; i++) {
            json_object *e = json_object_array_get_idx(clones, (size_t)i);
            if (!json_object_is_type(e, json_type_int))
                rc = fail(SFC_EPROTO, "non-integer clone ID in create_clones answer");
            else if (i < max)
                clone_ids[i] = json_object_get_int(e);
        }
        if (rc == 0)
            *count = n;
    }
    json_object_put(ans);
    return rc;
}

int sfc_exit(int status)
{
    json_object *req = new_request("exit"), *ans;
    json_object_object_add(req, "status", json_object_new_int(status));
    int rc = call(req, &ans, 1);
    if (rc == HUNG_UP) {
        /* The agent may hang up a moment before the host destroys the VM:
         * give it that moment before reporting that exit did not happen. */
        struct timespec ts = {.tv_sec = 1};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
        return fail(SFC_EHOST, "exit: the agent hung up but the VM was not destroyed");
    }
    if (rc == 0) {
        json_object_put(ans);
        return fail(SFC_EHOST, "exit: the agent answered but the VM was not destroyed");
    }
    return rc;
}

int sfc_join(const sfc_ticket *t, int *statuses, int max, int *count)
{
    if (t == NULL || count == NULL || (statuses == NULL && max > 0))
        return fail(SFC_EUSAGE, "sfc_join: NULL argument");
    json_object *req = new_request("join"), *ans, *st, *fl;
    json_object_object_add(req, "ticket", json_object_new_string(t->id));
    int rc = call(req, &ans, 0);
    if (rc != 0)
        return rc;
    int n = 0, id;
    if ((rc = get_obj(ans, "statuses", json_type_object, &st)) == 0) {
        json_object_object_foreach(st, key, val) {
            if ((rc = parse_id(key, &id)) != 0)
                break;
            if (!json_object_is_type(val, json_type_int)) {
                rc = fail(SFC_EPROTO, "non-integer status for clone %s", key);
                break;
            }
            if (id < max)
                statuses[id] = json_object_get_int(val);
            n++;
        }
    }
    /* failures may be absent when there are none */
    if (rc == 0 && json_object_object_get_ex(ans, "failures", &fl) && fl != NULL) {
        if (!json_object_is_type(fl, json_type_object))
            rc = fail(SFC_EPROTO, "answer lacks object \"failures\"");
        /* Build the message in a local buffer so a protocol error below
         * leaves its own text in last_error. */
        char msg[sizeof last_error] = "";
        size_t used = 0;
        if (rc == 0) {
            json_object_object_foreach(fl, key, val) {
                if ((rc = parse_id(key, &id)) != 0)
                    break;
                if (id < max)
                    statuses[id] = -1;
                n++;
                int w = snprintf(msg + used, sizeof msg - used, "%s%d: %s", used ? "; " : "", id,
                                 json_object_get_string(val));
                used = w < 0 ? used : used + (size_t)w;
                if (used >= sizeof msg)
                    used = sizeof msg - 1; /* truncated: keep what fits */
            }
        }
        if (rc == 0 && used > 0)
            memcpy(last_error, msg, sizeof msg);
    }
    if (rc == 0)
        *count = n;
    json_object_put(ans);
    return rc;
}

int sfc_members(const sfc_ticket *t, sfc_member *members, int max, int *count)
{
    if (t == NULL || count == NULL || (members == NULL && max > 0))
        return fail(SFC_EUSAGE, "sfc_members: NULL argument");
    json_object *req = new_request("members"), *ans, *list;
    json_object_object_add(req, "ticket", json_object_new_string(t->id));
    int rc = call(req, &ans, 0);
    if (rc != 0)
        return rc;
    int n = 0;
    if ((rc = get_obj(ans, "members", json_type_array, &list)) == 0) {
        n = (int)json_object_array_length(list);
        for (int i = 0; i < n && i < max && rc == 0; i++) {
            json_object *m = json_object_array_get_idx(list, (size_t)i), *st;
            sfc_member r = {.status = -1};
            if (!json_object_is_type(m, json_type_object))
                rc = fail(SFC_EPROTO, "member %d is not an object", i);
            else if ((rc = get_int(m, "id", &r.id)) == 0 &&
                     (rc = get_str(m, "state", r.state, sizeof r.state, SFC_EPROTO)) == 0 &&
                     (rc = get_str(m, "ip", r.ip, sizeof r.ip, SFC_EPROTO)) == 0 &&
                     (rc = get_str(m, "hostname", r.hostname, sizeof r.hostname, SFC_EPROTO)) == 0) {
                /* status is null unless the clone exited */
                if (json_object_object_get_ex(m, "status", &st) && json_object_is_type(st, json_type_int))
                    r.status = json_object_get_int(st);
                members[i] = r;
            }
        }
    }
    if (rc == 0)
        *count = n;
    json_object_put(ans);
    return rc;
}

int sfc_kill(const sfc_ticket *t)
{
    if (t == NULL)
        return fail(SFC_EUSAGE, "sfc_kill: t is NULL");
    json_object *req = new_request("kill"), *ans;
    json_object_object_add(req, "ticket", json_object_new_string(t->id));
    int rc = call(req, &ans, 0);
    if (rc == 0)
        json_object_put(ans);
    return rc;
}

int sfc_whoami(int *id, char *role, size_t rlen, char *ip, size_t iplen, char *hostname,
               size_t hlen)
{
    json_object *ans;
    int rc = call(new_request("whoami"), &ans, 0);
    if (rc != 0)
        return rc;
    /* Decode into locals first so a failure leaves the caller's buffers alone. */
    char r[64], a[64], h[256];
    int k;
    if ((rc = get_int(ans, "id", &k)) == 0 &&
        (rc = get_str(ans, "role", r, sizeof r, SFC_EPROTO)) == 0 &&
        (rc = get_str(ans, "ip", a, sizeof a, SFC_EPROTO)) == 0 &&
        (rc = get_str(ans, "hostname", h, sizeof h, SFC_EPROTO)) == 0) {
        if ((role && strlen(r) >= rlen) || (ip && strlen(a) >= iplen) ||
            (hostname && strlen(h) >= hlen))
            rc = fail(SFC_EUSAGE, "sfc_whoami: buffer too small for role %s, ip %s, hostname %s",
                      r, a, h);
        else {
            if (id)
                *id = k;
            if (role)
                strcpy(role, r);
            if (ip)
                strcpy(ip, a);
            if (hostname)
                strcpy(hostname, h);
        }
    }
    json_object_put(ans);
    return rc;
}
