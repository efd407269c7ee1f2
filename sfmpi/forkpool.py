"""ForkPoolExecutor: a concurrent.futures executor whose workers are clones.

    big = load_everything()                       # made before the pool: every worker has it
    with sfmpi.ForkPoolExecutor(3) as pool:       # forks 3 clones now
        results = list(pool.map(score, range(100)))

The workers are forked from this VM when the executor is created, so they
hold everything the program had in memory at that moment: a task sends only
the function (by reference, as pickle does: a module-level function) and its
arguments, never the big inputs. Results and exceptions come back pickled; an
exception raised in a worker is raised by the future's result() as itself,
with the worker's rank and traceback attached as a note. shutdown() ends the
workers (their VMs are destroyed) and joins them. The workers' connections are
a parallel section's (sections.fork_connected): only clones holding the key
made before the fork get in.

Like ProcessPoolExecutor, except that a worker is a whole VM: creating the pool
costs one fork of the VM, and a worker sees the program as it was then, not as
the parent changes it later.
"""
from __future__ import annotations

import atexit
import os
import queue
import threading
from concurrent.futures import Executor, Future

from . import api, section_wire
from .errors import SectionError, UsageError
from .sections import describe, fork_connected, rebuild

_STOP = None


class BrokenForkPool(SectionError):
    """A worker clone died: the pool cannot run its tasks any more."""


class ForkPoolExecutor(Executor):
    def __init__(self, max_workers: int, *, allow_fewer: bool = False, ticket_timeout: float | None = None):
        if not isinstance(max_workers, int) or max_workers < 1:
            raise UsageError(f"max_workers must be at least 1 (got {max_workers!r})")
        rank, size, ticket, conns, _ip, _key = fork_connected(max_workers, allow_fewer, ticket_timeout,
                                                              f"ForkPoolExecutor({max_workers})")
        if rank:
            _serve(conns[0])   # a worker: never returns
        self._ticket = ticket
        self._workers = size - 1
        self._work: queue.Queue = queue.Queue()
        self._shutdown = False
        self._broken: str | None = None
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._feed, args=(r, conn), daemon=True,
                                          name=f"sfmpi-forkpool-{r}") for r, conn in conns.items()]
        for t in self._threads:
            t.start()
        # A pool never shut down must not leave its clones running after the program.
        atexit.register(self._kill_workers)

    @property
    def max_workers(self) -> int:
        return self._workers

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with self._lock:
            if self._broken:
                raise BrokenForkPool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            f: Future = Future()
            self._work.put((f, fn, args, kwargs))
            return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            if cancel_futures:
                self._drain(lambda f: f.cancel())
            for _ in self._threads:
                self._work.put(_STOP)
        if wait:
            self._finish()
        else:
            threading.Thread(target=self._finish, daemon=True).start()

    # -- parent side -------------------------------------------------------
    def _feed(self, rank: int, conn) -> None:
        """One thread per worker: hand it the next task, wait for its answer."""
        try:
            while True:
                item = self._work.get()
                if item is _STOP:
                    section_wire.send(conn, ("stop", 0, None))
                    return
                f, fn, args, kwargs = item
                if not f.set_running_or_notify_cancel():
                    continue
                try:
                    section_wire.send(conn, ("task", 0, (fn, args, kwargs)))
                except (TypeError, AttributeError, ValueError) as exc:  # not picklable: this task only
                    f.set_exception(exc)
                    continue
                except OSError:
                    f.set_exception(BrokenForkPool(f"worker {rank} is gone"))
                    raise section_wire.PeerGone() from None
                try:
                    kind, _step, payload = section_wire.recv(conn, lambda: self._check_worker(rank))
                except (section_wire.PeerGone, BrokenForkPool):
                    f.set_exception(BrokenForkPool(f"worker {rank} died while running a task"))
                    raise section_wire.PeerGone() from None
                if kind == "result":
                    f.set_result(payload)
                else:
                    f.set_exception(rebuild(rank, payload))
        except (section_wire.PeerGone, OSError):
            self._break(f"worker {rank} of the fork pool died")
        finally:
            conn.close()

    def _check_worker(self, rank: int) -> None:
        if self._ticket is not None and api.ended_clone(self._ticket, rank) is not None:
            raise BrokenForkPool(f"worker {rank} of the fork pool died")

    def _break(self, why: str) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = why
            self._drain(lambda f: f.set_exception(BrokenForkPool(why)))

    def _drain(self, settle) -> None:
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self._work.put(_STOP)   # another worker's: keep it, stop draining
                return
            settle(item[0])

    def _finish(self) -> None:
        for t in self._threads:
            t.join()
        if self._ticket is not None:
            statuses = api.join(self._ticket)
            self._ticket = None
            if statuses.failures and not self._broken:
                self._broken = "; ".join(f"worker {r}: {why}" for r, why in statuses.failures.items())

    def _kill_workers(self) -> None:
        if self._ticket is not None:
            try:
                api.kill(self._ticket)
                api.join(self._ticket)
            except Exception:  # noqa: BLE001 - at interpreter exit, nothing more to do
                pass
            self._ticket = None


def _serve(conn) -> None:
    """In a worker clone: run tasks until the parent says stop, then end this VM."""
    status = 0
    try:
        while True:
            kind, _step, payload = section_wire.recv(conn)
            if kind == "stop":
                break
            fn, args, kwargs = payload
            try:
                answer = ("result", 0, fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - every exception goes back to the caller
                answer = ("error", 0, describe(exc))
            try:
                section_wire.send(conn, answer)
            except (TypeError, AttributeError, ValueError, RecursionError) as exc:  # result not picklable
                section_wire.send(conn, ("error", 0, describe(exc)))
    except (section_wire.PeerGone, OSError):
        status = 1   # the parent is gone
    finally:
        try:
            api.exit(status)
        finally:
            os._exit(status)
