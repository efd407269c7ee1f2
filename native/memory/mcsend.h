/* The memory server's multicast side: one per checkpoint with a group. The
 * server answers a request flagged MP_FLAG_MULTICAST by sending the range to
 * the checkpoint's group (mcast.h's datagrams), so every host's memtap gets it:
 * a range sent within the lockstep window is not sent again (mc_recent), and
 * every datagram waits for the pacer, which goes at the slowest receiver's
 * reported rate (mc_pacer). Ranges of one checkpoint go out one at a time
 * (the lock), which is what pacing a group means.
 */
#ifndef SFMPI_MEMORY_MCSEND_H
#define SFMPI_MEMORY_MCSEND_H

#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>

#include "counters.h"
#include "mcast.h"

#define MCSEND_WINDOW_MS 50            /* lockstep: about two round trips, and well under memtap's wait */
#define MCSEND_FLOOR (1u << 20)        /* bytes/s: the slowest a group is ever paced */
#define MCSEND_BURST (256u << 10)

struct mcsend {
    int fd;                   /* the server's UDP socket: shared, not owned */
    struct sockaddr_in group;
    uint32_t session, seq;
    uint64_t ram_size;
    pthread_mutex_t lock;     /* all below */
    struct mc_key key;
    struct mc_recent recent;
    struct mc_pacer pacer;
    uint8_t *ever;            /* bit per page: sent to the group at least once */
};

/* "A.B.C.D:PORT" (an IPv4 multicast address) into *out: 0 or -1. */
int mcsend_parse_group(const char *text, struct sockaddr_in *out);
/* 0, or -errno with *err saying what failed. rate: the pacer's ceiling, bytes/s. */
int mcsend_init(struct mcsend *m, int fd, const struct sockaddr_in *group, const uint8_t token[MP_TOKEN_LEN],
                uint64_t ram_size, uint64_t rate, const char **err);
void mcsend_free(struct mcsend *m);
/* Is [offset, offset + length) to be sent (not covered by a send within the
 * window)? 1, or 0; the range counts as sent from now. */
int mcsend_claim(struct mcsend *m, uint64_t offset, uint32_t length);
/* The range's bytes (buf) to the group, paced. 0, or -1 (sendto failed). */
int mcsend_range(struct mcsend *m, uint64_t offset, uint32_t length, const uint8_t *buf, struct mc_slot *slots[2]);
void mcsend_report(struct mcsend *m, uint32_t receiver, uint64_t bytes_per_s);

#endif
