"""Named steps where a test may kill hostd outright, to prove that a restarted
hostd finds the host consistent (tests/integration/test_crash_points.py).

SFMPI_CRASH_AT=STEP makes hostd SIGKILL itself when it reaches STEP: no
cleanup runs, exactly as if the host's OOM killer or an operator's kill -9
hit it there. Unset (always, outside those tests), reached() costs a dict lookup.
"""
from __future__ import annotations

import os
import signal

STEPS = (
    "checkpoint:start", "checkpoint:receiver", "checkpoint:paused", "checkpoint:captured",
    "checkpoint:described",
    "clone:reserved", "clone:launched", "clone:resumed",
)


def reached(step: str) -> None:
    if os.environ.get("SFMPI_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
