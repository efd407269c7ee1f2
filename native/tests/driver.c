/*
 * Test driver for tests/unit/test_libsfclone.py: calls one libsfclone
 * function per command line and prints its results as key=value lines,
 * always ending with rc= and error= (sfc_last_error).
 *
 *   driver ticket N TIMEOUT        driver clone TICKET
 *   driver checkpoint              driver create_clones CKPT TICKET MAX
 *   driver exit STATUS             driver join TICKET MAX
 *   driver kill TICKET             driver whoami [RLEN IPLEN HLEN]
 *   driver members TICKET MAX
 *   driver strerror CODE
 *
 * SIGUSR1 is caught without SA_RESTART, so it interrupts the library's
 * blocking calls with EINTR.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sfclone.h"

/* Entries a call did not write keep this value, so tests see which it wrote. */
#define UNTOUCHED -99

static sfc_ticket ticket_named(const char *id)
{
    sfc_ticket t = {0};
    snprintf(t.id, sizeof t.id, "%s", id);
    return t;
}

static void print_ints(const char *key, const int *v, int n)
{
    printf("%s=", key);
    for (int i = 0; i < n; i++)
        printf(i ? ",%d" : "%d", v[i]);
    printf("\n");
}

/* SIGUSR1 interrupts blocking calls (no SA_RESTART): the tests use it to check
 * that the library retries on EINTR. */
static void ignore(int sig)
{
    (void)sig;
}

static int usage(void)
{
    fprintf(stderr, "usage: driver OP ARGS... (see driver.c)\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage();
    const char *op = argv[1];
    int rc;
    struct sigaction sa = {.sa_handler = ignore};
    sigaction(SIGUSR1, &sa, NULL);

    if (strcmp(op, "ticket") == 0 && argc == 4) {
        sfc_ticket t;
        if ((rc = sfc_request_ticket(atoi(argv[2]), atof(argv[3]), &t)) == 0)
            printf("id=%s\nrequested=%d\ngranted=%d\nfamily=%s\ntimeout=%g\n", t.id, t.requested,
                   t.granted, t.family, t.timeout);
    } else if (strcmp(op, "clone") == 0 && argc == 3) {
        sfc_ticket t = ticket_named(argv[2]);
        int id = UNTOUCHED;
        if ((rc = sfc_clone(&t, &id)) == 0)
            printf("id=%d\n", id);
    } else if (strcmp(op, "checkpoint") == 0 && argc == 2) {
        sfc_checkpoint c;
        int id = UNTOUCHED;
        if ((rc = sfc_checkpoint_parent(&c, &id)) == 0)
            printf("checkpoint=%s\nfamily=%s\nid=%d\n", c.id, c.family, id);
    } else if (strcmp(op, "create_clones") == 0 && argc == 5) {
        sfc_checkpoint c = {0};
        snprintf(c.id, sizeof c.id, "%s", argv[2]);
        sfc_ticket t = ticket_named(argv[3]);
        int max = atoi(argv[4]), ids[256], count = UNTOUCHED;
        for (int i = 0; i < 256; i++)
            ids[i] = UNTOUCHED;
        if ((rc = sfc_create_clones(&c, &t, ids, max, &count)) == 0) {
            printf("count=%d\n", count);
            print_ints("clones", ids, max);
        }
    } else if (strcmp(op, "exit") == 0 && argc == 3) {
        rc = sfc_exit(atoi(argv[2]));
    } else if (strcmp(op, "join") == 0 && argc == 4) {
        sfc_ticket t = ticket_named(argv[2]);
        int max = atoi(argv[3]), st[256], count = UNTOUCHED;
        for (int i = 0; i < 256; i++)
            st[i] = UNTOUCHED;
        if ((rc = sfc_join(&t, st, max, &count)) == 0) {
            printf("count=%d\n", count);
            print_ints("statuses", st, max);
        }
    } else if (strcmp(op, "members") == 0 && argc == 4) {
        sfc_ticket t = ticket_named(argv[2]);
        sfc_member m[16];
        int max = atoi(argv[3]), count = UNTOUCHED;
        if ((rc = sfc_members(&t, m, max, &count)) == 0) {
            printf("count=%d\n", count);
            for (int i = 0; i < count && i < max; i++)
                printf("member%d=%d %s %s %s %d\n", i, m[i].id, m[i].state, m[i].ip, m[i].hostname, m[i].status);
        }
    } else if (strcmp(op, "kill") == 0 && argc == 3) {
        sfc_ticket t = ticket_named(argv[2]);
        rc = sfc_kill(&t);
    } else if (strcmp(op, "whoami") == 0 && (argc == 2 || argc == 5)) {
        int id = UNTOUCHED;
        char role[64] = "", ip[64] = "", host[256] = "";
        size_t rl = argc == 5 ? (size_t)atoi(argv[2]) : sizeof role;
        size_t il = argc == 5 ? (size_t)atoi(argv[3]) : sizeof ip;
        size_t hl = argc == 5 ? (size_t)atoi(argv[4]) : sizeof host;
        if ((rc = sfc_whoami(&id, role, rl, ip, il, host, hl)) == 0)
            printf("id=%d\nrole=%s\nip=%s\nhostname=%s\n", id, role, ip, host);
    } else if (strcmp(op, "strerror") == 0 && argc == 3) {
        printf("text=%s\n", sfc_strerror(atoi(argv[2])));
        rc = 0;
    } else {
        return usage();
    }
    printf("rc=%d\nerror=%s\n", rc, sfc_last_error());
    return 0;
}
