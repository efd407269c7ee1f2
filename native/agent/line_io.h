/*
 * Line I/O shared by the agent's channels (hostd's port, the clone-API
 * connections, the jobs runner's socketpair): every message on each of them
 * is one JSON object per line.
 */
#ifndef SFMPI_AGENT_LINE_IO_H
#define SFMPI_AGENT_LINE_IO_H

#include <stdbool.h>
#include <stddef.h>

#include <json-c/json.h>

/* Longer than any line anybody sends: such input is dropped. */
#define MAX_LINE (1 << 20)

/* What has been read of a channel and is not a whole line yet. */
struct line_buf {
    char *data;
    size_t len, cap;
};

int buf_append(struct line_buf *b, const char *data, size_t n);

/* Takes the next complete line out of b into *line (malloc'd); 0 if none. */
int buf_take_line(struct line_buf *b, char **line);

/* `text` and a newline in one write: the line arrives whole at the other end.
 * `sock`: fd is a socket (send without SIGPIPE). */
bool write_line(int fd, const char *text, size_t len, bool sock);

bool send_json(int fd, json_object *msg, bool sock);

/* For setup calls the agent cannot run without: the message, and exit 1
 * (systemd restarts the agent). */
void die(const char *what);

#endif
