"""A lab of hosts on one machine: K network namespaces on one bridge, standing in for K machines."""
