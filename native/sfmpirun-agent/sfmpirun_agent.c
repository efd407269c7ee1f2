/* sfmpirun-agent: the remote-shell agent sfmpirun gives the real launcher
 * (Hydra's -launcher-exec, Open MPI's plm_rsh_agent), called like ssh:
 *
 *     sfmpirun-agent [ssh options] HOST COMMAND...
 *
 * It does no SSH itself. sfmpirun already holds an SSH connection to every
 * clone (launcher/hub.py); this program hands it its argv and its stdin,
 * stdout and stderr (SCM_RIGHTS) over the Unix socket $SFMPIRUN_JOB/hub.sock,
 * waits for one line back, the remote command's exit status, and exits with
 * it. Why C: the launcher starts one agent per host on every launch, and a
 * Python one costs seconds each on a TCG guest's single vCPU.
 *
 * Killing this process (the launcher does, when a job ends early) closes the
 * socket: the hub then ends the remote session.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define NO_STATUS 255
#define REQUEST_MAX (1 << 16)

static int fail(const char *what)
{
    fprintf(stderr, "sfmpirun-agent: %s\n", what);
    return NO_STATUS;
}

/* A launcher may start us with stdin closed: pass /dev/null in its place
 * (SCM_RIGHTS refuses a closed descriptor). */
static void ensure_open(int fd)
{
    if (fcntl(fd, F_GETFD) == -1 && errno == EBADF) {
        int null = open("/dev/null", O_RDWR);
        if (null >= 0 && null != fd) {
            dup2(null, fd);
            close(null);
        }
    }
}

int main(int argc, char **argv)
{
    const char *job = getenv("SFMPIRUN_JOB");
    if (job == NULL || *job == '\0')
        return fail("SFMPIRUN_JOB is not set (only sfmpirun runs this agent)");
    if (argc < 3)
        return fail("usage: sfmpirun-agent [ssh options] HOST COMMAND...");

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (snprintf(addr.sun_path, sizeof addr.sun_path, "%s/hub.sock", job) >= (int)sizeof addr.sun_path)
        return fail("SFMPIRUN_JOB is too long a path for a Unix socket");

    /* The request: every argument followed by a NUL. */
    static char request[REQUEST_MAX];
    size_t len = 0;
    for (int i = 1; i < argc; i++) {
        size_t n = strlen(argv[i]) + 1;
        if (len + n > sizeof request)
            return fail("command line too long");
        memcpy(request + len, argv[i], n);
        len += n;
    }

    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fprintf(stderr, "sfmpirun-agent: cannot reach sfmpirun at %s: %s\n", addr.sun_path, strerror(errno));
        return NO_STATUS;
    }

    for (int fd = 0; fd < 3; fd++)
        ensure_open(fd);
    int fds[3] = {0, 1, 2};
    union {
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = request, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    if (sendmsg(sock, &msg, 0) < 0) {
        fprintf(stderr, "sfmpirun-agent: cannot hand the command to sfmpirun: %s\n", strerror(errno));
        return NO_STATUS;
    }

    char reply[32];
    ssize_t n;
    do
        n = recv(sock, reply, sizeof reply - 1, 0);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return fail("sfmpirun ended the session");
    reply[n] = '\0';
    return atoi(reply) & 255;
}
