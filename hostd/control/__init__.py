"""Feedback control of VMs: a PI controller holds a high class's target by limiting the best-effort class (docs/monitoring.md)."""
