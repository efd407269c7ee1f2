/*
 * sfmpi-agentd: the guest agent, root from boot, hostd's end in the guest.
 *
 * It owns the two channels of the guest:
 * - the virtio-serial port to hostd (wire protocol 2, documented in
 *   sfmpi/guest/agent.py): pings, identities, answers to clone-API calls
 *   (hostd_channel.c);
 * - the clone-API socket for programs in the guest (/run/sfmpi/api.sock,
 *   protocol sfclone/1, docs/clone-api.md): calls forwarded to hostd
 *   (clone_api.c).
 * Running commands for `vm exec` (exec, signal) is left to the Python part
 * (sfmpi.guest.agent --jobs-fd), a child that gets those lines over a
 * socketpair and whose events go to hostd unchanged (jobs_runner.c).
 * Re-identifying the parent at boot and each clone is identity.c's.
 *
 * Why this part is C: a clone's clone call returns only after the clone has
 * re-identified itself, and a resumed clone runs every code path cold.  Under
 * TCG each path is translated again per clone: the Python agent took about
 * 0.3 s of CPU per clone from the answer to "cloned", so 8 clones on 2 cores
 * needed 1.3 s more than with this.  Under KVM it would not matter.
 *
 * One thread, one poll loop (here).  It runs SCHED_FIFO (reset on fork, so
 * nothing it starts inherits it): in a clone it is first to run after resume,
 * before what wakes up with it (systemd on the clock step, kernel workers).
 */
#define _GNU_SOURCE
#include "clone_api.h"
#include "hostd_channel.h"
#include "identity.h"
#include "jobs_runner.h"
#include "line_io.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_API_SOCKET "/run/sfmpi/api.sock"
#define DEFAULT_PYTHON "/usr/bin/python3"
#define REALTIME_PRIORITY 10

static void usage(void)
{
    fprintf(stderr, "usage: sfmpi-agentd [--port PATH | --port-fd N] [--api-socket PATH] [--python PATH]\n"
                    "                    [--realtime on|off]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *port_path = NULL, *api_path = DEFAULT_API_SOCKET, *python = DEFAULT_PYTHON;
    int port_fd = -1;
    bool realtime = true;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        if (strcmp(argv[i], "--port") == 0)
            port_path = argv[++i];
        else if (strcmp(argv[i], "--port-fd") == 0)
            port_fd = atoi(argv[++i]);
        else if (strcmp(argv[i], "--api-socket") == 0)
            api_path = argv[++i];
        else if (strcmp(argv[i], "--python") == 0)
            python = argv[++i];
        else if (strcmp(argv[i], "--realtime") == 0)
            realtime = strcmp(argv[++i], "off") != 0;
        else
            usage();
    }
    struct sched_param sp = {.sched_priority = REALTIME_PRIORITY};
    if (realtime && sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &sp) != 0)
        fprintf(stderr, "sfmpi-agentd: no real-time priority (%s): clones answer slower\n", strerror(errno));
    open_hostd_port(port_fd, port_path);
    start_jobs_runner(python);
    listen_api(api_path);
    send_ready();
    for (;;) {
        struct pollfd fds[3 + MAX_CLIENTS];
        struct client *owner[3 + MAX_CLIENTS];
        int n = 0;
        double now = monotonic_s(), next = now + 1.0;
        bool port_polled = hostd_port_due(now, &next);
        if (port_polled)
            fds[n++] = (struct pollfd){hostd_port_fd(), POLLIN, 0};
        fds[n++] = (struct pollfd){jobs_runner_fd(), POLLIN, 0};
        fds[n++] = (struct pollfd){api_listen_fd(), POLLIN, 0};
        int fixed = n;
        n += poll_clients(fds + fixed, owner + fixed, &next);
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
        clients_readable(fds + fixed, owner + fixed, n - fixed);
        check_deadlines();
    }
}
