"""The libvirt driver (issue 21): domain XML, the private libvirtd."""
