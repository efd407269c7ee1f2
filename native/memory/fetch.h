/* memtap's side of the memory protocol: a few connections to one memory
 * server for one checkpoint, shared by FUSE's threads. Every wait is bounded
 * (connect, each reply): a server that stalls or dies turns into an error,
 * never a hang; a reply that is not the one asked for (garbage) ends the
 * connection and is an error too.
 */
#ifndef SFMPI_MEMORY_FETCH_H
#define SFMPI_MEMORY_FETCH_H

#include <pthread.h>
#include <stdint.h>

#include "counters.h"
#include "protocol.h"

#define FETCH_MAX_CONNECTIONS 16

struct fetch_conn {
    pthread_mutex_t lock;
    int fd;                   /* -1: not connected */
    uint32_t next_id;
};

struct fetcher {
    char host[64];
    uint16_t port;
    char id[MP_ID_MAX + 1];
    uint8_t token[MP_TOKEN_LEN];
    int timeout_ms;
    int count;
    uint64_t size;            /* the RAM size the server announced */
    struct mc_slot *counters;
    struct fetch_conn conn[FETCH_MAX_CONNECTIONS];
    pthread_mutex_t err_lock;
    char last_error[256];
};

/* Connects once to learn the size and check the token: 0, or -1 with last_error set. */
int fetcher_init(struct fetcher *f, const char *host, uint16_t port, const char *id, const char *token_hex,
                 int connections, int timeout_ms, struct mc_slot *counters);
/* [offset, offset + length) into dst; page-aligned, length <= MP_MAX_REQUEST. 0 or -1. */
int fetcher_get(struct fetcher *f, uint64_t offset, uint32_t length, uint8_t *dst);
/* The same with request flags (protocol.h): 0 (the bytes are in dst), 1 (the
 * server sent them to the multicast group instead), or -1. */
int fetcher_ask(struct fetcher *f, uint64_t offset, uint32_t length, uint8_t *dst, uint32_t flags);
/* A rate report on a connection that is free now: 0, or -1 (none free, or it failed). */
int fetcher_report(struct fetcher *f, uint64_t bytes_per_s);
void fetcher_close(struct fetcher *f);
const char *fetcher_last_error(struct fetcher *f, char *buf, size_t len);

#endif
