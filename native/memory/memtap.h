/* memtap: a FUSE file system, on a clone host, with one read-only file `ram`
 * that is a remote checkpoint's RAM. Clone QEMUs map it privately, exactly as
 * they map a local checkpoint file. A read is served from memtap's extent
 * cache, synthesised (zero pages, from the checkpoint's page map), or fetched
 * from the memory server (fetch.h); every clone on the host shares the
 * kernel's page cache of the file (keep_cache). Writes, truncation and
 * fallocate are refused: the file is the checkpoint.
 *
 * With a multicast group (mcrecv.h), faults are asked for "by the group": the
 * server sends the range to every host's memtap, each stores what arrives into
 * its cache and the kernel's page cache (notify_store), so clones on other
 * hosts never fault on it; a fault waits for its pages, then asks by unicast
 * for what did not come (a repair). A background thread asks first for the
 * recorded working set (prefetch) and then, with push, for every page left.
 */
#ifndef SFMPI_MEMORY_MEMTAP_H
#define SFMPI_MEMORY_MEMTAP_H

#include <stddef.h>
#include <stdint.h>

struct memtap_config {
    const char *mountpoint;
    const char *server_host;
    uint16_t server_port;
    const char *checkpoint;
    const char *token_hex;
    const char *map_path;
    const char *counters_path;   /* NULL: none */
    int connections;             /* to the server; 0: 4 */
    int timeout_ms;              /* per request and connect; 0: 10 s */
    int read_ahead_kb;           /* what one fault reads beyond its page, 0..1024; < 0: 1024 */
    const char *group;           /* the checkpoint's multicast group "A.B.C.D:PORT"; NULL: unicast only */
    const char *mcast_local;     /* this host's address on the hosts' network (joins the group there) */
    int mcast_wait_ms;           /* how long a fault waits for the group before asking by unicast; 0: 200 */
    int push;                    /* fetch every non-zero page in the background, then need no server */
    const char *workingset;      /* a recorded working set to ask for first (workingset.h); NULL: none */
};

/* Mount, serve until SIGTERM/SIGINT/SIGHUP (or memtap_stop), unmount.
 * 0, or -1 with a message in err. `ready` (may be NULL) is called once the
 * file can be opened. */
int memtap_run(const struct memtap_config *cfg, char *err, size_t errlen, void (*ready)(void *), void *arg);

#endif
