#!/usr/bin/env python3
"""mpi4py version of cpi.c: sfmpirun -n 4 python3 pi_mpi4py.py [intervals]"""
import socket
import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
h = 1.0 / n
part = h * sum(4.0 / (1.0 + (h * (i + 0.5)) ** 2) for i in range(rank, n, size))
pi = comm.allreduce(part, op=MPI.SUM)
print(f"rank {rank} of {size} on {socket.gethostname()}", flush=True)
comm.Barrier()
if rank == 0:
    print(f"pi is approximately {pi:.12f}")
