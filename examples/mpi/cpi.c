/* Compute pi by integrating 4/(1+x^2) over [0,1]; each rank takes every
 * size-th interval, MPI_Allreduce sums the parts. Each rank prints where it
 * ran, so sfmpirun shows one clone per rank.
 *
 *   mpicc.mpich -O2 -o cpi cpi.c        (or mpicc.openmpi)
 *   sfmpirun -n 4 ./cpi [intervals]
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    int rank, size, len;
    char host[MPI_MAX_PROCESSOR_NAME];
    long n = argc > 1 ? atol(argv[1]) : 10000000L;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &len);

    double h = 1.0 / (double)n, part = 0.0, pi = 0.0;
    for (long i = rank; i < n; i += size) {
        double x = h * ((double)i + 0.5);
        part += 4.0 / (1.0 + x * x);
    }
    part *= h;
    MPI_Allreduce(&part, &pi, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);

    printf("rank %d of %d on %s\n", rank, size, host);
    fflush(stdout);
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0)
        printf("pi is approximately %.12f, error %.12f\n", pi, fabs(pi - M_PI));
    MPI_Finalize();
    return 0;
}
