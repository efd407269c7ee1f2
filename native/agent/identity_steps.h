/*
 * The steps of a re-identification (identity.h), one file per concern, and
 * the helpers they share (identity.c).  Internal to the identity files: the
 * rest of the agent uses identity.h.  Each step returns 0, or -1 with the
 * reason in `err`.
 */
#ifndef SFMPI_AGENT_IDENTITY_STEPS_H
#define SFMPI_AGENT_IDENTITY_STEPS_H

#include "identity.h"

/* -- identity.c: shared helpers -------------------------------------------- */

/* Formats the reason into err; returns -1. */
int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* obj[key] if it is a string, else NULL. */
const char *str_field(json_object *obj, const char *key);
/* Replaces `path` (under identity_path) with `text`, whole or not at all. */
int write_atomic(const char *path, const char *text, char *err, size_t errlen);

/* -- identity_system.c: clock, entropy, boot ID, machine-id ------------------ */

int set_clock(double host_time, double received, char *err, size_t errlen);
/* `b64`: the host's entropy; `random_fd`: /dev/random opened, or -1. */
int reseed(const char *b64, int random_fd, char *err, size_t errlen);
int set_boot_id(const char *boot_id, char *err, size_t errlen);
/* In the parent: our boot ID file over the kernel's, with the parent's ID. */
void prepare_boot_id(void);
int set_machine_id(const char *machine_id, char *err, size_t errlen);

/* -- identity_network.c: the NIC ------------------------------------------------ */

/* The name of the VM's Ethernet NIC into out; -1 if there is none. */
int nic_name(char *out, size_t len);
/* MAC, address, netmask, up, default route, from `ident`. */
int configure_network(json_object *ident, const struct identity_prep *prep, char *err, size_t errlen);

/* -- identity_hosts.c: hostname (identity_write_hosts is in identity.h) -------- */

int set_hostname(const char *name, char *err, size_t errlen);

/* -- identity_hooks.c: /etc/sfmpi/clone.d ------------------------------------- */

/* The hooks' full paths, in order, NULL-terminated (free with free_hooks). */
char **scan_hooks(void);
void free_hooks(char **hooks);
/* Runs `hooks` in order with the clone's identity in their environment. */
int run_clone_hooks(json_object *ident, char **hooks, char *err, size_t errlen);

#endif
