"""`sfmpi pool client`: text requests at a set rate against a pool's front end.

Open loop (requests start on schedule whatever the answers' latency, as real
clients do), bounded in count (rate x duration) and time (each request's own
timeout, then the run ends). One thread per request in flight, at most
MAX_IN_FLIGHT: the standard library's http.client is all it needs, and a
thread per request keeps a slow answer from delaying the next start.
"""
from __future__ import annotations

import http.client
import statistics
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from sfmpi.errors import UsageError

MAX_IN_FLIGHT = 256
DEFAULT_TEXT = ("A client sends text to the server, the server hands each request to a free virtual machine, "
                "and a controller clones another when none is free.\n") * 8


@dataclass(frozen=True)
class Result:
    start: float      # seconds since the run began
    latency: float
    status: int       # HTTP status, 0 for a failure before any answer
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


def check_args(rate: float, duration: float, timeout: float) -> None:
    if not 0 < rate <= 1000:
        raise UsageError(f"--rate is requests per second, 0-1000 (got {rate:g})")
    if not 0 < duration <= 3600:
        raise UsageError(f"--duration is 0-3600 s (got {duration:g})")
    if not 0 < timeout <= 600:
        raise UsageError(f"--timeout is 0-600 s (got {timeout:g})")


def one_request(url: str, body: bytes, timeout: float, t0: float) -> Result:
    parts = urllib.parse.urlsplit(url)
    start = time.monotonic()
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", target, body=body,
                         headers={"Content-Type": "text/plain; charset=utf-8"})
            resp = conn.getresponse()
            resp.read()
            status, error = resp.status, "" if resp.status == 200 else f"HTTP {resp.status}"
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        status, error = 0, type(exc).__name__
    return Result(start - t0, time.monotonic() - start, status, error)


def run(url: str, rate: float, duration: float, text: bytes = DEFAULT_TEXT.encode(), timeout: float = 120.0,
        stop: threading.Event | None = None) -> list[Result]:
    check_args(rate, duration, timeout)
    count = max(1, int(rate * duration))
    t0 = time.monotonic()
    futures = []
    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT, thread_name_prefix="pool-client") as pool:
        for i in range(count):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0 and (stop.wait(delay) if stop else time.sleep(delay)):
                break
            futures.append(pool.submit(one_request, url, text, timeout, t0))
    return [f.result() for f in futures]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, int(q) - 1))]


def summary(results: list[Result], wall_s: float | None = None) -> dict:
    lat = sorted(r.latency for r in results if r.ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    span = wall_s if wall_s is not None else (max((r.start + r.latency for r in results), default=0.0))
    return {"requests": len(results), "ok": len(lat), "failed": len(results) - len(lat), "errors": errors,
            "throughput_rps": round(len(lat) / span, 2) if span > 0 else 0.0,
            "latency_s": {"p50": round(percentile(lat, 50), 4), "p90": round(percentile(lat, 90), 4),
                          "p99": round(percentile(lat, 99), 4), "max": round(lat[-1], 4) if lat else 0.0}}


def as_records(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]
