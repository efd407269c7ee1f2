/*
 * sfclone.h - fork the VM from C or C++ (client of protocol sfclone/1).
 *
 * The guest agent listens on a Unix socket ($SFMPI_API_SOCKET, default
 * /run/sfmpi/api.sock); each call below is one request on its own connection.
 * See docs/clone-api.md for the protocol and the semantics of each verb.
 *
 * Every function returns 0 on success or a negative SFC_E* code.  After a
 * failure, sfc_last_error() holds the agent's message (or a local description
 * such as a failed connect) for the calling thread; a success does not clear
 * it.  The library keeps no other state, so calls may run in several threads,
 * though the agent allows only one clone call at a time (SFC_EBUSY).
 *
 * Build with `pkg-config --cflags --libs sfclone`.
 */
#ifndef SFCLONE_H
#define SFCLONE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SFC_PROTOCOL_VERSION 1
#define SFC_DEFAULT_SOCKET "/run/sfmpi/api.sock"

/* Error codes: the agent's error types (docs/clone-api.md) plus two local ones. */
#define SFC_OK         0
#define SFC_EFAIL     -1  /* the agent failed with an error type not listed below */
#define SFC_EUSAGE    -2  /* UsageError: malformed request, n < 1, bad status, NULL argument */
#define SFC_EROLE     -3  /* RoleError: exit in the parent, join/kill/clone/ticket in a clone */
#define SFC_ETICKET   -4  /* TicketError: unknown, used, killed or expired ticket */
#define SFC_EBUSY     -5  /* BusyError: a clone call is already in progress */
#define SFC_ECAPACITY -6  /* CapacityError: not a single clone slot could be granted */
#define SFC_ECLONE    -7  /* CloneError: a clone failed to come up */
#define SFC_EHOST     -8  /* HostdError: the agent cannot reach hostd; or exit returned */
#define SFC_EPROTO    -9  /* ProtocolError: version mismatch, unparsable or missing answer */
#define SFC_ECONNECT -10  /* the agent socket is missing or refuses connections */

/* A grant of clone slots; pass it to sfc_clone or sfc_create_clones once. */
typedef struct {
    char id[64];
    int requested;   /* n asked for */
    int granted;     /* m <= n clones that sfc_clone will start */
    char family[64];
    double timeout;  /* seconds clones may live after the clone; 0: none */
} sfc_ticket;

/* One clone of a used ticket, as sfc_members reports it. */
typedef struct {
    int id;
    char state[16];     /* "running", "exited" or "failed" */
    char ip[64];        /* "" once the clone has ended */
    char hostname[64];  /* "" once the clone has ended */
    int status;         /* its exit status when "exited", else -1 */
} sfc_member;

/* A saved parent state that sfc_create_clones can start clones from. */
typedef struct {
    char id[64];
    char family[64];
} sfc_checkpoint;

/* Ask for n clone slots; timeout_s > 0 kills clones still alive that long
 * after the clone, timeout_s <= 0 sends no timeout. */
int sfc_request_ticket(int n, double timeout_s, sfc_ticket *out);

/* The same, with resource settings for the ticket's clones instead of this
 * VM's: a JSON object such as {"priority": "low", "cpu_limit": 50} (the names
 * of `sfmpi vm set`; null drops an inherited setting).  NULL: they inherit. */
int sfc_request_ticket_with(int n, double timeout_s, const char *resources_json, sfc_ticket *out);

/* Fork the VM: returns once in the parent with *id_out = 0 (after every clone
 * is up) and once in each of the m clones with *id_out = 1..m. */
int sfc_clone(const sfc_ticket *t, int *id_out);

/* Checkpoint the parent without starting clones.  *id_out (may be NULL) is 0
 * in the parent and k in a clone later created from the checkpoint. */
int sfc_checkpoint_parent(sfc_checkpoint *out, int *id_out);

/* Start the ticket's clones from checkpoint c.  *count is the number of clones
 * started; the first min(*count, max) of their IDs are stored in clone_ids. */
int sfc_create_clones(const sfc_checkpoint *c, const sfc_ticket *t,
                      int *clone_ids, int max, int *count);

/* End this clone with status; the VM is destroyed, so this does not return
 * on success.  SFC_EHOST if the agent hung up and the VM is still alive. */
int sfc_exit(int status);

/* Wait until every clone of t has exited, died or been killed.  statuses is
 * indexed by clone ID (pass max >= granted + 1; IDs >= max are not stored);
 * a clone that never called exit gets -1 and its reason is in
 * sfc_last_error() as "k: reason" parts joined by "; ".  *count is the number
 * of clones reported. */
int sfc_join(const sfc_ticket *t, int *statuses, int max, int *count);

/* The ticket's clones (parent only): the first min(*count, max) go into
 * members, in clone ID order; *count is the number of clones. */
int sfc_members(const sfc_ticket *t, sfc_member *members, int max, int *count);

/* Destroy the ticket's clones at once. */
int sfc_kill(const sfc_ticket *t);

/* Who this VM is: *id (0 = parent), role "parent" or "clone", IP address and
 * hostname.  Any pointer may be NULL to skip that field; a buffer too small
 * for its value gives SFC_EUSAGE. */
int sfc_whoami(int *id, char *role, size_t rlen, char *ip, size_t iplen,
               char *hostname, size_t hlen);

/* A static description of an SFC_E* code. */
const char *sfc_strerror(int code);

/* The message of this thread's last failure ("" if none yet). */
const char *sfc_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SFCLONE_H */
