"""What every benchmark does at its end: print the result (JSON or its table),
say what failed and what `down` left, and turn that into the exit code."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable

LEFT_AFTER_DOWN = "left after down"


def measure(res: dict, body: Callable[[], dict | None]) -> dict:
    """Run a benchmark's body; what it returns goes into res. A failure (a
    RuntimeError, a command that timed out) becomes res["error"], and, when it
    is what `down` left behind (raise RuntimeError(f"{LEFT_AFTER_DOWN}: ...")),
    res["host_leaks"] too."""
    res.setdefault("host_leaks", [])
    try:
        res.update(body() or {})
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        res["error"] = str(exc)
        res["host_leaks"] = [str(exc)] if LEFT_AFTER_DOWN in str(exc) else []
    return res


def report(res: dict, as_json: bool, print_table: Callable[[dict], None], failed: bool = False,
           json_skip: tuple[str, ...] = ()) -> int:
    """failed: a benchmark's own verdict beyond an error or leftovers (the soak's leaks)."""
    if as_json:
        print(json.dumps({k: v for k, v in res.items() if k not in json_skip}, indent=2))
    elif "error" not in res:
        print_table(res)
    if res.get("error"):
        print(f"FAILED: {res['error']}", file=sys.stderr)
    if res["host_leaks"]:
        print(f"LEFT AFTER DOWN: {res['host_leaks']}", file=sys.stderr)
    return 1 if res.get("error") or res["host_leaks"] or failed else 0
