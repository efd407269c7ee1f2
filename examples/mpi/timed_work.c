/* A job of a given length: every rank computes (a Leibniz series for pi) for
 * SECONDS of wall time, the ranks exchange partial results with MPI_Allreduce
 * once a second, and rank 0 prints the total number of terms. bench/mpi.py
 * runs it as its ~60 s job.
 *
 *   mpicc.mpich -O2 -o timed_work timed_work.c
 *   sfmpirun -n 4 ./timed_work 60
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    int rank, size;
    double seconds = argc > 1 ? atof(argv[1]) : 60.0;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);

    double t0 = MPI_Wtime(), sum = 0.0, all = 0.0;
    long terms = 0, total = 0;
    int done = 0;
    while (!done) {
        double until = MPI_Wtime() + 1.0;
        while (MPI_Wtime() < until) {
            for (int k = 0; k < 10000; k++, terms++) {
                long i = terms * size + rank;
                sum += (i % 2 ? -4.0 : 4.0) / (double)(2 * i + 1);
            }
        }
        /* All ranks stop together, when the first one is past SECONDS. */
        int over = MPI_Wtime() - t0 >= seconds;
        MPI_Allreduce(&over, &done, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    }
    MPI_Allreduce(&sum, &all, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&terms, &total, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0)
        printf("%d ranks, %.1f s, %ld terms, pi ~ %.6f\n", size, MPI_Wtime() - t0, total, all);
    MPI_Finalize();
    return 0;
}
