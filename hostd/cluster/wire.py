"""The master and hostds' wire: one JSON-lines request and one answer per TLS connection.

    caller -> {"op": str, "args": {...}}\\n
    server -> {"ok": result}\\n  or  {"error": {"type": ErrorClassName, "message": str}}\\n

The same shape as hostd's Unix socket (daemon/server.py), over mutually
authenticated TLS (keys.py) instead of a 0600 socket: the handshake is the
access control, and a handler learns the caller's name from its certificate.

Why one request per connection: nothing to multiplex, no stale connection to
notice after a host reboots, and a heartbeat that fails means the peer is
unreachable now. The price, one TLS handshake per call, is a millisecond or
so on P-256 and small next to what the calls do (checkpoints, clones).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from typing import Any, Awaitable, Callable

from sfmpi.errors import HostdError, ProtocolError, SfmpiError, from_wire

from .keys import peer_name

log = logging.getLogger("sfmpi.hostd.cluster")

# A checkpoint's device state travels base64 in one request, so lines are long.
MAX_LINE = 16 << 20
# Closing waits this long for the peer's TLS close_notify, then drops the connection.
CLOSE_TIMEOUT = 2.0

Handler = Callable[[str, dict], Awaitable[Any]]


class _Gone(Exception):
    """The caller hung up or broke the connection before its request was read: no one to answer."""


def _line(msg: dict) -> bytes:
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: {exc.verify_message} (is it a member of this cluster?)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        # The peer went away or never said goodbye: nothing is left to tell it.
        writer.transport.abort()


async def call(host: str, port: int, ctx: ssl.SSLContext, server_name: str, op: str, timeout: float = 30.0,
               **args) -> Any:
    """Calls OP on the member SERVER_NAME at HOST:PORT; its answer, or the error it raised, re-raised here.

    `timeout` bounds everything (connect, handshake, the handler's work, the
    answer). HostdError when the peer cannot be reached or does not answer."""
    where = f"{server_name} at {host}:{port}"
    request = _line({"op": op, "args": args})   # not JSON-able is a bug of the caller: TypeError before any I/O
    if len(request) > MAX_LINE:
        raise ProtocolError(f"the request {op} to {where} is {len(request)} bytes, more than {MAX_LINE}")
    writer = None
    connected = False
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_name,
                                                               limit=MAX_LINE)
                connected = True
                writer.write(request)
                await writer.drain()
                line = await reader.readline()
            except (OSError, EOFError) as exc:
                # Refused, unreachable, a certificate either end rejects (in TLS 1.3 the server's
                # verdict on ours arrives only with the first read), or reset. Before ValueError:
                # a certificate verification error is both.
                raise HostdError(f"cannot reach {where}: {_reason(exc)}") from None
            except ValueError:   # readline past the limit
                raise ProtocolError(f"{where} answered {op} with more than {MAX_LINE} bytes") from None
    except TimeoutError:
        if not connected:
            raise HostdError(f"cannot reach {where}: no connection within {timeout:g} s") from None
        raise HostdError(f"{where} did not answer {op} within {timeout:g} s") from None
    finally:
        await _close(writer)
    if not line:
        raise HostdError(f"{where} closed the connection without answering {op}")
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and "ok" in answer:
        return answer["ok"]
    err = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("message"), str):
        raise from_wire(err["type"], err["message"])
    raise ProtocolError(f"{where} sent a malformed answer to {op}")


def call_sync(host: str, port: int, ctx: ssl.SSLContext, server_name: str, op: str, timeout: float = 30.0,
              **args) -> Any:
    """call() for code without an event loop (the CLI): runs it in a fresh one."""
    return asyncio.run(call(host, port, ctx, server_name, op, timeout, **args))


class WireServer:
    """Serves HANDLERS ({op: async (peer_name, args) -> JSON-able}) to members of the cluster.

    Nothing a caller sends can stop it: a bad request gets a ProtocolError
    answer, a handler's SfmpiError goes back by name, any other exception is
    logged and answered as HostdError. request_timeout bounds the handshake and
    the request line, not the handler: a clone may take longer, and the
    caller's own timeout says how long it will wait."""

    def __init__(self, ctx: ssl.SSLContext, handlers: dict[str, Handler], request_timeout: float = 30.0, *,
                 max_line: int = MAX_LINE):
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.request_timeout = request_timeout
        self.max_line = max_line
        self._server: asyncio.Server | None = None
        # Connections in flight: asyncio keeps only weak references to tasks, and close() ends them.
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        """Listens on HOST:PORT (0: any free port); the bound port."""
        # Plain TCP first, TLS in the connection's own task (start_tls): a failed handshake
        # is then ours to log, at debug level, instead of asyncio's.
        self._server = await asyncio.start_server(self._accept, host, port, limit=self.max_line)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("peername")
        try:
            try:
                async with asyncio.timeout(self.request_timeout):
                    await writer.start_tls(self.ctx)
                peer = peer_name(writer.get_extra_info("ssl_object"))
            except (OSError, TimeoutError, HostdError) as exc:
                # No certificate, another CA's, plain TCP, a port scanner: refused, and not worth a traceback.
                log.debug("refused a connection from %s: %s", address, _reason(exc) if str(exc) else "timed out")
                return
            answer = await self._answer(peer, reader)
            if answer is None:
                return
            with contextlib.suppress(OSError):
                writer.write(answer)
                await writer.drain()
        except Exception:   # a bug here must not take the listener down; log it and drop the connection
            log.exception("cluster wire: connection from %s", address)
        finally:
            await _close(writer)

    async def _request(self, reader: asyncio.StreamReader) -> tuple[str, dict]:
        try:
            async with asyncio.timeout(self.request_timeout):
                line = await reader.readline()
        except TimeoutError:
            raise ProtocolError(f"no request within {self.request_timeout:g} s") from None
        except (OSError, EOFError) as exc:
            raise _Gone(_reason(exc)) from None
        except ValueError:
            raise ProtocolError(f"request longer than {self.max_line} bytes") from None
        if not line:
            raise _Gone("no request")
        if not line.endswith(b"\n"):
            raise ProtocolError("request cut short")
        try:
            req = json.loads(line)
        except ValueError:
            raise ProtocolError("request is not JSON") from None
        if not isinstance(req, dict):
            raise ProtocolError("request is not a JSON object")
        op, args = req.get("op"), req.get("args", {})
        if not isinstance(op, str):
            raise ProtocolError("request has no operation (op)")
        if op not in self.handlers:
            raise ProtocolError(f"unknown operation {op[:80]!r} (known: {', '.join(sorted(self.handlers))})")
        if not isinstance(args, dict):
            raise ProtocolError(f"the arguments of {op} are not a JSON object")
        return op, args

    async def _answer(self, peer: str, reader: asyncio.StreamReader) -> bytes | None:
        op = None
        try:
            try:
                op, args = await self._request(reader)
            except _Gone as exc:
                log.debug("%s left before its request: %s", peer, exc)
                return None
            log.debug("%s calls %s", peer, op)
            result = await self.handlers[op](peer, args)
            answer = _line({"ok": result})
            if len(answer) > self.max_line:
                raise ProtocolError(f"the answer to {op} is {len(answer)} bytes, more than {self.max_line}")
            return answer
        except SfmpiError as exc:
            if op is None:
                log.debug("bad request from %s: %s", peer, exc)
            return _line({"error": {"type": type(exc).__name__, "message": str(exc)}})
        except Exception as exc:   # a bug in a handler: tell the caller, keep serving
            log.exception("cluster wire: %s from %s failed", op, peer)
            return _line({"error": {"type": "HostdError", "message": f"internal error in {op}: {exc!r}"}})
