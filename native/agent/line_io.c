/* Line I/O shared by the agent's channels (line_io.h). */
#define _GNU_SOURCE
#include "line_io.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

void die(const char *what)
{
    fprintf(stderr, "sfmpi-agentd: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* -- line buffers --------------------------------------------------------- */

int buf_append(struct line_buf *b, const char *data, size_t n)
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

int buf_take_line(struct line_buf *b, char **line)
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

bool write_line(int fd, const char *text, size_t len, bool sock)
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

bool send_json(int fd, json_object *msg, bool sock)
{
    size_t len;
    const char *text = json_object_to_json_string_length(msg, JSON_C_TO_STRING_PLAIN, &len);
    return write_line(fd, text, len, sock);
}
