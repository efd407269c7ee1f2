/* Sums a file of doubles the parent wrote just before sfmpirun forked it: each
 * rank reads its own slice from its own clone's copy of the file (inherited
 * with the page cache, nothing was copied), MPI_Reduce adds the parts.
 *
 *   python3 -c "import struct; open('/tmp/input.dat','wb').write(struct.pack('1000d', *range(1000)))"
 *   sfmpirun -n 4 ./sum_input /tmp/input.dat      # 499500
 */
#include <mpi.h>
#include <stdio.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc < 2) {
        if (rank == 0)
            fprintf(stderr, "usage: sum_input FILE\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    struct stat st;
    FILE *f = fopen(argv[1], "rb");
    if (!f || stat(argv[1], &st) != 0) {
        fprintf(stderr, "rank %d: cannot open %s\n", rank, argv[1]);
        MPI_Abort(MPI_COMM_WORLD, 3);
    }
    long count = st.st_size / (long)sizeof(double);
    long lo = count * rank / size, hi = count * (rank + 1) / size;
    double x, part = 0.0, total = 0.0;
    fseek(f, lo * (long)sizeof(double), SEEK_SET);
    for (long i = lo; i < hi && fread(&x, sizeof x, 1, f) == 1; i++)
        part += x;
    fclose(f);
    MPI_Reduce(&part, &total, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0)
        printf("sum %.0f over %ld values\n", total, count);
    MPI_Finalize();
    return 0;
}
