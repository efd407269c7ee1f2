"""The cross-host part of hostd: cluster keys, the mutually authenticated TLS wire, NBD exports."""
