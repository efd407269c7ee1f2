"""The console's web server (docs/console.md): the pages, Chart.js, /api/state and
/events for the pools and the VM list, /api/vm and /events/vm for the page of one VM.

Standard library only (ThreadingHTTPServer: one thread per request, so an open
/events stream never holds up the page), bound to 127.0.0.1 and nothing else:
the console has no login, so it is for whoever is on the host (or comes in
through an SSH tunnel). Chart.js is Debian's libjs-chart.js, served from this
server, so the page fetches nothing from the network.
"""
from __future__ import annotations

import errno
import json
import logging
import signal
import socketserver
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from sfmpi.errors import NotFound, SfmpiError, UsageError

from .state import Feed, VmFeed, check_vm_name, snapshot, vm_snapshot, window_minutes

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 8470
PUSH_S = 1.0
STATIC = Path(__file__).resolve().parent / "static"
CHART_DIR = Path("/usr/share/javascript/chart.js")
# Chart.js 4 (Debian 13's libjs-chart.js) names its browser build chart.umd.js;
# Chart.js 3.9 (Debian 12's) ships the same UMD build as chart.min.js and chart.js.
CHART_FILES = ("chart.umd.js", "chart.min.js", "chart.js")
# Names the page may be asked for by: anything else is a DNS-rebinding page
# trying to read the console from the operator's browser.
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]"}
# The page's own files and scripts only: this is what keeps it off the network.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
TEXT = "text/plain; charset=utf-8"


class ConsoleError(SfmpiError):
    """The console cannot start (a Debian package missing, an address not available)."""


def chart_file(directory: Path | None = None) -> Path:
    directory = directory or CHART_DIR
    for name in CHART_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ConsoleError(f"{directory / CHART_FILES[0]} is missing: the console needs the Debian package "
                       f"libjs-chart.js (apt-get install libjs-chart.js)")


class ConsoleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, home: Path, port: int, chart: Path):
        self.home = Path(home)
        self.chart = chart
        self.routes = {"/": STATIC / "index.html", "/index.html": STATIC / "index.html",
                       **{f"/static/{name}": STATIC / name
                          for name in ("common.js", "console.js", "vm.js", "console.css")},
                       "/static/chart.umd.js": chart}
        # Set on close: every /events thread ends within a push interval.
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__((HOST, port), Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's name (getfqdn); nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_port}/"

    def start(self) -> "ConsoleServer":
        """Serve in a thread of this process (the tests; `run` serves in the main thread)."""
        self._thread = threading.Thread(target=self.serve_forever, name="console", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port; safe twice."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.server_close()

    def __exit__(self, *exc) -> None:
        self.close()


def make_server(home: Path, port: int = DEFAULT_PORT) -> ConsoleServer:
    """The console on 127.0.0.1:port (0: any free port), not yet serving."""
    if not 0 <= port <= 65535:
        raise UsageError(f"console port {port}: use 1-65535")
    chart = chart_file()
    try:
        return ConsoleServer(home, port, chart)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {HOST} is in use: choose another with --port") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"port {port} on {HOST}: not allowed to listen there (below 1024 needs root)") from None
        raise ConsoleError(f"cannot listen on {HOST}:{port}: {exc.strerror or exc}") from None


class _Stop(Exception):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt."""


def _raise_stop(signum, frame):
    raise _Stop()


def run(home: Path, port: int = DEFAULT_PORT, announce=print) -> None:
    """`sfmpi console`: serve until SIGINT or SIGTERM."""
    server = make_server(home, port)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        announce(f"console: {server.url}")
        server.serve_forever()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()


def _host_name(host: str) -> str:
    """The name part of a Host header: 127.0.0.1:8470 -> 127.0.0.1, [::1]:8470 -> [::1]."""
    if host.startswith("["):
        return host.split("]", 1)[0].lower() + "]"
    return host.rsplit(":", 1)[0].lower()


class Handler(BaseHTTPRequestHandler):
    server: ConsoleServer
    server_version = "sfmpi-console"
    # A client that stops reading: its write times out and its thread ends.
    timeout = 30

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if _host_name(self.headers.get("Host") or HOST) not in LOOPBACK_NAMES:
            return self._send(403, b"the console answers to 127.0.0.1 and localhost only\n", TEXT)
        query = parse_qs(url.query)
        minutes = window_minutes((query.get("minutes") or [None])[0])
        if url.path == "/api/state":
            body = json.dumps(snapshot(self.server.home, minutes)).encode()
            return self._send(200, body, "application/json")
        if url.path == "/events":
            return self._events(Feed(self.server.home, minutes))
        if url.path in ("/vm", "/api/vm", "/events/vm"):
            return self._vm(url.path, (query.get("name") or [""])[0], minutes)
        path = self.server.routes.get(url.path)
        if path is None:
            return self._send(404, f"no such page: {url.path}\n".encode(), TEXT)
        try:
            body = path.read_bytes()
        except OSError as exc:
            return self._send(500, f"cannot read {path}: {exc.strerror}\n".encode(), TEXT)
        self._send(200, body, TYPES.get(path.suffix, "application/octet-stream"))

    def _vm(self, path: str, name: str, minutes: int) -> None:
        """The page of one VM, its JSON, its event stream. A bad name is 400 on
        all three; an unknown VM is 404 on the JSON and the stream, while the
        page is served, says so (it asks /api/vm) and names the VMs there are."""
        try:
            check_vm_name(name)
            if path == "/vm":
                return self._send(200, (STATIC / "vm.html").read_bytes(), TYPES[".html"])
            if path == "/events/vm":
                feed = VmFeed(self.server.home, name, minutes)
                return self._events(feed, feed.snapshot())
            return self._send(200, json.dumps(vm_snapshot(self.server.home, name, minutes)).encode(),
                              "application/json")
        except UsageError as exc:
            code, error = 400, str(exc)
        except NotFound as exc:
            code, error = 404, str(exc)
        except (SfmpiError, sqlite3.Error) as exc:
            code, error = 503, f"cannot read VM {name}: {exc}"
        except OSError as exc:
            code, error = 500, f"cannot read {STATIC / 'vm.html'}: {exc.strerror}"
        if path == "/vm":
            return self._send(code, f"{error}\n".encode(), TEXT)
        self._send(code, json.dumps({"error": error, "name": name}).encode(), "application/json")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if ctype.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(body)

    def _events(self, feed: Feed | VmFeed, first: dict | None = None) -> None:
        """Server-sent events: `state` (a snapshot; `first` if one was taken
        already) once, then `update` every PUSH_S. A reconnecting EventSource
        gets a fresh snapshot, so nothing is missed."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            self.wfile.write(b"retry: 2000\n\n")
            self._push("state", first if first is not None else feed.snapshot())
            while not self.server.stopping.wait(PUSH_S):
                self._push("update", feed.update())
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            pass  # the page was closed, reloaded or stopped reading: nothing to report
        self.close_connection = True

    def _push(self, event: str, data: dict) -> None:
        self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()
