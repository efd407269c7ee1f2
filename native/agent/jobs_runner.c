/* The jobs runner, the agent's Python child (jobs_runner.h). */
#define _GNU_SOURCE
#include "jobs_runner.h"

#include "hostd_channel.h"
#include "line_io.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct {
    int fd;
    pid_t pid;
    struct line_buf in;
} jobs = {.fd = -1};

void start_jobs_runner(const char *python)
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
    jobs.fd = sv[0];
    jobs.pid = pid;
}

int jobs_runner_fd(void)
{
    return jobs.fd;
}

void jobs_readable(void)
{
    char chunk[65536];
    ssize_t n = read(jobs.fd, chunk, sizeof chunk);
    if (n <= 0) {
        /* The jobs runner died: systemd restarts the whole agent. */
        fprintf(stderr, "sfmpi-agentd: the jobs runner (pid %d) went away\n", (int)jobs.pid);
        exit(1);
    }
    buf_append(&jobs.in, chunk, (size_t)n);
    char *line;
    while (buf_take_line(&jobs.in, &line)) {
        forward_to_hostd(line);
        free(line);
    }
}

void forward_to_jobs_runner(const char *line)
{
    if (jobs.fd >= 0)
        write_line(jobs.fd, line, strlen(line), true);
}
