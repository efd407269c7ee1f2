/*
 * hostd's channel into the guest: the virtio-serial port org.sfmpi.0, wire
 * protocol 2 (documented in sfmpi/guest/agent.py).  On it come pings,
 * identities, answers to clone-API calls, and lines for the jobs runner.
 */
#ifndef SFMPI_AGENT_HOSTD_CHANNEL_H
#define SFMPI_AGENT_HOSTD_CHANNEL_H

#include <stdbool.h>

#include <json-c/json.h>

/* Uses `fd` if it is >= 0; otherwise opens `path`, or (NULL) the port found
 * by its name, loading virtio_console if needed.  Exits when there is none. */
void open_hostd_port(int fd, const char *path);

/* Sends `msg` and frees it.  No host connected: the message has nobody to go
 * to (the host pings on connect, so nothing is lost that matters). */
bool send_host(json_object *msg);

/* A line from the jobs runner, to hostd unchanged. */
void forward_to_hostd(const char *line);

/* The "ready" event: protocol version, hostname, boot ID, uptime. */
void send_ready(void);

/* Whether the port is to be polled now; if not, lowers *next to when it is.
 * (While no host is connected the port reports POLLHUP at once.) */
bool hostd_port_due(double now, double *next);
int hostd_port_fd(void);

/* What poll reported for the port: lines from hostd, or no host. */
void port_readable(short revents);

#endif
