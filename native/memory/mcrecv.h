/* memtap's multicast receiver: one thread that joins the checkpoint's group,
 * checks every datagram (mcast.h: size, fields, then the MAC), assembles
 * ranges straight into memtap's cache, and says when pages are whole
 * (`done`). It gives up on a range quiet for MCRECV_EXPIRE_MS (its whole pages
 * are still kept) and reports the rate it can take to the server every
 * MCRECV_REPORT_MS (`report`): more while nothing is lost, three quarters of
 * what arrived when more than 1% was lost.
 */
#ifndef SFMPI_MEMORY_MCRECV_H
#define SFMPI_MEMORY_MCRECV_H

#include <stddef.h>
#include <stdint.h>

#include "counters.h"
#include "protocol.h"

#define MCRECV_EXPIRE_MS 100           /* over the server's lockstep window (mcsend.h) */
#define MCRECV_REPORT_MS 250
#define MCRECV_RCVBUF (16 << 20)       /* measured: default buffers lost 1-16% at 90k datagrams/s, 16 MiB none */

struct mcrecv_config {
    const char *group;               /* "A.B.C.D:PORT" */
    const char *local;               /* the address whose interface joins; NULL: the kernel's choice */
    const uint8_t *token;            /* MP_TOKEN_LEN bytes: keys the MAC */
    uint64_t ram_size;
    uint8_t *cache;                  /* ram_size bytes */
    const uint8_t *present;          /* memtap's bit per page (read only here) */
    struct mc_slot *counters;
    void (*done)(void *arg, uint64_t offset, uint64_t length);   /* pages now whole in the cache */
    void (*report)(void *arg, uint64_t bytes_per_s);
    void *arg;
};

struct mcrecv;

/* Join and start the thread: 0, or -1 with a message in err. */
int mcrecv_start(const struct mcrecv_config *cfg, struct mcrecv **out, char *err, size_t errlen);
void mcrecv_stop(struct mcrecv *r);

#endif
