"""sfmpirun, the drop-in mpirun that forks its worker cluster (issue #4)."""
