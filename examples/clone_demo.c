/*
 * clone_demo: fork this VM into two clones with libsfclone.
 *
 * Each clone prints who it is and exits with its ID as status; the parent
 * joins and prints every clone's status.  Run it inside an sfmpi guest:
 *   cc clone_demo.c $(pkg-config --cflags --libs sfclone) -o clone_demo
 */
#include <stdio.h>
#include <stdlib.h>

#include <sfclone.h>

static int die(const char *what, int rc)
{
    fprintf(stderr, "clone_demo: %s: %s (%s)\n", what, sfc_strerror(rc), sfc_last_error());
    return 1;
}

int main(void)
{
    sfc_ticket ticket;
    int rc, id;
    char ip[64], hostname[256];

    if ((rc = sfc_request_ticket(2, 0, &ticket)) != 0)
        return die("ticket", rc);
    printf("ticket %s: %d of %d clones granted\n", ticket.id, ticket.granted, ticket.requested);

    /* Everything before this line, stdio buffers included, is copied into
     * every clone: flush so the ticket line is not printed three times. */
    fflush(stdout);
    if ((rc = sfc_clone(&ticket, &id)) != 0)
        return die("clone", rc);

    if ((rc = sfc_whoami(NULL, NULL, 0, ip, sizeof ip, hostname, sizeof hostname)) != 0)
        return die("whoami", rc);
    printf("id %d: hostname %s, ip %s\n", id, hostname, ip);
    fflush(stdout);

    if (id > 0) {
        rc = sfc_exit(id); /* returns only if the VM could not be ended */
        return die("exit", rc);
    }

    int statuses[251], count; /* index = clone ID; at most 250 clones */
    if ((rc = sfc_join(&ticket, statuses, 251, &count)) != 0)
        return die("join", rc);
    int failed = 0;
    for (int k = 1; k <= count && k < 251; k++) {
        if (statuses[k] < 0)
            failed = 1;
        else
            printf("clone %d exited with status %d\n", k, statuses[k]);
    }
    /* join puts the reasons of clones that never exited in sfc_last_error */
    if (failed)
        printf("failed clones: %s\n", sfc_last_error());
    return 0;
}
