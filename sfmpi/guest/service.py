#!/usr/bin/python3
"""The example service of a pool (docs/pool.md): text in, a transformation out.

`python3 -m sfmpi.guest.service --port 8080 [--rounds N]` answers
  POST /   the posted text (UTF-8) -> JSON: lines, words, the ten commonest
           words, and a SHA-256 chain over the text of N rounds (the request's
           CPU cost: `?rounds=N` or the server's --rounds; at most 10**6)
  GET /health  "ok" (the pool's probe)
`--probe PORT` (run in the guest by the pool) waits until a service on
127.0.0.1:PORT answers a POST, and warms it with a few requests.
One thread per request (ThreadingHTTPServer): the balancer bounds how many run
at once (HAProxy's maxconn), not this server. Standard library only.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import http.server
import json
import re
import sys
import time
import urllib.parse

MAX_BODY = 1 << 20
MAX_ROUNDS = 10 ** 6
WORD = re.compile(r"\w+", re.UNICODE)


def transform(text: str, rounds: int) -> dict:
    words = [w.lower() for w in WORD.findall(text)]
    digest = text.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {"lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0), "words": len(words),
            "top": collections.Counter(words).most_common(10), "rounds": rounds, "chain": digest.hex()}


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "sfmpi-example/1"
    default_rounds = 0

    def log_message(self, *args) -> None:  # a request log per request would fill the console
        pass

    def _answer(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path == "/health":
            self._answer(200, b"ok\n", "text/plain")
        else:
            self._answer(404, b'{"error": "POST text to /"}\n')

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/":
            return self._answer(404, b'{"error": "POST text to /"}\n')
        try:
            length = int(self.headers.get("Content-Length", "0"))
            query = urllib.parse.parse_qs(url.query)
            rounds = int(query.get("rounds", [self.default_rounds])[0])
        except ValueError:
            return self._answer(400, b'{"error": "bad Content-Length or rounds"}\n')
        if not 0 <= length <= MAX_BODY or not 0 <= rounds <= MAX_ROUNDS:
            return self._answer(413, b'{"error": "body over 1 MiB or rounds over 10**6"}\n')
        text = self.rfile.read(length).decode("utf-8", "replace")
        self._answer(200, json.dumps(transform(text, rounds)).encode() + b"\n")


def probe(port: int, timeout: float, warm: int = 5) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            for _ in range(warm):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("POST", "/", body=b"warm up the service\n")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
            return
        except OSError as exc:
            last = str(exc)
            time.sleep(0.3)
    sys.exit(f"the service on port {port} did not answer a POST within {timeout:g} s ({last})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--probe", type=int, metavar="PORT")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    if args.probe:
        return probe(args.probe, args.timeout)
    Handler.default_rounds = max(0, min(args.rounds, MAX_ROUNDS))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
