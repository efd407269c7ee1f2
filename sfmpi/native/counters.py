"""Reading the counters files of the memory server and memtap (native/memory/counters.h).

The daemons map the file shared and add to it; a reader takes a snapshot at
any time, also after the daemon died.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from sfmpi.errors import LazyMemoryError

from . import load


@dataclass(frozen=True)
class CounterSlot:
    id: str
    fields: dict[str, int]
    latency_hist: tuple[int, ...]   # bucket b: [2^b, 2^(b+1)) microseconds

    def latency_quantile_us(self, q: float) -> float | None:
        """The bucket's upper bound below which a share q of the requests fell."""
        total = sum(self.latency_hist)
        if not total:
            return None
        seen = 0
        for b, n in enumerate(self.latency_hist):
            seen += n
            if seen >= q * total:
                return float(2 ** (b + 1))
        return float(2 ** len(self.latency_hist))


def read(path: Path) -> list[CounterSlot]:
    """Every slot in use (an id set): memtap has one, the server its totals ("*") and one per checkpoint."""
    layout = load().counter_layout()
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise LazyMemoryError(f"counters {path}: {exc.strerror}") from None
    if len(raw) < layout["header"] or raw[:8] != layout["magic"]:
        raise LazyMemoryError(f"counters {path}: not a counters file")
    slots, nfields, nhist, _pid = struct.unpack_from("=IIII", raw, 8)
    names = layout["fields"]
    if nfields != len(names) or nhist != layout["hist"] or len(raw) < layout["header"] + slots * layout["slot"]:
        raise LazyMemoryError(f"counters {path}: written by another version of sfmpi._native")
    out = []
    for i in range(slots):
        base = layout["header"] + i * layout["slot"]
        ident = raw[base:base + layout["id_len"]].split(b"\0", 1)[0].decode(errors="replace")
        if not ident:
            continue
        values = struct.unpack_from(f"={nfields}Q", raw, base + layout["fields_offset"])
        hist = struct.unpack_from(f"={nhist}Q", raw, base + layout["fields_offset"] + 8 * nfields)
        out.append(CounterSlot(ident, dict(zip(names, values)), hist))
    return out
