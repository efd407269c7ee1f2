"""The cross-host master: which hosts are up, and where a ticket's clones go."""
