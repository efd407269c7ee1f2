"""hostd: the per-host daemon that owns every VM on its host."""
