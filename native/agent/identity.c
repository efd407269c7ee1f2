/*
 * Re-identification of a guest (identity.h says what and when).
 *
 * It is C, in the agent, because a clone's call returns only after it: under
 * TCG a resumed clone translates every code path again, and the same steps in
 * Python cost each clone about 0.3 s of CPU (8 clones on 2 cores: 1.3 s) where
 * this costs a few ms.  Network changes go through ioctls, not `ip`, for the
 * same reason: every process a clone starts costs ~100 ms under TCG.
 */
#define _GNU_SOURCE
#include "identity.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/route.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HOOK_DIR "/etc/sfmpi/clone.d"
#define HOOK_TIMEOUT_S 60
#define HOSTS_FILE "/etc/hosts"
#define HOSTS_BEGIN "# sfmpi family begin"
#define HOSTS_END "# sfmpi family end"
/* The kernel's boot ID is made once per boot and read-only, so a clone would
 * keep its parent's.  Programs take it to mean "same machine": UCX (under
 * MPICH and Open MPI) then tries shared memory between ranks on different
 * clones and MPI_Init fails.  A file of our own is bind-mounted over it. */
#define BOOT_ID KERNEL_BOOT_ID
#define BOOT_ID_FILE "/run/sfmpi-boot_id"

extern char **environ;

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

double monotonic_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

char *read_first_line(const char *path, char *buf, size_t len)
{
    buf[0] = 0;
    FILE *f = fopen(path, "re");
    if (f) {
        if (fgets(buf, (int)len, f))
            buf[strcspn(buf, "\n")] = 0;
        fclose(f);
    }
    return buf;
}

const char *identity_path(const char *path, char *buf, size_t len)
{
    const char *root = getenv("SFMPI_AGENT_ROOT");
    snprintf(buf, len, "%s%s", root ? root : "", path);
    return buf;
}

static const char *str_field(json_object *obj, const char *key)
{
    json_object *v;
    if (!json_object_object_get_ex(obj, key, &v) || !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

/* Written next to the file, then renamed: a reader never sees half of it. */
static int write_atomic(const char *path, const char *text, char *err, size_t errlen)
{
    char full[512], tmp[600];
    identity_path(path, full, sizeof full);
    snprintf(tmp, sizeof tmp, "%s.sfmpi-new", full);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return fail(err, errlen, "write %s: %s", full, strerror(errno));
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t n = write(fd, text + off, len - off);
        if (n < 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            return fail(err, errlen, "write %s: %s", full, strerror(e));
        }
        off += (size_t)n;
    }
    close(fd);
    if (rename(tmp, full) != 0)
        return fail(err, errlen, "replace %s: %s", full, strerror(errno));
    return 0;
}

/* -- clock, entropy, machine-id, boot ID ------------------------------ */

static int set_clock(double host_time, double received, char *err, size_t errlen)
{
    /* The host's clock at sending, plus what passed since we got it. */
    double now = host_time + (monotonic_s() - received);
    struct timespec ts = {.tv_sec = (time_t)now, .tv_nsec = (long)((now - (double)(time_t)now) * 1e9)};
    if (clock_settime(CLOCK_REALTIME, &ts) != 0)
        return fail(err, errlen, "set the clock: %s", strerror(errno));
    return 0;
}

static int b64_value(int c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* The 64 bytes of host entropy come base64-encoded; glibc has no decoder. */
static size_t b64_decode(const char *in, unsigned char *out, size_t max)
{
    size_t n = 0;
    unsigned acc = 0;
    int bits = 0;
    for (; *in && *in != '='; in++) {
        int v = b64_value((unsigned char)*in);
        if (v < 0)
            continue;
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (n < max)
                out[n++] = (unsigned char)(acc >> bits);
        }
    }
    return n;
}

/* RNDADDENTROPY adds the bytes and credits them; RNDRESEEDCRNG makes the CRNG
 * use them now.  Without the reseed a clone's getrandom() goes on from the
 * parent's CRNG state: measured, all clones returned the same bytes. */
static int reseed(const char *b64, int random_fd, char *err, size_t errlen)
{
    struct {
        struct rand_pool_info info;
        unsigned char data[512];
    } req;
    size_t n = b64_decode(b64, req.data, sizeof req.data);
    req.info.entropy_count = (int)(n * 8);
    req.info.buf_size = (int)n;
    int fd = random_fd >= 0 ? random_fd : open("/dev/random", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(err, errlen, "open /dev/random: %s", strerror(errno));
    int rc = ioctl(fd, RNDADDENTROPY, &req);
    if (rc == 0)
        rc = ioctl(fd, RNDRESEEDCRNG);
    int e = errno;
    if (fd != random_fd)
        close(fd);
    if (rc != 0)
        return fail(err, errlen, "reseed the kernel RNG: %s", strerror(e));
    return 0;
}

/* Our file is bind-mounted over the kernel's already (the two are on one device). */
static bool boot_id_is_ours(const char *path)
{
    struct stat kernel, ours;
    return stat(BOOT_ID, &kernel) == 0 && stat(path, &ours) == 0 && kernel.st_dev == ours.st_dev;
}

static int set_boot_id(const char *boot_id, char *err, size_t errlen)
{
    char path[512], text[128];
    identity_path(BOOT_ID_FILE, path, sizeof path);
    snprintf(text, sizeof text, "%s\n", boot_id);
    /* Written in place: a clone of a clone keeps the mount, only the text changes. */
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, text, strlen(text)) < 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return fail(err, errlen, "write %s: %s", path, strerror(e));
    }
    close(fd);
    if (boot_id_is_ours(path))
        return 0;
    if (mount(path, BOOT_ID, NULL, MS_BIND, NULL) != 0)
        return fail(err, errlen, "bind a new boot ID over %s: %s", BOOT_ID, strerror(errno));
    return 0;
}

/* -- network ----------------------------------------------------------- */

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The one Ethernet NIC sfmpi gives every VM: the first by name. */
static int nic_name(char *out, size_t len)
{
    DIR *d = opendir("/sys/class/net");
    if (!d)
        return -1;
    char *names[64];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 64)
        if (e->d_name[0] != '.' && strcmp(e->d_name, "lo") != 0)
            names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof names[0], cmp_names);
    int found = -1;
    for (int i = 0; i < n; i++) {
        char path[300], type[16];
        snprintf(path, sizeof path, "/sys/class/net/%s/type", names[i]);
        if (found < 0 && atoi(read_first_line(path, type, sizeof type)) == ARPHRD_ETHER) {
            snprintf(out, len, "%s", names[i]);
            found = 0;
        }
    }
    for (int i = 0; i < n; i++)
        free(names[i]);
    return found;
}

static int sockaddr_in_of(const char *address, struct sockaddr *sa)
{
    struct sockaddr_in *sin = (struct sockaddr_in *)sa;
    memset(sin, 0, sizeof *sin);
    sin->sin_family = AF_INET;
    return inet_pton(AF_INET, address, &sin->sin_addr) == 1 ? 0 : -1;
}

static int configure_network(json_object *ident, const struct identity_prep *prep, char *err, size_t errlen)
{
    const char *mac = str_field(ident, "mac"), *ip = str_field(ident, "ip"), *gw = str_field(ident, "gateway");
    json_object *prefix_obj;
    if (!mac || !ip || !gw || !json_object_object_get_ex(ident, "prefix", &prefix_obj))
        return fail(err, errlen, "identity without mac, ip, prefix or gateway");
    int prefix = json_object_get_int(prefix_obj);
    char dev[IFNAMSIZ];
    if (prep && prep->nic[0])
        snprintf(dev, sizeof dev, "%s", prep->nic);
    else if (nic_name(dev, sizeof dev) != 0)
        return fail(err, errlen, "no Ethernet interface in this VM");
    int sock = prep && prep->ioctl_sock >= 0 ? fcntl(prep->ioctl_sock, F_DUPFD_CLOEXEC, 0)
                                             : socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return fail(err, errlen, "socket: %s", strerror(errno));
    struct ifreq ifr;
    int rc = -1;
    const char *what = "";
    /* virtio-net changes its MAC live (VIRTIO_NET_F_CTRL_MAC_ADDR): QEMU's
     * receive filter follows, and the tap's nft rules expect the new one. */
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", dev);
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    unsigned char *hw = (unsigned char *)ifr.ifr_hwaddr.sa_data;
    if (sscanf(mac, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &hw[0], &hw[1], &hw[2], &hw[3], &hw[4], &hw[5]) != 6) {
        close(sock);
        return fail(err, errlen, "bad MAC address %s", mac);
    }
    what = "set MAC of";
    if (ioctl(sock, SIOCSIFHWADDR, &ifr) != 0)
        goto out;
    /* Setting the address replaces the parent's (the primary one). */
    what = "set address of";
    if (sockaddr_in_of(ip, &ifr.ifr_addr) != 0) {
        errno = EINVAL;
        goto out;
    }
    if (ioctl(sock, SIOCSIFADDR, &ifr) != 0)
        goto out;
    what = "set netmask of";
    struct sockaddr_in *mask = (struct sockaddr_in *)&ifr.ifr_netmask;
    memset(mask, 0, sizeof *mask);
    mask->sin_family = AF_INET;
    mask->sin_addr.s_addr = htonl(prefix <= 0 ? 0 : 0xFFFFFFFFu << (32 - prefix));
    if (ioctl(sock, SIOCSIFNETMASK, &ifr) != 0)
        goto out;
    what = "bring up";
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0)
        goto out;
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) != 0)
        goto out;
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    sockaddr_in_of("0.0.0.0", &rt.rt_dst);
    sockaddr_in_of("0.0.0.0", &rt.rt_genmask);
    if (sockaddr_in_of(gw, &rt.rt_gateway) != 0) {
        close(sock);
        return fail(err, errlen, "bad gateway address %s", gw);
    }
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = dev;
    /* EEXIST: the parent's route is still in place, which is fine. */
    if (ioctl(sock, SIOCADDRT, &rt) != 0 && errno != EEXIST) {
        int e = errno;
        close(sock);
        return fail(err, errlen, "add default route via %s: %s", gw, strerror(e));
    }
    rc = 0;
out:
    if (rc != 0) {
        int e = errno;
        close(sock);
        return fail(err, errlen, "%s %s: %s", what, dev, strerror(e));
    }
    close(sock);
    return 0;
}

static int set_hostname(const char *name, char *err, size_t errlen)
{
    if (sethostname(name, strlen(name)) != 0)
        return fail(err, errlen, "set hostname %s: %s", name, strerror(errno));
    char text[300];
    snprintf(text, sizeof text, "%s\n", name);
    return write_atomic("/etc/hostname", text, err, errlen);
}

/* -- /etc/hosts: every member of the family resolves by name (MPI launchers need it) */

int identity_write_hosts(json_object *hosts, char *err, size_t errlen)
{
    char path[512];
    identity_path(HOSTS_FILE, path, sizeof path);
    size_t cap = 4096, len = 0;
    char *out = malloc(cap);
    if (!out)
        return fail(err, errlen, "out of memory");
    out[0] = 0;
#define APPEND(...)                                                                                     \
    do {                                                                                                \
        int need_ = snprintf(NULL, 0, __VA_ARGS__);                                                     \
        while (len + (size_t)need_ + 1 > cap)                                                           \
            out = realloc(out, cap *= 2);                                                               \
        len += (size_t)sprintf(out + len, __VA_ARGS__);                                                 \
    } while (0)
    FILE *f = fopen(path, "re");
    if (f) {
        char line[1024];
        int inside = 0;
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            if (strcmp(line, HOSTS_BEGIN) == 0)
                inside = 1;
            else if (strcmp(line, HOSTS_END) == 0)
                inside = 0;
            else if (!inside && strncmp(line, "127.0.1.1", 9) != 0)
                APPEND("%s\n", line);
        }
        fclose(f);
    } else {
        APPEND("127.0.0.1 localhost\n");
    }
    APPEND("%s\n", HOSTS_BEGIN);
    size_t n = json_object_is_type(hosts, json_type_array) ? json_object_array_length(hosts) : 0;
    for (size_t i = 0; i < n; i++) {
        json_object *pair = json_object_array_get_idx(hosts, i);
        if (!json_object_is_type(pair, json_type_array) || json_object_array_length(pair) != 2)
            continue;
        APPEND("%s %s\n", json_object_get_string(json_object_array_get_idx(pair, 1)),
               json_object_get_string(json_object_array_get_idx(pair, 0)));
    }
    APPEND("%s\n", HOSTS_END);
#undef APPEND
    int rc = write_atomic(HOSTS_FILE, out, err, errlen);
    free(out);
    return rc;
}

/* -- /etc/sfmpi/clone.d hooks ------------------------------------------ */

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
static char **scan_hooks(void)
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

static void free_hooks(char **hooks)
{
    for (int i = 0; hooks && hooks[i]; i++)
        free(hooks[i]);
    free(hooks);
}

static int run_clone_hooks(json_object *ident, char **hooks, char *err, size_t errlen)
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

/* -- prepared in the parent ----------------------------------------------- */

void identity_prepare(struct identity_prep *prep)
{
    identity_release(prep);
    if (nic_name(prep->nic, sizeof prep->nic) != 0)
        prep->nic[0] = 0;
    prep->ioctl_sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    prep->random_fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
    prep->hooks = scan_hooks();
    /* The boot ID file goes over the kernel's now, with the parent's own ID:
     * a clone then only writes its new ID into it (no mount in the clone). */
    char path[512], boot_id[64], err[256];
    identity_path(BOOT_ID_FILE, path, sizeof path);
    if (!boot_id_is_ours(path) && read_first_line(BOOT_ID, boot_id, sizeof boot_id)[0])
        set_boot_id(boot_id, err, sizeof err);
    prep->ready = true;
}

void identity_release(struct identity_prep *prep)
{
    if (prep->ready) {
        if (prep->ioctl_sock >= 0)
            close(prep->ioctl_sock);
        if (prep->random_fd >= 0)
            close(prep->random_fd);
        free_hooks(prep->hooks);
    }
    memset(prep, 0, sizeof *prep);
    prep->ioctl_sock = prep->random_fd = -1;
}

/* -- all of it ---------------------------------------------------------- */

int identity_apply(json_object *msg, double received, bool run_hooks, const struct identity_prep *prep,
                   json_object *steps, char *err, size_t errlen)
{
    if (prep && !prep->ready)
        prep = NULL;
    double mark = received;
#define DONE(step)                                                                                      \
    do {                                                                                                \
        double now_ = monotonic_s();                                                                    \
        json_object_object_add(steps, step, json_object_new_double((now_ - mark) * 1000.0));            \
        mark = now_;                                                                                    \
    } while (0)
    json_object *ident, *v;
    if (!json_object_object_get_ex(msg, "identity", &ident) || !json_object_is_type(ident, json_type_object))
        return fail(err, errlen, "no identity in the message");
    if (json_object_object_get_ex(msg, "time", &v) && json_object_get_double(v) > 0) {
        if (set_clock(json_object_get_double(v), received, err, errlen))
            return -1;
        DONE("clock");
    }
    const char *s;
    if ((s = str_field(msg, "entropy")) && *s) {
        if (reseed(s, prep ? prep->random_fd : -1, err, errlen))
            return -1;
        DONE("rng");
    }
    if ((s = str_field(msg, "boot_id")) && *s) {
        if (set_boot_id(s, err, errlen))
            return -1;
        DONE("boot_id");
    }
    if (configure_network(ident, prep, err, errlen))
        return -1;
    DONE("network");
    const char *hostname = str_field(ident, "hostname");
    if (!hostname)
        return fail(err, errlen, "identity without hostname");
    if (set_hostname(hostname, err, errlen))
        return -1;
    DONE("hostname");
    if (json_object_object_get_ex(msg, "hosts", &v) && json_object_is_type(v, json_type_array) &&
        json_object_array_length(v) > 0) {
        if (identity_write_hosts(v, err, errlen))
            return -1;
    } else {
        json_object *one = json_object_new_array(), *pair = json_object_new_array();
        json_object_array_add(pair, json_object_new_string(hostname));
        json_object_array_add(pair, json_object_new_string(str_field(ident, "ip")));
        json_object_array_add(one, pair);
        int rc = identity_write_hosts(one, err, errlen);
        json_object_put(one);
        if (rc)
            return -1;
    }
    DONE("hosts");
    if ((s = str_field(msg, "machine_id")) && *s) {
        char text[128];
        snprintf(text, sizeof text, "%s\n", s);
        if (write_atomic("/etc/machine-id", text, err, errlen))
            return -1;
        DONE("machine_id");
    }
    if (run_hooks) {
        char **hooks = prep ? prep->hooks : scan_hooks();
        int rc = run_clone_hooks(ident, hooks, err, errlen);
        if (!prep)
            free_hooks(hooks);
        if (rc)
            return -1;
        DONE("hooks");
    }
#undef DONE
    return 0;
}
