/*
 * Re-identification of a guest: what makes a clone a machine of its own.
 *
 * Applied by the agent to the parent at boot (without hooks) and to every
 * clone before its clone call returns: wall clock from the host, kernel RNG
 * reseeded with the host's entropy, a new machine-id and boot ID, MAC, IP and
 * hostname from (family, ID), the family's hosts in /etc/hosts, then the
 * /etc/sfmpi/clone.d hooks.  QEMU's vmgenid device got a new generation ID on
 * the clone's command line; the guest kernel reseeds on that too.
 */
#ifndef SFMPI_AGENT_IDENTITY_H
#define SFMPI_AGENT_IDENTITY_H

#include <stdbool.h>
#include <stddef.h>

#include <json-c/json.h>

/*
 * What a clone's re-identification needs that does not depend on its
 * identity, looked up in the parent before it forks: a clone runs every code
 * path cold (under TCG, translated again per clone), the parent's are warm.
 * The hooks are those in /etc/sfmpi/clone.d at the clone call.
 */
struct identity_prep {
    bool ready;
    char nic[16];
    int ioctl_sock;
    int random_fd;
    char **hooks; /* full paths, in order, NULL-terminated */
};

/* Fills `prep` (in the parent, before the fork); errors are left for
 * identity_apply to meet and report. */
void identity_prepare(struct identity_prep *prep);
void identity_release(struct identity_prep *prep);

/*
 * Applies `msg` (an identify op or a clone's answer: "identity", "time",
 * "entropy", "machine_id", "boot_id", "hosts"), with `prep` from the parent
 * or NULL.  `received` is when it arrived (CLOCK_MONOTONIC, s).  Adds the ms
 * each step took to `steps`.  Returns 0, or -1 with the reason in `err`.
 */
int identity_apply(json_object *msg, double received, bool run_hooks, const struct identity_prep *prep,
                   json_object *steps, char *err, size_t errlen);

/* Replaces sfmpi's block of /etc/hosts with `hosts` ([[name, ip], ...]). */
int identity_write_hosts(json_object *hosts, char *err, size_t errlen);

/* Files the agent writes live under $SFMPI_AGENT_ROOT (tests) or /. */
const char *identity_path(const char *path, char *buf, size_t len);

double monotonic_s(void);

/* The first line of a (/proc, /sys) file without its newline into buf; "" if
 * it cannot be read.  Returns buf. */
char *read_first_line(const char *path, char *buf, size_t len);

#define KERNEL_BOOT_ID "/proc/sys/kernel/random/boot_id"

#endif
