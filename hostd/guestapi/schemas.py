"""What a guest may send hostd, declared: every line is checked before anything acts on it.

A guest is untrusted. Its agent's lines (hostd/guestapi/channel.py) are bounded
in length (MAX_LINE) and parsed (parse_line); a line that cannot be read is
dropped, since nothing in it, not even a request id, can be trusted. A message
that can be read is checked (check): nesting bounded, NaN and infinities refused
(Python's json accepts them: a NaN ticket timeout once killed a ticket's clones at
once), then validated against the schema of its kind with the `jsonschema`
library: types, ranges, string lengths, no unknown clone-API op. Refused there,
a call still gets its answer (the agent forwards a program's fields as they came,
NaN included, and some of its calls wait for hostd without end). The agent
forwards absent fields as null, so optional fields allow null.
"""
from __future__ import annotations

import json
import math

from jsonschema import Draft202012Validator, validators

from sfmpi.errors import ProtocolError

from ..resources.settings import KEYS as RESOURCE_KEYS

# One line from the agent: exec output comes in chunks of at most 32 KiB
# (base64: ~44 KiB); nothing else comes near this.
MAX_LINE = 128 << 10
MAX_DEPTH = 32
MAX_TIMEOUT_S = 7 * 24 * 3600.0     # a week: far beyond any real ticket or join
MAX_CLONES = 4096
REQ_ID_MAX = 2 ** 53                # what the agent's counter can reach, exactly as a JSON number

_ticket_id = {"type": "string", "minLength": 1, "maxLength": 128}
_timeout = {"anyOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S}]}
_req = {"type": "integer", "minimum": 1, "maximum": REQ_ID_MAX}
_ms_map = {"type": "object", "maxProperties": 64,
           "propertyNames": {"maxLength": 64},
           "additionalProperties": {"type": "number", "minimum": -1e9, "maximum": 1e9}}
_text = {"type": "string", "maxLength": 4096}
# A ticket's resource settings for its clones (hostd/resources/settings.py
# checks each value's range; this bounds what reaches it).
_RESOURCE_KEYS = list(RESOURCE_KEYS)
# Not an anyOf of null and object: jsonschema would then say only "not valid
# under any of the given schemas", where this names the unknown setting.
_resources = {"type": ["object", "null"], "maxProperties": len(_RESOURCE_KEYS),
              "propertyNames": {"enum": _RESOURCE_KEYS},
              "additionalProperties": {"type": ["string", "number", "null"], "maxLength": 64,
                                       "minimum": 0, "maximum": 1e15}}


def _request(op: str, **fields) -> dict:
    return {"type": "object", "required": ["req", "op"],
            "properties": {"req": _req, "op": {"const": op}, **fields}}


REQUESTS = {
    "ticket": _request("ticket", n={"type": "integer", "minimum": 1, "maximum": MAX_CLONES}, timeout=_timeout,
                      resources=_resources),
    "clone": _request("clone", ticket=_ticket_id),
    "checkpoint": _request("checkpoint"),
    "create_clones": _request("create_clones", checkpoint={"type": "string", "minLength": 1, "maxLength": 128,
                                                           "pattern": "^[a-z0-9][a-z0-9-]*$"},
                              ticket=_ticket_id),
    "exit": _request("exit", status={"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0,
                                                                  "maximum": 255}]}),
    "join": _request("join", ticket=_ticket_id, timeout=_timeout),
    "kill": _request("kill", ticket=_ticket_id),
    "members": _request("members", ticket=_ticket_id),
}
for _op in ("clone", "join", "kill", "members"):
    REQUESTS[_op]["required"] = ["req", "op", "ticket"]
REQUESTS["create_clones"]["required"] = ["req", "op", "checkpoint", "ticket"]

_job_id = {"type": "integer", "minimum": 1, "maximum": REQ_ID_MAX}
EVENTS = {
    "ready": {"type": "object", "properties": {
        "version": {"type": "integer"}, "hostname": {"type": "string", "maxLength": 255},
        "boot_id": {"type": "string", "maxLength": 64},
        "uptime": {"type": "number", "minimum": 0}}},
    "out": {"type": "object", "required": ["id", "fd", "data"], "properties": {
        "id": _job_id, "fd": {"enum": [1, 2]}, "data": {"type": "string", "maxLength": MAX_LINE,
                                                        "pattern": "^[A-Za-z0-9+/]*={0,2}$"}}},
    "exit": {"type": "object", "required": ["id", "code"], "properties": {
        "id": _job_id, "code": {"type": "integer", "minimum": -64, "maximum": 255}}},
    "error": {"type": "object", "required": ["message"], "properties": {
        "id": {"anyOf": [{"type": "null"}, _job_id]}, "message": _text}},
    "identified": {"type": "object", "required": ["ok"], "properties": {
        "ok": {"type": "boolean"}, "error": _text, "guest_ms": _ms_map}},
    "cloned": {"type": "object", "required": ["ok"], "properties": {
        "id": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": MAX_CLONES}]},
        "ok": {"type": "boolean"}, "error": _text, "guest_ms": _ms_map}},
    # A pool worker's load report (sfmpi/guest/load.py): numbers a guest could
    # make up, so only their range is trusted, never that they are true.
    "load": {"type": "object", "required": ["cpu", "ram"], "properties": {
        "cpu": {"type": "number", "minimum": 0, "maximum": 100},
        "ram": {"type": "integer", "minimum": 0, "maximum": 1 << 50},
        "ram_total": {"type": "integer", "minimum": 0, "maximum": 1 << 50}}},
}



def _is_integer(_checker, instance) -> bool:
    # A JSON integer: jsonschema's "integer" also takes 3.0, which hostd would then
    # carry on as a float (a request id 3.0 recorded in a checkpoint's manifest
    # makes the manifest unloadable).
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = validators.extend(
    Draft202012Validator, type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))
_VALIDATORS = {("req", k): _Validator(v) for k, v in REQUESTS.items()}
_VALIDATORS.update({("ev", k): _Validator(v) for k, v in EVENTS.items()})


def _shape(obj, limit: int) -> tuple[int, bool]:
    """Nesting depth (counted up to just past limit) and whether every number is
    finite, iteratively (a recursive walk is what a deep message attacks)."""
    deepest, finite, stack = 0, True, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest, finite
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
        elif isinstance(o, float) and not math.isfinite(o):
            finite = False
    return deepest, finite


def parse_line(line: bytes) -> dict:
    """One line from a guest as a JSON object; ProtocolError if it cannot be read.
    What is wrong with a message that can be read is for check() to say."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes (at most {MAX_LINE})")
    # json's parser recurses once per level of nesting: refuse deep input before it.
    if line.count(b"[") + line.count(b"{") > 4 * MAX_DEPTH and _rough_depth(line) > MAX_DEPTH:
        raise ProtocolError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        msg = json.loads(line)   # NaN, Infinity and 1e400 read as floats here: check() refuses them
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("not a JSON object")
    return msg


def _rough_depth(line: bytes) -> int:
    depth = deepest = 0
    for ch in line:
        if ch in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in b"]}":
            depth -= 1
    return deepest


def kind(msg: dict) -> tuple[str, str] | None:
    """("req", op) for a clone-API call, ("ev", name) for an event, else None."""
    if "req" in msg:
        op = msg.get("op")
        return ("req", op) if isinstance(op, str) else ("req", "")
    ev = msg.get("ev")
    return ("ev", ev) if isinstance(ev, str) else None


def check(msg: dict) -> None:
    """Validate a parsed message against the schema of its kind (ProtocolError if it fails)."""
    depth, finite = _shape(msg, MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise ProtocolError(f"nested deeper than {MAX_DEPTH} levels")
    if not finite:
        raise ProtocolError("NaN and infinities are not numbers sfmpi accepts")
    k = kind(msg)
    if k is None:
        raise ProtocolError("neither a clone-API call (req) nor an event (ev)")
    validator = _VALIDATORS.get(k)
    if validator is None:
        what = f"clone-API op {k[1][:64]!r}" if k[0] == "req" else f"event {k[1][:64]!r}"
        raise ProtocolError(f"unknown {what}")
    error = next(iter(validator.iter_errors(msg)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "message"
        raise ProtocolError(f"{k[1]}: {where}: {error.message[:200]}")
