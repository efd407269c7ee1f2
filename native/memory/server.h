/* The memory server: serves ranges of checkpoints' RAM files to memtaps on
 * other hosts (protocol.h), many connections and checkpoints at once. One
 * thread accepts (and answers the control socket); one thread per connection
 * serves it. Checkpoints come and go through the control socket, a Unix
 * socket for hostd only (mode 0600), one line per command:
 *
 *   add ID TOKEN-HEX RAM-PATH MAP-PATH [GROUP:PORT]  ->  ok SIZE  | error WHY
 *   remove ID                            ->  ok           | error WHY
 *   workingset ID PATH                   ->  ok ENTRIES   | error WHY
 *   ping                                 ->  ok PORT
 *
 * A checkpoint added with a group (an IPv4 multicast address, mcsend.h)
 * answers requests flagged MP_FLAG_MULTICAST to it; `workingset` saves the
 * order in which its ranges were first asked for (workingset.h).
 */
#ifndef SFMPI_MEMORY_SERVER_H
#define SFMPI_MEMORY_SERVER_H

#include <stdint.h>

struct ms_config {
    const char *listen_host;      /* numeric IPv4 or IPv6 address */
    uint16_t port;                /* 0: the kernel picks one (ms_port says which) */
    const char *control_path;
    const char *counters_path;    /* NULL: no counters file */
    int max_connections;          /* 0: 256 */
    int hello_timeout_ms;         /* a peer that says nothing is dropped after this; 0: 10 s */
    int send_timeout_ms;          /* a peer that stops reading is dropped after this; 0: 30 s */
    const char *mcast_if;         /* the address multicast leaves from; NULL: no multicast */
    uint64_t mcast_rate;          /* bytes/s a group is paced to at most; 0: 64 MiB/s */
    int mcast_ttl;                /* 0: 1 (the hosts' own network) */
};

struct ms_server;

/* Bind, listen, open the control socket: 0 or -errno (*err says what failed). */
int ms_create(const struct ms_config *cfg, struct ms_server **out, const char **err);
uint16_t ms_port(const struct ms_server *s);
/* Serve until ms_stop (async-signal-safe) is called; then end every connection. */
int ms_run(struct ms_server *s);
void ms_stop(struct ms_server *s);
void ms_destroy(struct ms_server *s);

/* The control commands, callable in-process too (the tests do). */
int ms_add(struct ms_server *s, const char *id, const char *token_hex, const char *ram_path,
           const char *map_path, const char *group, uint64_t *size, const char **err);
int ms_remove(struct ms_server *s, const char *id);
/* The checkpoint's working set so far, saved to path: its entries, or -errno. */
int ms_save_workingset(struct ms_server *s, const char *id, const char *path);

#endif
