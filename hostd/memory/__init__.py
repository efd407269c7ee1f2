"""Lazy memory: clones whose RAM a memory server serves through memtap (native/memory/)."""
