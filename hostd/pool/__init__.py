"""Elastic service pools (docs/pool.md): workers cloned from one warm
checkpoint behind HAProxy, grown and shrunk by the rules of a controller."""
