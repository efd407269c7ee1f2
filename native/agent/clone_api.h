/*
 * The clone-API socket for programs in the guest (/run/sfmpi/api.sock,
 * protocol sfclone/1, docs/clone-api.md).  Each connection carries one
 * request and gets one answer: whoami is answered here, the other calls are
 * forwarded to hostd and answered when hostd answers.
 */
#ifndef SFMPI_AGENT_CLONE_API_H
#define SFMPI_AGENT_CLONE_API_H

#include <poll.h>

#include <json-c/json.h>

#define MAX_CLIENTS 256

/* A program's connection (private to clone_api.c). */
struct client;

/* Creates the socket at `path`, for root and group sfmpi. */
void listen_api(const char *path);
int api_listen_fd(void);
void accept_client(void);

/* For the poll loop: adds the connections whose request is still being read
 * to fds (owner[i] is whose fds[i] is) and returns how many; lowers *next to
 * the earliest deadline of a call waiting for hostd. */
int poll_clients(struct pollfd *fds, struct client **owner, double *next);
/* Reads the connections poll_clients added, where poll reported something. */
void clients_readable(const struct pollfd *fds, struct client *const *owner, int n);
/* Fails the calls hostd did not answer in time. */
void check_deadlines(void);

/* hostd's answer to a forwarded call ("re": the request id). */
void hostd_answered(json_object *answer, double arrived);
/* Fails every call waiting for hostd (hostd is gone and forgot them). */
void fail_pending_calls(const char *type, const char *why);

/* This VM's identity, as whoami reports it. */
void keep_identity(json_object *ident);

#endif
