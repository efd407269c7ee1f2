/*
 * sfmpirun's finalize fix for MPICH 4.0 over UCX (Debian bookworm's MPICH).
 *
 * MPICH 4.0's UCX finalize closes every endpoint with ucp_disconnect_nb (a
 * flushing close) and waits, then enters a PMI barrier. An endpoint that was
 * created at MPI_Init but never used (ranks that never talked) has not finished
 * its wire-up, so flushing it needs the peer to answer; a peer that already
 * closed its own endpoints sits in the PMI barrier and never does. Measured
 * here: 1 run in 3 of cpi on 4 clones hung in MPI_Finalize. Later MPICH adds a
 * barrier before the disconnect, which narrows the race but does not close it.
 *
 * Preloaded into MPICH ranks by sfmpirun (LD_PRELOAD, -genv):
 *  - MPI_Finalize first runs MPI_Barrier on MPI_COMM_WORLD. When it returns,
 *    every rank has entered finalize, so every receive any rank will post has
 *    completed: no MPI data is still on its way.
 *  - The disconnects of finalize are then skipped: no flush, no answer needed
 *    from the peer, safe after that barrier. The endpoints go with the UCX
 *    worker MPICH destroys next (locally). A forced close would do the same
 *    but UCX refuses it (invalid parameter) for MPICH's endpoints, which have
 *    no peer error handling.
 * Symbols are looked up at call time (dlsym), so the library links against
 * neither MPICH nor UCX and is harmless in a process that has neither.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

/* From MPICH's mpi.h: an MPI_Comm is an int. */
#define MPICH_COMM_WORLD 0x44000000

typedef void *ucs_status_ptr_t;

static volatile int finalizing;

int MPI_Finalize(void)
{
    int (*barrier)(int) = (int (*)(int))dlsym(RTLD_DEFAULT, "PMPI_Barrier");
    int (*finalize)(void) = (int (*)(void))dlsym(RTLD_NEXT, "MPI_Finalize");

    if (finalize == NULL)
        finalize = (int (*)(void))dlsym(RTLD_DEFAULT, "PMPI_Finalize");
    if (barrier != NULL)
        barrier(MPICH_COMM_WORLD);
    finalizing = 1;
    return finalize();
}

ucs_status_ptr_t ucp_disconnect_nb(void *ep)
{
    if (finalizing)
        return NULL; /* UCS_OK: ucp_worker_destroy, right after, releases the endpoint locally */
    ucs_status_ptr_t (*disconnect)(void *) =
        (ucs_status_ptr_t (*)(void *))dlsym(RTLD_NEXT, "ucp_disconnect_nb");
    return disconnect(ep);
}
