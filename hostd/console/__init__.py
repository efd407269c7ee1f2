"""The admin console: web pages on the host's loopback that graph the pools and the VMs
(docs/console.md, docs/pool.md)."""
