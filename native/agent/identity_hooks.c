/*
 * The /etc/sfmpi/clone.d hooks: the site's own steps of a clone's
 * re-identification, run last, in name order, with the clone's identity in
 * their environment (SF_CLONE_ID, SF_FAMILY, SF_IP, SF_HOSTNAME).  A hook
 * that fails fails the clone.
 */
#define _GNU_SOURCE
#include "identity_steps.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define HOOK_DIR "/etc/sfmpi/clone.d"
#define HOOK_TIMEOUT_S 60

extern char **environ;

/* The last non-empty line of `text`, for the failure message. */
static void last_line(const char *text, char *out, size_t len)
{
    const char *end = text + strlen(text);
    while (end > text && (end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
        end--;
    const char *start = end;
    while (start > text && start[-1] != '\n')
        start--;
    snprintf(out, len, "%.*s", (int)(end - start), start);
}

/* Runs one hook with the clone's environment; its output is kept only for
 * the failure message. */
static int run_hook(const char *name, const char *path, char *const envp[], char *err, size_t errlen)
{
    int out_pipe[2], err_pipe[2], exec_pipe[2];
    if (pipe2(out_pipe, O_CLOEXEC) || pipe2(err_pipe, O_CLOEXEC) || pipe2(exec_pipe, O_CLOEXEC))
        return fail(err, errlen, "hook %s could not run: %s", name, strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
        return fail(err, errlen, "hook %s could not run: %s", name, strerror(errno));
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDONLY);
        dup2(devnull, 0);
        dup2(out_pipe[1], 1);
        dup2(err_pipe[1], 2);
        signal(SIGPIPE, SIG_DFL);
        char *argv[] = {(char *)path, NULL};
        execve(path, argv, envp);
        int e = errno;
        ssize_t unused = write(exec_pipe[1], &e, sizeof e); /* the parent reports it */
        (void)unused;
        _exit(127);
    }
    close(out_pipe[1]);
    close(err_pipe[1]);
    close(exec_pipe[1]);
    int exec_errno = 0;
    ssize_t got = read(exec_pipe[0], &exec_errno, sizeof exec_errno);
    close(exec_pipe[0]);
    char outbuf[4096] = "", errbuf[4096] = "";
    size_t outlen = 0, errlen_ = 0;
    struct pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
    double deadline = monotonic_s() + HOOK_TIMEOUT_S;
    int open_fds = 2, timed_out = 0;
    while (open_fds > 0 && got <= 0) {
        int left = (int)((deadline - monotonic_s()) * 1000);
        if (left <= 0) {
            timed_out = 1;
            break;
        }
        if (poll(fds, 2, left) < 0 && errno != EINTR)
            break;
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            char chunk[1024];
            ssize_t n = read(fds[i].fd, chunk, sizeof chunk);
            if (n <= 0) {
                close(fds[i].fd);
                fds[i].fd = -1;
                open_fds--;
                continue;
            }
            /* Keep the tail: the last line is what the message shows. */
            char *buf = i == 0 ? outbuf : errbuf;
            size_t *blen = i == 0 ? &outlen : &errlen_;
            if (*blen + (size_t)n >= sizeof outbuf) {
                size_t drop = *blen + (size_t)n - (sizeof outbuf - 1);
                if (drop > *blen)
                    drop = *blen;
                memmove(buf, buf + drop, *blen - drop);
                *blen -= drop;
            }
            size_t take = (size_t)n < sizeof outbuf - 1 ? (size_t)n : sizeof outbuf - 1;
            memcpy(buf + *blen, chunk + n - (ssize_t)take, take);
            *blen += take;
            buf[*blen] = 0;
        }
    }
    for (int i = 0; i < 2; i++)
        if (fds[i].fd >= 0)
            close(fds[i].fd);
    if (timed_out)
        kill(pid, SIGKILL);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (got > 0)
        return fail(err, errlen, "hook %s could not run: %s", name, strerror(exec_errno));
    if (timed_out)
        return fail(err, errlen, "hook %s did not finish in %d s", name, HOOK_TIMEOUT_S);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    if (code != 0) {
        char tail[512];
        last_line(errbuf[0] ? errbuf : outbuf, tail, sizeof tail);
        return fail(err, errlen, "hook %s failed with exit %d: %s", name, code, tail);
    }
    return 0;
}

/* The executable files of the hook directory, in name order. */
char **scan_hooks(void)
{
    char dir[512];
    identity_path(HOOK_DIR, dir, sizeof dir);
    struct dirent **entries;
    int n = scandir(dir, &entries, NULL, alphasort);
    char **hooks = calloc((size_t)(n > 0 ? n : 0) + 1, sizeof *hooks);
    int k = 0;
    for (int i = 0; i < n; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, entries[i]->d_name);
        struct stat st;
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0)
            hooks[k++] = strdup(path);
        free(entries[i]);
    }
    if (n >= 0)
        free(entries);
    return hooks;
}

void free_hooks(char **hooks)
{
    for (int i = 0; hooks && hooks[i]; i++)
        free(hooks[i]);
    free(hooks);
}

int run_clone_hooks(json_object *ident, char **hooks, char *err, size_t errlen)
{
    if (!hooks[0])
        return 0;
    /* The agent's environment plus the clone's identity. */
    size_t envc = 0;
    while (environ[envc])
        envc++;
    char **envp = calloc(envc + 6, sizeof *envp);
    size_t k = 0;
    int have_path = 0;
    for (size_t i = 0; i < envc; i++) {
        if (strncmp(environ[i], "SF_", 3) == 0)
            continue;
        have_path |= strncmp(environ[i], "PATH=", 5) == 0;
        envp[k++] = environ[i];
    }
    json_object *id_obj, *fam_obj;
    char id_var[64], fam_var[300], ip_var[64], host_var[300];
    snprintf(id_var, sizeof id_var, "SF_CLONE_ID=%d",
             json_object_object_get_ex(ident, "id", &id_obj) ? json_object_get_int(id_obj) : 0);
    snprintf(fam_var, sizeof fam_var, "SF_FAMILY=%s",
             json_object_object_get_ex(ident, "family", &fam_obj) ? json_object_get_string(fam_obj) : "");
    snprintf(ip_var, sizeof ip_var, "SF_IP=%s", str_field(ident, "ip") ? str_field(ident, "ip") : "");
    snprintf(host_var, sizeof host_var, "SF_HOSTNAME=%s",
             str_field(ident, "hostname") ? str_field(ident, "hostname") : "");
    envp[k++] = id_var;
    envp[k++] = fam_var;
    envp[k++] = ip_var;
    envp[k++] = host_var;
    if (!have_path)
        envp[k++] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    envp[k] = NULL;
    int rc = 0;
    for (int i = 0; rc == 0 && hooks[i]; i++)
        rc = run_hook(strrchr(hooks[i], '/') + 1, hooks[i], envp, err, errlen);
    free(envp);
    return rc;
}
