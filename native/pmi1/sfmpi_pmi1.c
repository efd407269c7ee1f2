/*
 * A PMI-1 client for the copies of a parallel section (sfmpi/sections.py), so
 * that Open MPI's MPI_Init in every copy forms one MPI_COMM_WORLD over them.
 *
 * Open MPI 4.1 (Debian bookworm, the MPI under Debian's mpi4py) has a `flux`
 * PMI component: when FLUX_JOB_ID is set it dlopens the PMI-1 library named by
 * FLUX_PMI_LIBRARY_PATH and takes its rank, size and key-value exchange from
 * it. This is that library. Debian packages no PMI-1 client of the simple kind
 * (Slurm's talks to slurmstepd, PMIx's needs a PMIx server), hence this one.
 *
 * It talks to the section's parent, which keeps the key-value space, over a
 * TCP connection the section opened before MPI_Init in this same process:
 *   SFMPI_PMI_FD    the connected socket
 *   SFMPI_PMI_RANK  this copy's rank, SFMPI_PMI_SIZE the number of copies
 * One request line, one answer line:
 *   put KEY VALUE -> ok          get KEY -> ok VALUE | missing
 *   barrier       -> ok (once every copy has asked) | gone (a copy ended first)
 *   abort RANK TEXT  (no answer: this copy ends; the parent ends the section)
 * A key holds no space or newline. A value is everything after the space that
 * follows the key (or "ok"), to the end of the line: it may be empty and may
 * hold spaces. Open MPI base64-encodes its values but pads them with spaces,
 * not '=' (Cray PMI forbids '='), so a value with spaces is ordinary.
 * Every copy runs alone on its own VM, so a node's "clique" is the copy itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PMI_SUCCESS 0
#define PMI_FAIL -1
#define PMI_ERR_INIT 1
#define PMI_ERR_NOMEM 2
#define PMI_ERR_INVALID_ARG 3
#define PMI_ERR_INVALID_KEY 4
#define PMI_ERR_INVALID_VAL 6

#define KVS_NAME "sfmpi-section"
#define NAME_MAX_LEN 64
#define KEY_MAX_LEN 256
#define VALUE_MAX_LEN 1024
#define LINE_MAX_LEN (KEY_MAX_LEN + VALUE_MAX_LEN + 16)

static int fd = -1, rank = -1, size = 0;

static int env_int(const char *name, int *out)
{
    const char *s = getenv(name);
    char *end;
    if (s == NULL || *s == '\0')
        return -1;
    long v = strtol(s, &end, 10);
    if (*end != '\0' || v < 0)
        return -1;
    *out = (int)v;
    return 0;
}

static int write_all(const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* One answer line, without its newline. Read a byte at a time: answers are
 * short and nothing may be read past this one. */
static int read_line(char *buf, size_t len)
{
    size_t used = 0;
    for (;;) {
        char c;
        ssize_t n = read(fd, &c, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || used + 1 >= len)
            return -1;
        if (c == '\n')
            break;
        buf[used++] = c;
    }
    buf[used] = '\0';
    return 0;
}

static int request(const char *line, char *answer, size_t alen)
{
    if (fd < 0)
        return PMI_ERR_INIT;
    if (write_all(line, strlen(line)) != 0 || read_line(answer, alen) != 0)
        return PMI_FAIL;
    return PMI_SUCCESS;
}

int PMI_Init(int *spawned)
{
    if (env_int("SFMPI_PMI_FD", &fd) != 0 || env_int("SFMPI_PMI_RANK", &rank) != 0 ||
        env_int("SFMPI_PMI_SIZE", &size) != 0 || size < 1 || rank >= size) {
        fd = -1;
        return PMI_FAIL;
    }
    if (spawned != NULL)
        *spawned = 0;
    return PMI_SUCCESS;
}

int PMI_Initialized(int *initialized)
{
    if (initialized != NULL)
        *initialized = fd >= 0;
    return PMI_SUCCESS;
}

int PMI_Finalize(void)
{
    fd = -1; /* the section closes the connection itself */
    return PMI_SUCCESS;
}

int PMI_Get_size(int *out) { if (!out) return PMI_ERR_INVALID_ARG; *out = size; return fd < 0 ? PMI_ERR_INIT : PMI_SUCCESS; }
int PMI_Get_rank(int *out) { if (!out) return PMI_ERR_INVALID_ARG; *out = rank; return fd < 0 ? PMI_ERR_INIT : PMI_SUCCESS; }
int PMI_Get_universe_size(int *out) { return PMI_Get_size(out); }
int PMI_Get_appnum(int *out) { if (!out) return PMI_ERR_INVALID_ARG; *out = 0; return PMI_SUCCESS; }
int PMI_Get_clique_size(int *out) { if (!out) return PMI_ERR_INVALID_ARG; *out = 1; return PMI_SUCCESS; }

int PMI_Get_clique_ranks(int *ranks, int length)
{
    if (ranks == NULL || length < 1)
        return PMI_ERR_INVALID_ARG;
    ranks[0] = rank;
    return PMI_SUCCESS;
}

int PMI_KVS_Get_my_name(char *name, int length)
{
    if (name == NULL || length < (int)sizeof KVS_NAME)
        return PMI_ERR_INVALID_ARG;
    strcpy(name, KVS_NAME);
    return PMI_SUCCESS;
}

int PMI_KVS_Get_name_length_max(int *out) { if (!out) return PMI_ERR_INVALID_ARG; *out = NAME_MAX_LEN; return PMI_SUCCESS; }
int PMI_KVS_Get_key_length_max(int *out) { if (!out) return PMI_ERR_INVALID_ARG; *out = KEY_MAX_LEN; return PMI_SUCCESS; }
int PMI_KVS_Get_value_length_max(int *out) { if (!out) return PMI_ERR_INVALID_ARG; *out = VALUE_MAX_LEN; return PMI_SUCCESS; }

static int plain(const char *s, size_t max)
{
    size_t n = strlen(s);
    return n > 0 && n < max && strpbrk(s, " \n") == NULL;
}

int PMI_KVS_Put(const char *kvsname, const char *key, const char *value)
{
    char line[LINE_MAX_LEN], answer[16];
    (void)kvsname;
    if (key == NULL || value == NULL || !plain(key, KEY_MAX_LEN))
        return PMI_ERR_INVALID_KEY;
    if (strlen(value) >= VALUE_MAX_LEN || strchr(value, '\n') != NULL)
        return PMI_ERR_INVALID_VAL;
    snprintf(line, sizeof line, "put %s %s\n", key, value);
    int rc = request(line, answer, sizeof answer);
    return rc != PMI_SUCCESS ? rc : strcmp(answer, "ok") == 0 ? PMI_SUCCESS : PMI_FAIL;
}

int PMI_KVS_Commit(const char *kvsname)
{
    (void)kvsname; /* every put is already with the parent */
    return fd < 0 ? PMI_ERR_INIT : PMI_SUCCESS;
}

int PMI_KVS_Get(const char *kvsname, const char *key, char *value, int length)
{
    char line[KEY_MAX_LEN + 8], answer[VALUE_MAX_LEN + 8];
    (void)kvsname;
    if (key == NULL || value == NULL || length < 1 || !plain(key, KEY_MAX_LEN))
        return PMI_ERR_INVALID_ARG;
    snprintf(line, sizeof line, "get %s\n", key);
    int rc = request(line, answer, sizeof answer);
    if (rc != PMI_SUCCESS)
        return rc;
    if (strncmp(answer, "ok ", 3) != 0)
        return PMI_FAIL; /* missing: Open MPI expects a quiet failure */
    const char *v = answer + 3;
    if ((int)strlen(v) >= length)
        return PMI_ERR_NOMEM;
    strcpy(value, v);
    return PMI_SUCCESS;
}

int PMI_Barrier(void)
{
    char answer[16];
    int rc = request("barrier\n", answer, sizeof answer);
    return rc != PMI_SUCCESS ? rc : strcmp(answer, "ok") == 0 ? PMI_SUCCESS : PMI_FAIL;
}

int PMI_Abort(int exit_code, const char *msg)
{
    char line[LINE_MAX_LEN];
    fprintf(stderr, "sfmpi section: MPI abort (%d): %s\n", exit_code, msg ? msg : "");
    if (fd >= 0) {
        /* MPI_Abort ends the whole job: the parent's key-value server ends
         * the section, else the other copies would wait for this one forever. */
        snprintf(line, sizeof line - 1, "abort %d MPI abort (code %d): %s", rank, exit_code, msg ? msg : "");
        for (char *p = line; *p; p++)
            if (*p == '\n')
                *p = ' ';
        strcat(line, "\n");
        (void)write_all(line, strlen(line));
    }
    _exit(exit_code ? exit_code : 1);
}
