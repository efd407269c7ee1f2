"""The admin console: a web page on the host's loopback that graphs the pools (docs/console.md, docs/pool.md)."""
